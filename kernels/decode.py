"""Decode attention over a KV cache, static or paged: split-KV flash-decoding in Triton.

For each sequence b and query head h (one new token per sequence):

    out[b, h] = sum_{S_b <= j < L_b} softmax_j(scale * q[b, h] . k[b, j, h // G]) v[b, j, h // G]

with L_b = seqlens[b], S_b = kv_start[b] (left padding; 0 when not given),
G = Hq // Hkv query heads per KV head (GQA; G = 1 is MHA, Hkv = 1 is MQA).
A row that sees no key (L_b <= S_b) outputs zeros.

Paged cache (`paged_decode_attention`): pools [num_blocks, P, Hkv, D] shared
by all rows and block tables [B, M] (int32 block ids), with

    k[b, j] = k_pool[block_tables[b, j // P], j % P]     (the same for v), S_b = 0,

so row b's keys may lie in any blocks, shared with other rows, and P may be any
size (1, 5, 16, ...). The kernel is the dense one with PAGED set: only the K/V
addresses differ, computed per key in each tile from the table entry
(`page_slots`) instead of stepped along a row. The table and the pools are
read only at positions j < L_b, so unused entries may hold any id and unused
slots any value (NaN too). The launch is that of a dense cache of
Smax = M * P positions.

One query per sequence is too little work to fill a GPU, so the cache length is
cut into chunks of CHUNK positions and (split, kv head, batch) programs run in
parallel (`_decode_split_kernel`). Each program loads every K/V tile of its
chunk once for the whole head group, runs an online softmax (fp32 running max
and sum, exp2 with log2(e) folded into the scale) and writes a normalized
partial output o_s [G, D] and its log-sum-exp lse_s (base 2, fp32). The combine
kernel then forms

    out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),   M = max_s lse_s.

Chunks that start at or past L_b, or end at or before S_b, exit without
writing; the combine reads only the splits in between. Inside a chunk the key
loop starts at the tile holding S_b, so padding costs no K/V reads. When the
whole cache fits in one chunk the split kernel normalizes and writes the output
itself (one launch).

CHUNK depends only on Smax (paged: M * P) and the device, never on the batch size or on the
values in seqlens, kv_start or the block tables: the launch shape is static (CUDA-graph
capturable, no host sync) and a row's reduction order does not depend on the rest of the batch
(batch invariance).

Head group and tl.dot: the scores q K^T for a group are a [G, BLOCK_N] tile and
p V a [G, D] tile. We always use tl.dot with the group padded to a power of two
>= 16 (padded rows load zeros and are never stored). Decode is memory-bound
(~1 FLOP per byte of cache per query head) and tensor cores have two orders of
magnitude of headroom, so the padding costs nothing measurable, while a
broadcast multiply-sum would hold a [G, BLOCK_N, D] fp32 product in registers.

Bytes moved (the limit): K and V read once, sum_b (L_b - S_b) * Hkv * D * 2 * elt
(S_b rounded down to a tile),
plus q and out (B * Hq * D * elt each); the partials add B * Hq * splits *
(D + 1) * 4 written and read once, small next to the cache at long context.
Paged: the same K/V bytes (each key row is D contiguous elements wherever its
block lies), plus the table entries each (split, kv head) program reads,
Hkv * sum_b ceil(L_b / P) * 4 bytes (the P keys of a block share one int32):
4 / (2 * D * P * elt) of the K/V bytes, 1.6% at P = 1, D = 64 in bf16.
FLOPs: 4 * sum_b (L_b - S_b) * Hq * D.
"""
import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _visible_range(Seqlens_ptr, KvStart_ptr, b, SMAX, HAS_KV_START: tl.constexpr):
    """(kv_lo, seqlen): row b sees keys [kv_lo, seqlen); a row that sees none gets (0, 0), like seqlens 0."""
    # clamped to [0, Smax] as the reference's mask does: never read past the cache
    seqlen = tl.minimum(tl.maximum(tl.load(Seqlens_ptr + b).to(tl.int32), 0), SMAX)
    kv_lo = tl.zeros_like(seqlen)
    if HAS_KV_START:
        kv_lo = tl.maximum(tl.load(KvStart_ptr + b).to(tl.int32), 0)
        seqlen = tl.where(kv_lo < seqlen, seqlen, 0)
        kv_lo = tl.minimum(kv_lo, seqlen)
    return kv_lo, seqlen


