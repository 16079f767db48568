"""The transformer, parametrised by a ModelConfig, and the public `Model`.

Two families share one block structure:
  llama: RMSNorm, RoPE, GQA attention (optional q/k/v bias: Qwen2), gated SiLU MLP
  gpt2:  LayerNorm with bias, learned positions, MHA, GELU (tanh) MLP, Conv1D weights
Weights are rearranged once at load time for speed: q/k/v fused into one
matrix, gate/up fused into one, GPT-2's Conv1D [in, out] transposed to [out, in].
Every norm and attention goes through `fuselm.ops`, so the backend is one switch.
The residual add is fused into the next norm: `h, r = norm(a, residual=r)`.
"""
import math
import os
import sys
import threading

import torch

from . import memory, ops, quant, rope
from .quant import QuantizedTensor  # (Model.load's `quant` argument shadows the module there)
from .cache import KVPool
from .weights import open_checkpoint

OPS = ("linear", "rms_norm", "layer_norm", *ops.ATTENTION, "sample", *ops.POINTWISE)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(sorted(_DTYPES))}")


def parse_device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device} is not supported; use 'cpu' or 'cuda'")
    return device


# What a model forced onto one backend runs elsewhere, per device type: the ops that backend lacks there.
# Matmuls stay torch's (cuBLAS / oneDNN) except where native's CPU GEMV or Triton's quantized kernels
# run them (ops.linear runs dense weights on torch under backend 'triton', and logs it).
_TORCH_POINTWISE = dict.fromkeys(ops.POINTWISE, "torch")
_BORROWED = {
    ("triton", "cpu"): _TORCH_POINTWISE,
    ("triton", "cuda"): _TORCH_POINTWISE,
    ("native", "cuda"): {"linear": "torch", **_TORCH_POINTWISE, **dict.fromkeys(ops.ATTENTION, "triton")},
}


def backends_for(backend, device):
    """op -> the backend the model asks for it on `device`; says what a forced backend borrows."""
    borrowed = _BORROWED.get((backend, device.type), {})
    for op, other in borrowed.items():
        ops.log.info("fuselm: backend %r has no %s on %s; the model runs it on %r", backend, op, device.type, other)
    return {op: borrowed.get(op, backend) for op in OPS}


def default_dtype(device):
    if device.type == "cuda" or ops.cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


