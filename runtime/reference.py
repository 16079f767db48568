"""The plain-PyTorch reference of every fuselm op: the one oracle.

Written for clarity, not speed: every op computes in float32 and casts the
result back to the input dtype. Tests and benchmarks import these functions;
nobody writes them again. Argument checking lives in `fuselm.ops`, not here.
"""
import torch


def _scalar_or_rows(value, rows, dtype, device):
    """A float/int or a [B] tensor -> a [B, 1] tensor (one value per row)."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    return t.expand(rows).reshape(rows, 1) if t.dim() == 0 else t.reshape(rows, 1)


def rms_norm(x, weight, eps=1e-6, residual=None):
    """y = h / sqrt(mean(h^2) + eps) * weight over the last dim, h = x (+ residual).

    With `residual`, returns (y, h) where h = x + residual rounded to x.dtype;
    y is computed from that rounded h, exactly as if the add ran unfused.
    """
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype) if residual is None else (y.to(x.dtype), h)


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    """y = (h - mean) / sqrt(var + eps) * weight + bias; residual as in rms_norm."""
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    mean = hf.mean(-1, keepdim=True)
    var = (hf - mean).pow(2).mean(-1, keepdim=True)
    y = (hf - mean) * torch.rsqrt(var + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype) if residual is None else (y.to(x.dtype), h)


def attention(q, k, v, causal=True, scale=None, kv_start=None):
    """softmax(q k^T * scale) v with GQA.  q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D].

    Causal masking is bottom-right aligned: query i sees keys j <= i + Sk - Sq,
    so queries that follow a cached prefix see the whole prefix. kv_start [B]
    (int, optional; left padding) hides row b's first kv_start[b] keys: they may
    hold anything (even NaN) and never reach the output. A query row that sees
    no key at all outputs zeros.
    """
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    group = Hq // Hkv
    qf = q.float().transpose(1, 2)                                   # [B, Hq, Sq, D]
    kf = k.float().transpose(1, 2).repeat_interleave(group, dim=1)   # [B, Hq, Sk, D]
    vf = v.float().transpose(1, 2).repeat_interleave(group, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale                          # [B, Hq, Sq, Sk]
    i = torch.arange(Sq, device=q.device).view(Sq, 1)
    j = torch.arange(Sk, device=q.device).view(1, Sk)
    if causal:
        s = s.masked_fill(j > i + (Sk - Sq), float("-inf"))
    start = 0                                                        # first visible key of each row
    if kv_start is not None:
        start = kv_start.to(q.device).clamp(min=0).view(B, 1, 1, 1)
        s = s.masked_fill(j < start, float("-inf"))
        vf = vf.masked_fill(j.view(Sk, 1) < start, 0.0)
    p = torch.softmax(s, dim=-1)
    # rows that see no key: softmax of all -inf is NaN; they output zeros
    last = i + (Sk - Sq) if causal else torch.full_like(i, Sk - 1)    # [Sq, 1] last key each query may see
    p = p.masked_fill(last < start, 0.0)
    return (p @ vf).transpose(1, 2).to(q.dtype)                       # [B, Sq, Hq, D]


def decode_attention(q, k_cache, v_cache, seqlens, scale=None, kv_start=None):
    """One query per sequence over its cached keys [kv_start[b], seqlens[b]).

    q [B, Hq, D], caches [B, Smax, Hkv, D], seqlens [B] int, kv_start [B] int
    (optional, default 0; left padding) -> [B, Hq, D]. A row that sees no key
    outputs zeros.
    """
    B, Hq, D = q.shape
    Smax, Hkv = k_cache.shape[1], k_cache.shape[2]
    scale = D ** -0.5 if scale is None else scale
    group = Hq // Hkv
    kf = k_cache.float().repeat_interleave(group, dim=2)             # [B, Smax, Hq, D]
    vf = v_cache.float().repeat_interleave(group, dim=2)
    s = torch.einsum("bhd,bshd->bhs", q.float(), kf) * scale         # [B, Hq, Smax]
    pos = torch.arange(Smax, device=q.device).view(1, 1, Smax)
    visible = pos < seqlens.view(B, 1, 1).to(q.device)
    if kv_start is not None:
        visible &= pos >= kv_start.view(B, 1, 1).to(q.device)
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1).masked_fill(~visible, 0.0)  # seqlens 0: NaN row -> zeros
    # positions past seqlens may hold anything (even NaN); they must not reach the output
    vf = vf.masked_fill(~visible.view(B, Smax, 1, 1), 0.0)
    return torch.einsum("bhs,bshd->bhd", p, vf).to(q.dtype)


def gather_pages(pool, block_tables):
    """A paged cache laid out per row: pool [num_blocks, block_size, H, D] and block_tables [B, M]
    (block ids) -> [B, M * block_size, H, D], row b's position j at pool[block_tables[b, j // block_size],
    j % block_size]."""
    B, M = block_tables.shape
    return pool[block_tables.long()].reshape(B, M * pool.shape[1], *pool.shape[2:])


def paged_decode_attention(q, k_pool, v_pool, block_tables, seqlens, scale=None):
    """decode_attention over a paged cache: q [B, Hq, D], pools [num_blocks, block_size, Hkv, D],
    block_tables [B, M] int32, seqlens [B] int (<= M * block_size) -> [B, Hq, D]."""
    return decode_attention(q, gather_pages(k_pool, block_tables), gather_pages(v_pool, block_tables), seqlens,
                            scale)


def paged_attention(q, k_pool, v_pool, block_tables, seqlens, causal=True, scale=None):
    """Prefill attention for queries after a cached prefix, keys read through block tables.

    q [B, Sq, Hq, D] are the last Sq of row b's seqlens[b] tokens (seqlens[b] >= Sq): query i sits
    at position seqlens[b] - Sq + i and, when causal, sees keys j <= that position (bottom-right
    aligned per row); otherwise all seqlens[b] keys. Pools [num_blocks, block_size, Hkv, D],
    block_tables [B, M] int32 -> [B, Sq, Hq, D]. Slots past seqlens may hold anything.
    """
    B, Sq, Hq, D = q.shape
    k, v = gather_pages(k_pool, block_tables), gather_pages(v_pool, block_tables)  # [B, Sk, Hkv, D]
    Sk, group = k.shape[1], Hq // k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    qf = q.float().transpose(1, 2)                                   # [B, Hq, Sq, D]
    kf = k.float().transpose(1, 2).repeat_interleave(group, dim=1)   # [B, Hq, Sk, D]
    vf = v.float().transpose(1, 2).repeat_interleave(group, dim=1)
    lengths = seqlens.to(q.device).long().view(B, 1, 1, 1)
    i = torch.arange(Sq, device=q.device).view(1, 1, Sq, 1)
    j = torch.arange(Sk, device=q.device).view(1, 1, 1, Sk)
    visible = (j < lengths) & ((j <= lengths - Sq + i) if causal else True)  # [B, 1, Sq, Sk]
    s = ((qf @ kf.transpose(-1, -2)) * scale).masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1).masked_fill(~visible, 0.0)          # a row seeing no key: zeros
    vf = vf.masked_fill((j >= lengths).view(B, 1, Sk, 1), 0.0)       # unwritten slots never reach the output
    return (p @ vf).transpose(1, 2).to(q.dtype)                      # [B, Sq, Hq, D]


def sampling_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The distribution `sample` draws from, [B, V] float32, each row summing to 1.

    In the order transformers applies them: divide by temperature, softmax,
    keep the top_k most probable (0 = all), renormalize, keep the smallest
    most-probable set whose mass reaches top_p, keep tokens with probability
    >= min_p * max probability, renormalize. Ties at a threshold are kept
    together, so kernels that select by threshold instead of sorting agree.
    Rows with temperature 0 put all mass on the argmax.
    """
    B, V = logits.shape
    dev = logits.device
    t = _scalar_or_rows(temperature, B, torch.float32, dev)
    k = _scalar_or_rows(top_k, B, torch.int64, dev)
    p_top = _scalar_or_rows(top_p, B, torch.float32, dev)
    p_min = _scalar_or_rows(min_p, B, torch.float32, dev)
    greedy = t == 0
    lf = logits.float() / torch.where(greedy, torch.ones_like(t), t)
    probs = torch.softmax(lf, dim=-1)
    sorted_p, _ = probs.sort(dim=-1, descending=True)
    # top-k: threshold at the k-th largest probability
    kth = sorted_p.gather(1, (k.clamp(1, V) - 1))
    keep = (k == 0) | (probs >= kth)
    probs = torch.where(keep, probs, 0.0)
    probs = probs / probs.sum(-1, keepdim=True)
    # top-p: keep a token if the mass of strictly more probable tokens is < top_p
    sorted_p, _ = probs.sort(dim=-1, descending=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p               # mass before each sorted token
    cutoff_idx = ((before < p_top).sum(-1, keepdim=True) - 1).clamp(min=0)
    cutoff = sorted_p.gather(1, cutoff_idx)
    keep = probs >= cutoff
    # min-p: relative to the most probable token
    keep &= probs >= p_min * probs.max(-1, keepdim=True).values
    probs = torch.where(keep, probs, 0.0)
    probs = probs / probs.sum(-1, keepdim=True)
    onehot = torch.zeros_like(probs).scatter_(1, logits.float().argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy, onehot, probs)


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generator=None):
    """Draw one token per row of logits [B, V] -> [B] int64 (see sampling_probs)."""
    probs = sampling_probs(logits, temperature, top_k, top_p, min_p)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