@triton.jit
def page_slots(Table_ptr, stride_tm, cols, valid, PAGE_SIZE: tl.constexpr):
    """Where key positions `cols` [BLOCK_N] of one row live in a paged pool: (block, slot) =
    (block_table[cols // PAGE_SIZE], cols % PAGE_SIZE), the block int64 (block * stride may pass 2^31).
    Table_ptr points at the row's block table; positions not `valid` read no entry (block 0, never
    dereferenced: their K/V loads are masked too), so unused entries may hold anything."""
    blocks = tl.load(Table_ptr + (cols // PAGE_SIZE) * stride_tm, mask=valid, other=0)
    return blocks.to(tl.int64), cols % PAGE_SIZE


@triton.jit
def _decode_split_kernel(
    Q_ptr, K_ptr, V_ptr, Seqlens_ptr, KvStart_ptr, Table_ptr, Out_ptr, OPart_ptr, Lse_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,   # caches [B, Smax, Hkv, D]; pools [blocks, PAGE_SIZE, Hkv, D]
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_tb, stride_tm,                         # block tables [B, M] (PAGED only)
    stride_ob, stride_oh,                         # Out [B, Hq, D], last dim contiguous
    stride_pb, stride_ph, stride_ps,              # OPart [B, Hq, splits, D], last dim contiguous
    stride_lb, stride_lh,                         # Lse [B, Hq, splits], last dim contiguous
    qk_scale, GROUP, SMAX, HEAD_DIM: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, HAS_KV_START: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    # UPCAST: bf16 dot operands go to fp32 under the interpreter only (its bf16 tl.dot multiplies
    # raw bit patterns). DOT_PRECISION: "ieee" keeps fp32 caches out of tf32 on the GPU.
    # PAGED: key j of row b is K[block_tables[b, j // PAGE_SIZE], j % PAGE_SIZE] (SMAX = M * PAGE_SIZE);
    # only the K/V addresses differ, computed per tile from the table instead of stepped.
    split = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # int64: b * stride overflows int32 on large caches
    kv_lo, seqlen = _visible_range(Seqlens_ptr, KvStart_ptr, b, SMAX, HAS_KV_START)
    start = split * CHUNK
    if SPLIT:
        if (start >= seqlen) | (start + CHUNK <= kv_lo):  # neutral split: the combine never reads it
            return
    end = tl.minimum(start + CHUNK, seqlen)
    # the first tile loaded holds kv_lo (CHUNK is a multiple of BLOCK_N): padding tiles are skipped
    first = tl.maximum(start, kv_lo // BLOCK_N * BLOCK_N)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_g                                  # query heads of this KV head
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM

    q_ptrs = Q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0)      # [BLOCK_G, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)
    # K^T tile pointers [BLOCK_D, BLOCK_N] and V tile pointers [BLOCK_N, BLOCK_D] at key `first`,
    # stepped one tile per iteration (PAGED: computed per tile from the block table instead)
    k_ptrs = (K_ptr + b * stride_kb + kvh * stride_kh
              + offs_d[:, None] * stride_kd + (first + offs_n)[None, :] * stride_ks)
    v_ptrs = (V_ptr + b * stride_vb + kvh * stride_vh
              + (first + offs_n)[:, None] * stride_vs + offs_d[None, :] * stride_vd)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)          # running max (log2 units)
    l_i = tl.zeros([BLOCK_G], tl.float32)                         # running sum of 2^(s - m)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n in range(first, end, BLOCK_N):
        # keys before kv_lo or past seqlen are never loaded, so garbage (NaN) there cannot leak in
        mask_n = ((n + offs_n) >= kv_lo) & ((n + offs_n) < end)
        if PAGED:
            blocks, slots = page_slots(Table_ptr + b * stride_tb, stride_tm, n + offs_n, mask_n, PAGE_SIZE)
            k_rows = blocks * stride_kb + slots * stride_ks                       # [BLOCK_N] int64
            v_rows = blocks * stride_vb + slots * stride_vs
            k_ptrs = K_ptr + kvh * stride_kh + offs_d[:, None] * stride_kd + k_rows[None, :]
            v_ptrs = V_ptr + kvh * stride_vh + v_rows[:, None] + offs_d[None, :] * stride_vd
        k = tl.load(k_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale              # [BLOCK_G, BLOCK_N]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # -inf only if every score so far is -inf (infinite inputs): subtract 0 so those keys get
        # weight 0, as in the reference's softmax, instead of exp2(-inf + inf) = NaN; NaN and +inf
        # scores still make l_i NaN, as the reference's softmax does
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        p = p.to(V_ptr.dtype.element_ty)  # the PV product runs on the cache dtype, as on the GPU
        if UPCAST:
            p, v = p.to(tl.float32), v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new
        if not PAGED:
            k_ptrs += BLOCK_N * stride_ks
            v_ptrs += BLOCK_N * stride_vs

    mask_gd = mask_g[:, None] & mask_d[None, :]
    if SPLIT:
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l_i = 0: all scores -inf, lse -inf, weight 0
        p_ptrs = OPart_ptr + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :]
        tl.store(p_ptrs, acc, mask=mask_gd)
        tl.store(Lse_ptr + b * stride_lb + heads * stride_lh + split, m_i + tl.log2(l_i), mask=mask_g)
    else:
        # no visible key (seqlen 0) -> zeros; l_i = 0 otherwise (every score -inf) -> NaN like the reference
        acc = acc / tl.where(seqlen > 0, l_i, 1.0)[:, None]
        o_ptrs = Out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, acc.to(Out_ptr.dtype.element_ty), mask=mask_gd)


@triton.jit
def _decode_combine_kernel(
    OPart_ptr, Lse_ptr, Seqlens_ptr, KvStart_ptr, Out_ptr,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    SMAX, HEAD_DIM: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KV_START: tl.constexpr,
):
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    kv_lo, seqlen = _visible_range(Seqlens_ptr, KvStart_ptr, b, SMAX, HAS_KV_START)
    n_splits = (seqlen + CHUNK - 1) // CHUNK                     # splits [kv_lo // CHUNK, n_splits) wrote
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = (offs_s >= kv_lo // CHUNK) & (offs_s < n_splits)
    mask_d = offs_d < HEAD_DIM

    lse = tl.load(Lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))                     # [BLOCK_S], 0 where masked
    o_ptrs = OPart_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :]
    o = tl.load(o_ptrs, mask=mask_s[:, None] & mask_d[None, :], other=0.0)       # [BLOCK_S, BLOCK_D]
    acc = tl.sum(w[:, None] * o, 0)                                              # [BLOCK_D]
    # seqlen 0 -> zeros; a zero sum of weights otherwise (every score -inf) -> NaN like the reference
    out = acc / tl.where(n_splits > 0, tl.sum(w, 0), 1.0)
    tl.store(Out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(Out_ptr.dtype.element_ty), mask=mask_d)