class Transformer:
    """The network: weights plus forward passes with and without a KV cache."""

    def __init__(self, config, weights, backends, device, dtype, shard=None):
        """backends: op -> backend name (see backends_for); dtype: the activations' (and KV cache's);
        shard: this rank's tp.Shard under tensor parallelism (its heads; o and down all-reduce)."""
        self.config = config
        self.backends = backends
        self.w = weights
        self.device, self.dtype = device, dtype
        self.shard = shard
        c = config
        self.heads, self.kv_heads = (shard.heads, shard.kv_heads) if shard else (c.num_heads, c.num_kv_heads)
        self.q_size, self.kv_size = self.heads * c.head_dim, self.kv_heads * c.head_dim
        if c.arch == "llama":
            self.cos, self.sin = rope.tables(c.head_dim, c.rope_theta, c.rope_scaling,
                                             c.max_position_embeddings, device)

    # ---------------------------------------------------------------- pieces

    def _norm(self, x, name, residual=None):
        w, c = self.w, self.config
        if c.arch == "gpt2":
            return ops.layer_norm(x, w[name + ".weight"], w[name + ".bias"], eps=c.norm_eps,
                                  residual=residual, backend=self.backends["layer_norm"])
        return ops.rms_norm(x, w[name + ".weight"], eps=c.norm_eps, residual=residual,
                            backend=self.backends["rms_norm"])

    def _linear(self, x, name):
        return ops.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"), backend=self.backends["linear"])

    def _mlp(self, h, i):
        p = f"layers.{i}."
        if self.config.arch == "gpt2":
            return self._linear(ops.gelu_tanh(self._linear(h, p + "fc"), backend=self.backends["gelu_tanh"]),
                                p + "proj")
        return self._linear(ops.silu_mul(self._linear(h, p + "gate_up"), backend=self.backends["silu_mul"]),
                            p + "down")

    def _embed(self, tokens, positions):
        x = ops.embedding(tokens, self.w["embed"], self.dtype, backend=self.backends["embedding"])
        if self.config.arch == "gpt2":
            x = x + ops.embedding(positions, self.w["pos_embed"], self.dtype, backend=self.backends["embedding"])
        return x

    def _blocks(self, tokens, positions, attend):
        """Run all blocks on tokens [B, S] at positions [B, S]; attend(layer, q, k, v) -> o.
        Returns the final normalized hidden states [B, S, hidden]."""
        c = self.config
        B, S = tokens.shape
        r = self._embed(tokens, positions)
        h = self._norm(r, "layers.0.attn_norm")
        for i in range(c.num_layers):
            qkv = self._linear(h, f"layers.{i}.qkv")                          # [B, S, (Hq + 2 Hkv) D]
            qk, v = qkv.split((self.q_size + self.kv_size, self.kv_size), dim=-1)
            qk = qk.view(B, S, self.heads + self.kv_heads, c.head_dim)
            v = v.view(B, S, self.kv_heads, c.head_dim)
            if c.arch == "llama":  # q and k, adjacent in qkv, rotate in one call
                qk = ops.rope(qk, self.cos, self.sin, positions, backend=self.backends["rope"])
            q, k = qk.split((self.heads, self.kv_heads), dim=2)               # [B, S, H, D] each
            o = attend(i, q, k, v)                                           # [B, S, Hq, D]
            a = self._reduce(self._linear(o.reshape(B, S, self.q_size), f"layers.{i}.o"))
            h, r = self._norm(a, f"layers.{i}.mlp_norm", residual=r)
            m = self._reduce(self._mlp(h, i))
            nxt = f"layers.{i + 1}.attn_norm" if i + 1 < c.num_layers else "final_norm"
            h, r = self._norm(m, nxt, residual=r)
        return h

    def _reduce(self, x):
        """A row-parallel projection's output: the sum of every rank's part (tensor parallelism)."""
        if self.shard is None:
            return x
        from . import tp
        return tp.all_reduce(x)

    def _lm_head(self, h):
        logits = ops.linear(h, self.w["lm_head"], out_dtype=torch.float32, backend=self.backends["linear"])
        if self.shard is None:
            return logits
        from . import tp
        return tp.gather_vocab(self.shard, logits.reshape(-1, logits.shape[-1])).reshape(*logits.shape[:-1], -1)

    def bytes_per_token(self):
        """Bytes of weights one decode step reads: all but the embeddings, of which it reads a row."""
        return sum(weight_bytes({n: t for n, t in self.w.items() if n not in ("embed", "pos_embed")}).values())

    # ---------------------------------------------------------------- passes

    def forward(self, tokens):
        """Full causal forward of tokens [B, S] without a cache -> float32 logits [B, S, V]."""
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
        backend = self.backends["attention"]
        attend = lambda i, q, k, v: ops.attention(q, k, v, causal=True, backend=backend)  # noqa: E731
        return self._lm_head(self._blocks(tokens, positions, attend))

    def step(self, batch, kv):
        """One forward pass of the engine (a cache.Batch) over the KV pool `kv` -> float32 logits
        [len(batch.last), V] (every token's when batch.last is None). Each token's K/V are stored
        first, then decode rows attend through their block tables, and each prefill chunk to its
        cached prefix plus itself (without a prefix, to its own K/V: no pool read). No host sync, and
        for decode-only batches static shapes, so the step can be captured in a CUDA graph."""
        D, b = batch.num_decode, self.backends

        def attend(i, q, k, v):                                              # q [1, T, Hq, D]
            kv.store(i, k[0], v[0], batch.slots, backend=b["store_kv"])
            k_pool, v_pool = kv.layer(i)
            parts = []
            if D:
                parts.append(ops.paged_decode_attention(q[0, :D], k_pool, v_pool, batch.block_tables[:D],
                                                        batch.seqlens[:D], backend=b["paged_decode_attention"])[None])
            for j, (start, n, cached) in enumerate(batch.chunks):
                qj, row = q[:, start:start + n], D + j
                parts.append(ops.attention(qj, k[:, start:start + n], v[:, start:start + n], causal=True,
                                           backend=b["attention"]) if cached == 0 else
                             ops.paged_attention(qj, k_pool, v_pool, batch.block_tables[row:row + 1],
                                                 batch.seqlens[row:row + 1], backend=b["paged_attention"]))
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

        h = self._blocks(batch.tokens[None], batch.positions[None], attend)[0]  # [T, hidden]
        return self._lm_head(h if batch.last is None else h[batch.last])

    def new_pool(self, num_blocks, block_size):
        c = self.config
        return KVPool(c.num_layers, num_blocks, block_size, self.kv_heads, c.head_dim, self.dtype, self.device)

    def invariant_rows(self):
        """Up to how many rows a pass's linears give each row the result it gets alone (so decode rows
        and prefill chunks may share a pass) when every matrix is quantized: the native CPU kernels' 63,
        Triton's DECODE_ROWS; else 1 (dense GEMMs and the per-shape tuning choose kernels by row count)."""
        quantized = all(isinstance(w, (QuantizedTensor, quant.QuantizedStack)) for n, w in self.w.items()
                        if _is_matrix(n) and n not in ("embed", "pos_embed"))
        backend = ops.resolve("linear", self.backends["linear"], self.device)
        if not quantized or backend not in ("native", "triton"):
            return 1
        if backend == "triton":
            from .kernels.quant import DECODE_ROWS
            return DECODE_ROWS
        return 63