def linear(x, weight, bias=None, out_dtype=None):
    """x @ weight.T (+ bias): x [..., K], weight [N, K] (dense, or a fuselm.quant.QuantizedTensor)
    -> [..., N] in out_dtype (default x's).

    Dense weights are the one reference case that does not upcast: torch's matmul already
    accumulates in float32, and upcasting every weight on every call would double a decode step's
    memory traffic in the runtime's "torch" backend. Quantized weights are dequantized (bit-exact
    with gguf) and multiplied in float32.
    """
    if _is_quantized(weight):
        b = None if bias is None else bias.float()
        return torch.nn.functional.linear(x.float(), weight.dequantize(), b).to(out_dtype or x.dtype)
    y = torch.nn.functional.linear(x, weight, bias)
    return y if out_dtype is None else y.to(out_dtype)


def embedding(tokens, table, dtype=None):
    """Rows `tokens` of table [V, H] (dense or quantized) -> [*tokens.shape, H] in dtype (default the
    table's; float32 for a quantized one)."""
    if _is_quantized(table):
        raw = table.require("raw")[tokens.reshape(-1)]
        rows = dequantize(table.fmt.name, raw, (raw.shape[0], table.shape[1]))
        return rows.reshape(*tokens.shape, table.shape[1]).to(dtype or torch.float32)
    out = torch.nn.functional.embedding(tokens, table)
    return out if dtype is None else out.to(dtype)