def _rows(t):
    """A [B] integer tensor as the kernels read it: int32 or int64, contiguous."""
    return (t if t.dtype in (torch.int32, torch.int64) else t.to(torch.int32)).contiguous()


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_plan(smax, head_dim, device):
    """(CHUNK, BLOCK_N of 16-bit caches) for a cache of length smax: a function of Smax and the device only.

    On a GPU aim for about half as many splits as there are SMs (batch 1 with 8
    KV heads then gives ~4 programs per SM) but keep chunks >= 256 keys so the
    partial outputs stay small next to the K/V bytes of a chunk. Under the
    interpreter use tiny chunks so small test caches still exercise many splits.
    """
    if device.type == "cuda":
        block_n = 64 if head_dim <= 128 else 32
        target, min_chunk = max(1, _sm_count(device) // 2), 256
    else:
        block_n, target, min_chunk = 16, 4, 16
    chunk = max(min_chunk, triton.cdiv(smax, target))
    return triton.cdiv(chunk, block_n) * block_n, block_n


def decode_attention(q, k_cache, v_cache, seqlens, scale=None, kv_start=None):
    """q [B, Hq, D], caches [B, Smax, Hkv, D] (any strides), seqlens [B], kv_start [B] or None -> [B, Hq, D].

    The output is in q.dtype; row b attends keys [kv_start[b], seqlens[b]).
    """
    return _decode(q, k_cache, v_cache, seqlens, scale, kv_start, None)


def paged_decode_attention(q, k_pool, v_pool, block_tables, seqlens, scale=None):
    """q [B, Hq, D], pools [num_blocks, block_size, Hkv, D] (any strides), block_tables [B, M] int32,
    seqlens [B] -> [B, Hq, D] in q.dtype; row b attends its keys [0, seqlens[b]), key j at
    pool[block_tables[b, j // block_size], j % block_size]. The split plan is that of a dense
    cache of M * block_size positions: a function of the shapes only."""
    return _decode(q, k_pool, v_pool, seqlens, scale, None, block_tables)


def _decode(q, k_cache, v_cache, seqlens, scale, kv_start, block_tables):
    """Both launchers: a dense cache [B, Smax, Hkv, D], or pools read through block_tables [B, M]."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    paged = block_tables is not None
    # the positions a row may have: Smax, or M blocks of block_size keys (shapes, never seqlens values)
    Smax = block_tables.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    group = Hq // Hkv
    scale = D ** -0.5 if scale is None else float(scale)
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if paged and Smax == 0:  # no block in the table, or blocks of no key: no row sees a key
        return out.zero_()
    seqlens = _rows(seqlens)
    has_start = kv_start is not None
    kv_start = _rows(kv_start) if has_start else seqlens  # without kv_start the pointer is never read
    table = block_tables if paged else seqlens            # without a table the pointer is never read
    table_strides = block_tables.stride() if paged else (0, 0)

    chunk, block_n = split_plan(Smax, D, q.device)
    if q.dtype == torch.float32:
        # exact fp32 products run on the FMA units with both operands in registers: 16-key tiles
        # (CHUNK stays a multiple) over 8 warps keep them from spilling (tests/test_triton_compile.py);
        # fp32 tiles take twice the shared memory, so 2 stages
        block_n, warps, stages = 16, 8, 2
    else:  # 3 stages of K/V tiles in flight for 16-bit caches
        warps, stages = 4, 3
    if paged:
        # a 64-bit address per key row and the table entries stay live: at 4 warps (16-bit) or 2
        # stages (fp32) a few cases spill 8-32 bytes on sm_90; 8 warps and 3 stages spill none in
        # the thorough matrix (tests/test_triton_compile.py). Untimed.
        warps, stages = 8, 3
    splits = max(1, triton.cdiv(Smax, chunk))
    block_d = max(16, triton.next_power_of_2(D))
    if splits > 1:
        o_part = torch.empty((B, Hq, splits, D), dtype=torch.float32, device=q.device)
        lse = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
        part_strides = (*o_part.stride()[:3], *lse.stride()[:2])
    else:  # the split kernel writes `out` itself; the partial pointers are never used
        o_part = lse = out
        part_strides = (0,) * 5
    _decode_split_kernel[(splits, Hkv, B)](
        q, k_cache, v_cache, seqlens, kv_start, table, out, o_part, lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *table_strides,
        out.stride(0), out.stride(1), *part_strides,
        scale * LOG2E, group, Smax, D,
        CHUNK=chunk, BLOCK_N=block_n, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d,
        SPLIT=splits > 1, HAS_KV_START=has_start, UPCAST=_interpreting() and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        PAGED=paged, PAGE_SIZE=k_cache.shape[1] if paged else 1,
        num_warps=warps, num_stages=stages,
    )
    if splits > 1:
        block_s = triton.next_power_of_2(splits)
        _decode_combine_kernel[(Hq, B)](
            o_part, lse, seqlens, kv_start, out, *part_strides,
            out.stride(0), out.stride(1),
            Smax, D,
            CHUNK=chunk, BLOCK_S=block_s, BLOCK_D=block_d, HAS_KV_START=has_start,
            num_warps=4 if block_s * block_d <= 8192 else 8,  # the [splits, D] fp32 tile stays in registers
        )
    return out