# ---------------------------------------------------------------- loading

def _expected_shapes(c):
    """Shape of every tensor the network needs, under its internal name."""
    H, D, I = c.hidden_size, c.head_dim, c.intermediate_size
    qkv = (c.num_heads + 2 * c.num_kv_heads) * D
    shapes = {"embed": (c.vocab_size, H), "lm_head": (c.vocab_size, H), "final_norm.weight": (H,)}
    for i in range(c.num_layers):
        p = f"layers.{i}."
        shapes.update({p + "attn_norm.weight": (H,), p + "mlp_norm.weight": (H,),
                       p + "qkv.weight": (qkv, H), p + "o.weight": (H, c.num_heads * D)})
        if c.arch == "gpt2":
            shapes.update({p + "attn_norm.bias": (H,), p + "mlp_norm.bias": (H,), p + "qkv.bias": (qkv,),
                           p + "o.bias": (H,), p + "fc.weight": (I, H), p + "fc.bias": (I,),
                           p + "proj.weight": (H, I), p + "proj.bias": (H,)})
        else:
            shapes.update({p + "gate_up.weight": (2 * I, H), p + "down.weight": (H, I)})
            if c.attention_bias:
                shapes[p + "qkv.bias"] = (qkv,)
            if c.o_bias:
                shapes[p + "o.bias"] = (H,)
            if c.mlp_bias:
                shapes.update({p + "gate_up.bias": (2 * I,), p + "down.bias": (H,)})
    if c.arch == "gpt2":
        shapes.update({"pos_embed": (c.max_position_embeddings, H), "final_norm.bias": (H,)})
    return shapes