def rope(x, cos, sin, positions):
    """Rotary embedding, "rotate half" (dim i pairs with i + D/2): x [..., H, D] at positions [...]
    (int64) with cos/sin tables [P, D/2] float32 -> x's shape and dtype, float32 math."""
    c, s = cos[positions].unsqueeze(-2), sin[positions].unsqueeze(-2)   # [..., 1, D/2]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def silu_mul(x):
    """silu(x[..., :I]) * x[..., I:] for x [..., 2I] (the gated MLP), float32 math."""
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


def gelu_tanh(x):
    """GELU with the tanh approximation (GPT-2's), float32 math."""
    return torch.nn.functional.gelu(x.float(), approximate="tanh").to(x.dtype)


def store_kv(k_cache, v_cache, k, v, slots):
    """k_cache[slots[t]] = k[t] and v_cache[slots[t]] = v[t]: caches [num_slots, H, D], k/v [T, H, D]."""
    k_cache[slots] = k
    v_cache[slots] = v


def _is_quantized(t):
    from .quant import QuantizedTensor
    return isinstance(t, QuantizedTensor)


# ---------------------------------------------------------------- GGUF block formats
# Each format's blocks decoded into unsigned integer values q and per-group fields, so that
# weight = scale * q + min per group (min derived where the format stores none). `unpack_blocks`
# is shared by `dequantize` (the oracle, bit-exact with the gguf package: the same float32
# operations in the same order) and by fuselm.quant's repacking for the native kernels.