def _sources(c, names):
    """Internal name -> (how to build it, checkpoint tensor names), for the checkpoint's naming."""
    if c.arch == "gpt2":
        pre = "transformer." if any(n.startswith("transformer.") for n in names) else ""
        m = {"embed": ("one", [pre + "wte.weight"]), "pos_embed": ("one", [pre + "wpe.weight"]),
             "final_norm.weight": ("one", [pre + "ln_f.weight"]), "final_norm.bias": ("one", [pre + "ln_f.bias"]),
             "lm_head": ("one", ["lm_head.weight" if "lm_head.weight" in names else pre + "wte.weight"])}
        for i in range(c.num_layers):
            p, q = f"layers.{i}.", f"{pre}h.{i}."
            for ours, theirs, how in (("attn_norm", "ln_1", "one"), ("mlp_norm", "ln_2", "one"),
                                      ("qkv", "attn.c_attn", "conv1d"), ("o", "attn.c_proj", "conv1d"),
                                      ("fc", "mlp.c_fc", "conv1d"), ("proj", "mlp.c_proj", "conv1d")):
                m[p + ours + ".weight"] = (how, [q + theirs + ".weight"])
                m[p + ours + ".bias"] = ("one", [q + theirs + ".bias"])
        return m
    m = {"embed": ("one", ["model.embed_tokens.weight"]), "final_norm.weight": ("one", ["model.norm.weight"]),
         "lm_head": ("one", ["lm_head.weight" if "lm_head.weight" in names and not c.tie_word_embeddings
                             else "model.embed_tokens.weight"])}
    for i in range(c.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        a, f = q + "self_attn.", q + "mlp."
        for kind in ("weight", "bias"):
            m[f"{p}qkv.{kind}"] = ("cat", [f"{a}{x}_proj.{kind}" for x in "qkv"])
            m[f"{p}o.{kind}"] = ("one", [f"{a}o_proj.{kind}"])
            m[f"{p}gate_up.{kind}"] = ("cat", [f"{f}gate_proj.{kind}", f"{f}up_proj.{kind}"])
            m[f"{p}down.{kind}"] = ("one", [f"{f}down_proj.{kind}"])
        m[p + "attn_norm.weight"] = ("one", [q + "input_layernorm.weight"])
        m[p + "mlp_norm.weight"] = ("one", [q + "post_attention_layernorm.weight"])
    return m


# The weights that go through ops.linear / ops.embedding: the ones that may stay quantized.
_MATRICES = ("qkv", "o", "gate_up", "down", "fc", "proj")


def _is_matrix(name):
    return name in ("embed", "lm_head", "pos_embed") or name.endswith(".weight") and name.split(".")[-2] in _MATRICES


def _storage(c, ckpt, sources, shapes, names, keep, quantize):
    """name -> None (dense) or the [(format, rows)] runs of its QuantizedTensor(s), and the set of names
    kept as stored in the file, from the checkpoint's metadata alone: an unsupported type or shape
    fails before any weight is read."""
    out, kept = {}, set()
    for name in names:
        how, parts = sources[name]
        stored = [ckpt.quantized_format(p) for p in parts] if keep and _is_matrix(name) else [None]
        if all(f is not None for f in stored):
            part_shapes = [ckpt.quantized_shape(p) for p in parts]
            for _, cols in part_shapes:
                _check_shape(c, name, parts, (sum(rows for rows, _ in part_shapes), cols), shapes)
            # several formats in one fused weight, e.g. Q4_K_M: q and k Q4_K, v Q6_K
            out[name] = quant.runs([(f, rows) for f, (rows, _) in zip(stored, part_shapes)])
            kept.add(name)
            continue
        if any(f is not None for f in stored):  # dense and quantized parts in one fused weight
            ops.log.info("fuselm: %s has dense and quantized parts (%s); the fused weight is dense", name,
                         ", ".join(f"{p}: {f or 'dense'}" for p, f in zip(parts, stored)))
        if quantize is not None and _is_matrix(name):
            # the embedding and output rows stay in Q8_0 (llama.cpp's choice for small-row formats)
            fmt = "Q8_0" if name in ("embed", "lm_head", "pos_embed") else quantize
            quant.check_shape(quant.FORMATS[fmt], shapes[name], " + ".join(parts))
            out[name] = [(fmt, shapes[name][0])]
        else:
            out[name] = None
    return out, kept


def load_weights(ckpt, dtype, device, progress=True, keep=False, quantize=None, layout="tiles", shard=None):
    """Read, rearrange and check every tensor the network needs, one at a time.

    keep: GGUF block-quantized matrices stay quantized (fuselm.quant.QuantizedTensor, packed into
    `layout`: "tiles" for the native kernels, "planes" for Triton's); quantize: a format name, dense
    matrices are quantized to it; shard: a tp.Shard: each tensor is cut to this rank's part as it is
    read (the vocabulary slice of a tied lm_head is then its own tensor)."""
    from tqdm import tqdm

    from . import tp
    c = ckpt.config
    shapes = _expected_shapes(c)
    local = {n: tp.local_shape(shard, c, n, s) for n, s in shapes.items()} if shard else shapes
    sources = _sources(c, set(ckpt.names()))
    tied = shard is None and sources["lm_head"][1] == sources["embed"][1]
    names = [n for n in shapes if not (tied and n == "lm_head")]
    storage, kept = _storage(c, ckpt, sources, shapes, names, keep, quantize)
    dense = _slots({n: [local[n]] for n in names if storage[n] is None}, dtype, device)
    tiles = _slots({n: [quant.tiles_shape(quant.FORMATS[f], (rows, shapes[n][1])) for f, rows in r]
                    for n, r in storage.items() if r is not None and layout == "tiles" and not shard},
                   torch.uint8, device)
    if shard:
        tp.check_blocks(shard, c, {n: [f for f, _ in storage[n]] for n in names if storage[n] is not None})

    def read(name, parts, get, transposed=False):
        """Each checkpoint part's piece this rank holds (all of it without a shard): get(part, rows, cols)."""
        out = []
        for i, p in enumerate(parts):
            rows, cols, zero = tp.part_ranges(shard, c, name, i, len(parts)) if shard else (None, None, False)
            t = get(p, cols, rows) if transposed else get(p, rows, cols)  # stored [in, out]: our rows, its cols
            out.append(torch.zeros_like(t) if zero else t)
        return out

    weights = {}
    for name in tqdm(names, desc="loading weights", unit="tensor", disable=not progress, file=sys.stderr):
        how, parts = sources[name]
        if name in kept:  # (_storage checked the full shapes from the metadata)
            w = quant.concat_rows(read(name, parts, ckpt.get_quantized), name)
        else:
            full = [ckpt.shape(p)[::-1] if how == "conv1d" else ckpt.shape(p) for p in parts]
            _check_shape(c, name, parts, (sum(s[0] for s in full), *full[0][1:]), shapes)
            kind = dtype if storage[name] is None else torch.float32
            tensors = read(name, parts, lambda p, rows, cols: ckpt.get(p, kind, device, rows, cols), how == "conv1d")
            tensors = [t.t() for t in tensors] if how == "conv1d" else tensors     # GPT-2's Conv1D [in, out]
            w = torch.cat(tensors) if len(tensors) > 1 else tensors[0].contiguous()
            del tensors  # free the staging copies before the next tensor is read
            if storage[name] is not None:
                w = quant.quantize(w, storage[name][0][0], name)
        _check_shape(c, name, parts, w.shape, local)
        if storage[name] is None:
            weights[name] = dense[name][0].copy_(w)
        elif layout == "tiles":
            slab = tiles.get(name)
            weights[name] = w.pack(out=slab if slab is None or isinstance(w, quant.QuantizedStack) else slab[0])
        elif name in ("embed", "pos_embed") and not (tied and name == "embed"):
            weights[name] = quant.QuantizedTensor(w.fmt, w.shape, w.raw.to(device), name=w.name)  # rows gathered
        else:  # the embedding tied to lm_head keeps its rows for torch's gather too
            weights[name] = w.pack_planes(device, keep_raw=name == "embed")
        del w
        memory.return_free_heap()
    if tied:
        weights["lm_head"] = weights["embed"]  # tied embeddings: one tensor, not a copy
    return weights


def _check_shape(c, name, parts, shape, shapes):
    if tuple(shape) != shapes[name]:
        raise ValueError(f"tensor {' + '.join(parts)} has shape {tuple(shape)}, but the config "
                         f"({c.arch}, hidden {c.hidden_size}, heads {c.num_heads}/{c.num_kv_heads}) "
                         f"needs {shapes[name]}")


_ALIGN = 64  # bytes: every weight starts on a cache line (the native GEMV and 16-byte vector loads rely on it)


def _slots(shapes, dtype, device):
    """{name: [shape, ...]} -> {name: [view, ...]}: views of one allocation, each on a cache line. A big
    allocation is memory-mapped lazily, so resident memory grows only as each weight is written, and
    no per-weight allocations fragment the heap (SmolLM2 in float32: load peak 850 -> 810 MB). On the
    CPU it is marked for transparent huge pages before it is written: decode streams every weight per
    token (the native GEMV ran at 16.5 GB/s on 4 KiB pages and 29.9 GB/s on 2 MiB ones, one thread),
    and SmolLM2's quantized layer weights are each smaller than one huge page."""
    align = _ALIGN // torch.empty((), dtype=dtype).element_size()
    offsets, total = {}, 0
    for name, views in shapes.items():
        offsets[name] = []
        for shape in views:
            offsets[name].append(total)
            total += -(-math.prod(shape) // align) * align
    flat = torch.empty(total, dtype=dtype, device=device)
    if flat.device.type == "cpu":
        memory.ask_for_huge_pages(flat)
    return {name: [flat[o:o + math.prod(shape)].view(shape) for o, shape in zip(offsets[name], shapes[name])]
            for name in shapes}


QUANT_MODES = ("keep", "dequantize")


def parse_quant(mode, quantize):
    """Check the quantization arguments; returns quantize as a format name (or None)."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quant {mode!r}; choose 'keep' (GGUF blocks stay quantized) or 'dequantize'")
    if quantize is None:
        return None
    name = quantize.upper() if isinstance(quantize, str) else None
    if name not in quant.QUANTIZE_TO:
        raise ValueError(f"unknown quantize format {quantize!r}; choose one of "
                         f"{', '.join(repr(f.lower()) for f in quant.QUANTIZE_TO)} (or None)")
    if mode == "dequantize":
        raise ValueError(f"quantize={quantize!r} with quant='dequantize': pick one")
    return name


def weight_bytes(weights):
    """{format or dtype name: bytes} over the distinct tensors of a weights dict."""
    out = {}
    for t in {id(t): t for t in weights.values()}.values():
        parts = t.parts if isinstance(t, quant.QuantizedStack) else (t,)
        for p in parts:
            kind = p.fmt.name if isinstance(p, quant.QuantizedTensor) else str(p.dtype).replace("torch.", "")
            out[kind] = out.get(kind, 0) + (p.nbytes if isinstance(p, quant.QuantizedTensor)
                                            else p.numel() * p.element_size())
    return out


class Model:
    """A loaded model: `generate`, `chat`, `logits`, plus `tokenizer` and `config`."""

    def __init__(self, net, tokenizer, native=False):
        """native: the model runs native ops (the extension is built), so its CPU decode step can be
        replayed as a native plan (FUSELM_CPU_GRAPHS=0 runs it eagerly)."""
        self.net = net
        self.config = net.config
        self.tokenizer = tokenizer
        self.device = net.device
        self.dtype = net.dtype
        self.last_stats = None
        self._engine, self._engine_lock = None, threading.Lock()
        # decode steps replay a CUDA graph on GPUs; FUSELM_CUDA_GRAPHS=0 runs them eagerly (debugging)
        # (not under tensor parallelism: a replayed step would skip announcing it to the other ranks)
        alone = getattr(net, "shard", None) is None
        self.use_cuda_graph = (alone and self.device.type == "cuda"
                               and os.environ.get("FUSELM_CUDA_GRAPHS", "1") != "0")
        self.use_cpu_graph = (alone and native and self.device.type == "cpu"
                              and os.environ.get("FUSELM_CPU_GRAPHS", "1") != "0")

    @classmethod
    def load(cls, source, dtype=None, device=None, backend="auto", quant="keep", quantize=None, progress=True,
             tp=1):
        args = dict(dtype=dtype, device=device, backend=backend, quant=quant, quantize=quantize, progress=False)
        device = parse_device(device)
        dtype = parse_dtype(dtype) or default_dtype(device)
        ops.check_backend_name(backend)
        quantize = parse_quant(quant, quantize)
        ckpt = open_checkpoint(source)
        if tp == 1:
            return cls._load(ckpt, dtype, device, backend, quant, quantize, progress)
        from . import tp as tensor_parallel
        tensor_parallel.plan(ckpt.config, tp, 0)  # a bad split fails before any process starts
        rank, local_rank, group = tensor_parallel.join(tp, source, args, device)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        try:
            return cls._load(ckpt, dtype, device, backend, quant, quantize, progress and rank == 0,
                             tensor_parallel.plan(ckpt.config, tp, rank), group)
        except Exception:  # every rank fails alike (the same checks): stop the group
            tensor_parallel.abort(group)
            raise

    @classmethod
    def _load(cls, ckpt, dtype, device, backend, quant, quantize, progress, shard=None, group=None):
        """load() on one process, of the whole model or (tensor parallelism) of rank shard's part."""
        # fail now, not mid-generation, if a backend cannot run here; build the native
        # extension now too, so its one-time compile is not timed as generation
        backends = backends_for(backend, device)
        resolved = {op: ops.resolve(op, backends[op], device) for op in OPS
                    if ops.implementation(op, backends[op], device)}
        if "native" in resolved.values():
            from . import native
            native.build()
        # quantized matmuls: native's CPU kernels (tiles) and Triton's (planes; GPUs, or the interpreter)
        keep = quant == "keep" and resolved["linear"] in ("native", "triton")
        if quant == "keep" and not keep:
            ops.log.warning("fuselm: linear runs on backend %r on %s, which has no quantized matmul: any GGUF "
                            "blocks are dequantized to %s at load", resolved["linear"], device.type, str(dtype)[6:])
        if quantize is not None and not keep:
            raise ValueError(f"quantize={quantize.lower()!r} needs quantized kernels (native on CPUs, triton), but "
                             f"linear runs on backend {resolved['linear']!r} on {device.type}")
        tokenizer = ckpt.tokenizer()
        layout = ("tiles" if resolved["linear"] == "native" else "planes") if keep else None
        weights = load_weights(ckpt, dtype, device, progress, keep=keep, quantize=quantize, layout=layout,
                               shard=shard)
        if resolved["linear"] == "native" and backend == "auto":
            from . import tuning
            tuning.prepare({n: w for n, w in weights.items() if n not in ("embed", "pos_embed")})
        if layout == "tiles" and any(isinstance(w, QuantizedTensor) for w in weights.values()):
            ops.log.info("fuselm: quantized matmuls on the %s path (%s)", torch.ops.fuselm.quant_isa(),
                         "64+ rows: dequantized into torch's GEMM" if torch.ops.fuselm.quant_isa() == "avx512vnni"
                         else "the integer kernel at every row count")
        net = Transformer(ckpt.config, weights, backends, device, dtype, shard)
        if shard is not None:
            from . import tp as tensor_parallel
            if shard.rank > 0:
                tensor_parallel.serve(net)  # until rank 0 stops: this process exists to serve it
                sys.exit(0)
            net = tensor_parallel.Leader(net, group)
        model = cls(net, tokenizer, native="native" in resolved.values())
        if progress:
            model._print_sizes(weights)
        return model

    def _print_sizes(self, weights):
        c = self.config
        sizes = weight_bytes(weights)
        kv = self.kv_bytes_per_token
        per_token = self.net.bytes_per_token()
        print(f"fuselm: {c.arch} {c.num_layers} layers, hidden {c.hidden_size}, weights "
              f"{sum(sizes.values()) / 2**20:.1f} MiB ("
              + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1]))
              + f"), {per_token / 2**20:.1f} MiB read per token; activations {str(self.dtype)[6:]} on {self.device}; "
              f"KV cache {kv / 2**10:.1f} KiB/token, {kv * c.context / 2**20:.1f} MiB "
              f"for the full {c.context}-token context{self.config.context_note()}", file=sys.stderr)

    def logits(self, input_ids):
        """float32 logits [B, S, V] of a full forward pass over input_ids [B, S] (or [S])."""
        ids = torch.as_tensor(input_ids, device=self.device)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be integer ids of shape [B, S] with S >= 1, got {tuple(ids.shape)}")
        if ids.shape[1] > self.config.context:
            raise ValueError(f"input of {ids.shape[1]} tokens is longer than the model's context "
                             f"({self.config.context}{self.config.context_note()})")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids must be in [0, {self.config.vocab_size})")
        with torch.inference_mode():
            return self.net.forward(ids.long())

    @property
    def kv_bytes_per_token(self):
        c = self.config
        return KVPool.bytes_per_token(c.num_layers, self.net.kv_heads, c.head_dim, self.dtype)  # this rank's

    def engine(self, **kwargs):
        """A new serving engine on this model (fuselm.Engine's arguments)."""
        from .engine import Engine
        return Engine(self, **kwargs)

    def close(self):
        """Stop the default engine's background loop and, under tensor parallelism, the other ranks
        (they also stop when this process exits). The model cannot run afterwards."""
        with self._engine_lock:
            if self._engine is not None and self._engine.running:
                self._engine.stop()
        if getattr(self.net, "shard", None) is not None:
            self.net.close()

    def default_engine(self):
        """The engine generate and chat submit to, made on first use (once, whichever thread asks)."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = self.engine()
        return self._engine

    def generate(self, prompt, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                 seed=None, stop=None, stream=False, stop_token_ids=(), ignore_eos=False):
        """Complete one prompt (-> str) or a list of prompts (-> list[str]); greedy by default.
        stream=True (one prompt) yields the text piece by piece instead. The prompts run as
        requests on the model's engine (default_engine)."""
        from .generate import generate
        return generate(self, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, min_p=min_p, seed=seed, stop=stop, stream=stream,
                        stop_token_ids=stop_token_ids, ignore_eos=ignore_eos)

    def chat(self, messages, **kwargs):
        """Reply to chat messages [{"role": ..., "content": ...}] with the model's chat template."""
        from .generate import generate
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        # the template already wrote the special tokens (BOS, role markers) as text
        return generate(self, text, add_special_tokens=False, **kwargs)