def _f16(blocks, start):
    """The float16 stored at bytes [start, start + 2) of each block, as float32 [n, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _shifts(values, like):
    """uint8 shift amounts on `like`'s device (blocks may be on a GPU: torch's embedding gathers there)."""
    return torch.tensor(list(values), dtype=torch.uint8, device=like.device)


def _nibbles(qs):
    """Bytes [n, ..., 16] holding values j (low nibble) and j + 16 (high nibble) -> [n, ..., 32]."""
    return torch.cat((qs & 15, qs >> 4), dim=-1)


def _bits(qh, count):
    """Little-endian bits of bytes [n, count // 8] -> [n, count] (bit i of the stored word)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], count)


def _k_scales(scales):
    """Q4_K / Q5_K: 12 bytes of 6-bit scales and mins -> (scales, mins) [n, 8] uint8."""
    d, m, m_d = scales.reshape(-1, 3, 4).unbind(1)
    sc = torch.cat((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def unpack_blocks(fmt, blocks):
    """Blocks of `fmt` (uint8 [n, type_size]) -> dict with "q" (uint8 [n, block], the unsigned values)
    and the format's scale fields (float32 from float16 "d", "m", "dmin"; uint8 "sc", "mn"; int8 "sc6")."""
    n = blocks.shape[0]
    if fmt in ("Q4_0", "Q4_1"):
        head = 2 if fmt == "Q4_0" else 4
        out = {"q": _nibbles(blocks[:, head:head + 16]), "d": _f16(blocks, 0)}
        if fmt == "Q4_1":
            out["m"] = _f16(blocks, 2)
        return out
    if fmt in ("Q5_0", "Q5_1"):
        head = 2 if fmt == "Q5_0" else 4
        high = _bits(blocks[:, head:head + 4], 32)
        out = {"q": _nibbles(blocks[:, head + 4:head + 20]) | (high << 4), "d": _f16(blocks, 0)}
        if fmt == "Q5_1":
            out["m"] = _f16(blocks, 2)
        return out
    if fmt == "Q8_0":
        return {"q": blocks[:, 2:34].contiguous().view(torch.int8).to(torch.int16).add(128).to(torch.uint8),
                "d": _f16(blocks, 0)}
    if fmt in ("Q4_K", "Q5_K"):
        sc, mn = _k_scales(blocks[:, 4:16])
        qs = blocks[:, -128:].reshape(n, 4, 1, 32) >> _shifts((0, 4), blocks).view(1, 1, 2, 1)
        q = (qs & 15).reshape(n, 256)
        if fmt == "Q5_K":
            qh = blocks[:, 16:48].reshape(n, 1, 32) >> _shifts(range(8), blocks).view(1, 8, 1)
            q = q | ((qh & 1).reshape(n, 256) << 4)
        return {"q": q, "d": _f16(blocks, 0), "dmin": _f16(blocks, 2), "sc": sc, "mn": mn}
    if fmt == "Q6_K":
        ql = blocks[:, :128].reshape(n, 2, 1, 64) >> _shifts((0, 4), blocks).view(1, 1, 2, 1)
        qh = blocks[:, 128:192].reshape(n, 2, 1, 32) >> _shifts((0, 2, 4, 6), blocks).view(1, 1, 4, 1)
        q = (ql & 15).reshape(n, 256) | ((qh & 3).reshape(n, 256) << 4)
        return {"q": q, "d": _f16(blocks, 208), "sc6": blocks[:, 192:208].contiguous().view(torch.int8)}
    raise ValueError(f"unknown GGUF block format {fmt!r}")


def dequantize_blocks(fmt, blocks):
    """Blocks of `fmt` (uint8 [n, type_size]) -> float32 [n, block], equal to gguf's dequantize."""
    f = unpack_blocks(fmt, blocks)
    n, q = blocks.shape[0], f["q"]
    if fmt in ("Q4_0", "Q5_0", "Q8_0"):
        offset = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 128}[fmt]
        return f["d"] * (q.to(torch.int16) - offset).float()
    if fmt in ("Q4_1", "Q5_1"):
        return f["d"] * q.float() + f["m"]
    if fmt in ("Q4_K", "Q5_K"):
        scale = (f["d"] * f["sc"].float()).view(n, 8, 1)
        low = (f["dmin"] * f["mn"].float()).view(n, 8, 1)
        return (scale * q.view(n, 8, 32).float() - low).reshape(n, 256)
    scale = (f["d"] * f["sc6"].float()).view(n, 16, 1)                 # Q6_K
    return (scale * (q.to(torch.int16) - 32).view(n, 16, 16).float()).reshape(n, 256)


def dequantize(fmt, raw, shape):
    """A GGUF tensor's rows (uint8 [N, bytes per row] in `fmt`) -> float32 of `shape` [N, K]."""
    from .quant import FORMATS
    n_blocks = raw.numel() // FORMATS[fmt].type_size
    return dequantize_blocks(fmt, raw.reshape(n_blocks, -1)).reshape(shape)
