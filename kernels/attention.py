"""Prefill flash attention: causal (bottom-right aligned) or not, GQA/MQA, any length; dense or paged K/V.

    out[b, i, h] = sum_j softmax_j(q[b, i, h] . k[b, j, h // G] * scale) v[b, j, h // G]

with G = Hq // Hkv query heads per KV head. Causal: query i sees keys
j <= i + Sk - Sq (queries follow a cached prefix of Sk - Sq keys). Left
padding: with kv_start [B], row b also skips keys j < kv_start[b] (what lies
there is never read into the output). A query that sees no key outputs zeros.
Same semantics as runtime/reference.py.

Paged K/V (`paged_attention`, the serving engine's cache): pools
[num_blocks, P, Hkv, D] shared by all rows, block tables [B, M] int32 and
seqlens [B]. Row b has L_b = seqlens[b] keys,

    k[b, j] = k_pool[block_tables[b, j // P], j % P]     (the same for v),

and the Sq queries are its last Sq tokens: query i sits at position
L_b - Sq + i and, causal, sees keys j <= i + L_b - Sq (bottom-right aligned
per row; a chunk after a cached prefix, Sq = L_b without one). The kernel is
the dense one with PAGED set: Sk becomes L_b read from seqlens, and each tile
looks its keys' rows up in the table (`page_slots`, any P including 1 and
odd sizes) instead of stepping a pointer; the tile and softmax code is shared.
Table entries and pool slots at positions >= L_b are never read, so they may
hold anything (NaN too). The launch (grid, tiles, autotuning key) depends on
the shapes only, Sk = M * P, never on the seqlens values.

Flash attention (FlashAttention 2, the Triton fused-attention tutorial): each
program owns BLOCK_M query rows and streams K/V in BLOCK_N tiles, keeping an
online softmax in fp32 (running max m, running sum l, unnormalised output
acc), so the [Sq, Sk] score matrix never reaches memory. exp2 replaces exp
with log2(e) folded into the scale. Causal programs run two stages: key tiles
every row of the block sees completely (no mask), then the few tiles on the
diagonal (mask applied); tiles above the diagonal are never loaded. With
kv_start the key loop begins at the tile holding kv_start[b]: tiles wholly in
the padding are never loaded, and that first tile is masked like a diagonal one.

GQA: a program's BLOCK_M rows are (position, head) pairs of all G query heads
that share one KV head (row r = position * G + head-in-group), so each K/V
tile is loaded once for the whole group instead of once per query head. This
pays most for short Sq (chunked prefill), where G heads fill a block that one
head alone would leave mostly empty.

Head dims that are not powers of two (80, 96) run in a BLOCK_D = 128 tile with
the extra columns masked to zero on load and never stored (the dots do 1.3-1.6x
the useful work). Queries that see no key (causal with Sq > Sk) output zeros;
a NaN in a query row makes that output row NaN and touches no other row.

Work: FLOPs = 4 * B * Hq * Sq * Sk * D (two matmuls; about half that when
causal with Sq == Sk). Bytes: read q and write out once (2 * B*Sq*Hq*D*e),
read K and V once per BLOCK_M-row block of a head group
(2 * B*Hkv*Sk*D*e * ceil(Sq*G / BLOCK_M), about halved when causal),
e = element size; with kv_start, Sk counts only the keys from the tile holding
kv_start[b] on, in the FLOPs too. Paged: Sk is L_b per row (causal: the
prefix in full plus about half the chunk), the same K/V bytes (a key row is D
contiguous elements wherever its block lies) plus BLOCK_N int32 table entries
per K/V tile, 4 / (2 * D * P * e) of the K/V bytes from memory (the P keys of
a block share one entry). For D >= 64 and Sq >= 128 that is far above
a GPU's FLOP:byte ratio, so the kernel is bound by tensor-core throughput.

Inputs may be strided views (e.g. q/k/v sliced from a packed qkv tensor): all
four strides of each tensor go to the kernel, nothing is copied. The output is
a fresh contiguous [B, Sq, Hq, D] tensor in q's dtype.
"""
import os

import torch
import triton
import triton.language as tl

from .decode import page_slots
from .version import TRITON

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256  # q, acc and a K/V tile of BLOCK_D columns live in registers / shared memory
# The dense address scheme and a few tiles below depend on triton's version (3.7 and 3.8 get 3.6's
# choices, unchecked).
# Dense K/V addresses. Triton 3.9 compiles [BLOCK_D, BLOCK_N] pointer tensors stepped one tile per
# iteration in 100-250 registers without spills. Triton 3.6 keeps those loop-carried tensors in
# registers: nearly every tile reached 255 registers and spilled (up to 1.4 KB of stack per thread),
# so there each tile forms its addresses from the [BLOCK_N] key offsets and the [BLOCK_D] columns,
# as the paged kernel does, which compiles most tiles without spills. That form also runs on 3.9, but
# there it moves a few of the tiles below to 255 registers and spills, so 3.9 keeps stepping.
STEP_POINTERS = TRITON >= (3, 9)


@triton.jit
def _attn_tile(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_n, pos, d_ok, kv_lo, seqlen_k, diag, qk_scale,
    Table_row, stride_tm, stride_kb, stride_ks, stride_vb, stride_vs,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    STEP_PTRS: tl.constexpr,
):
    """One online-softmax step over the key tile [start_n, start_n + BLOCK_N); keys < kv_lo are padding.

    With STEP_PTRS, k_ptrs/v_ptrs point at the tile's K^T [BLOCK_D, BLOCK_N] and V [BLOCK_N, BLOCK_D]
    elements (the caller steps them). Otherwise they point at the head's columns only ([BLOCK_D, 1],
    [1, BLOCK_D]) and each key's row is added here: key j's (dense), or with PAGED the block and
    slot the row's block table (Table_row) gives, the one place the paged kernel differs."""
    cols = start_n + offs_n                                               # [BLOCK_N]
    if PAGED:  # entries past seqlen_k are never read: they may point anywhere
        blocks, slots = page_slots(Table_row, stride_tm, cols, cols < seqlen_k, PAGE_SIZE)
        k_ptrs = k_ptrs + blocks[None, :] * stride_kb + slots[None, :] * stride_ks
        v_ptrs = v_ptrs + blocks[:, None] * stride_vb + slots[:, None] * stride_vs
    elif not STEP_PTRS:  # int64: j * stride may pass 2^31 in long packed-qkv views
        k_ptrs = k_ptrs + cols.to(tl.int64)[None, :] * stride_ks
        v_ptrs = v_ptrs + cols.to(tl.int64)[:, None] * stride_vs
    if MASKED:  # padding is never loaded: NaN there must not reach p @ v
        n_ok = (cols >= kv_lo) & (cols < seqlen_k)
        k = tl.load(k_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    elif PAD_D:
        k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if UPCAST:  # the interpreter multiplies bf16 bit patterns in tl.dot (triton issue 11584)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    # scale before masking: a negative scale must not turn the -inf mask into +inf
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale          # [BLOCK_M, BLOCK_N] log2 units
    if MASKED:
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= pos[:, None] + diag)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))                                # [BLOCK_M]
    m_ref = m_new
    if MASKED:
        # a row that has seen no key yet keeps m = -inf; subtract 0 so exp2 gives 0, not NaN
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)                                    # rescales the old state
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)   # [BLOCK_M, BLOCK_D] fp32
    return acc, l_i, m_new


# Lengths vary per call: specialising on them (== 1, % 16) would only multiply compilations.
@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "group", "rows_bucket", "keys_bucket", "family"])
def _attn_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, O_ptr, KvStart_ptr, Seqlens_ptr, Table_ptr,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,   # k [B, Sk, Hkv, D]; PAGED: pool [blocks, PAGE_SIZE, Hkv, D]
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_tb, stride_tm,                         # block tables [B, M] (PAGED only)
    seqlen_q, seqlen_k, group, qk_scale,
    rows_bucket, keys_bucket, family,  # autotune keys only (bucketed lengths, GPU family), unused in the body
    CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    STEP_PTRS: tl.constexpr,
):
    """Grid (row blocks, Hkv, B): one program = BLOCK_M (position, head) rows of one head group.

    PAGED: row b has seqlens[b] keys (clamped to [0, seqlen_k = M * PAGE_SIZE]), key j at
    K[block_tables[b, j // PAGE_SIZE], j % PAGE_SIZE]; the queries are its last seqlen_q positions."""
    pid_m = tl.program_id(0)
    if CAUSAL:  # the longest rows (most key tiles) first, so short ones fill the tail of the launch
        pid_m = tl.num_programs(0) - 1 - pid_m
    hkv = tl.program_id(1).to(tl.int64)  # int64: head * stride may pass 2^31 in [B, H, S, D] views
    b = tl.program_id(2).to(tl.int64)
    PAD_D: tl.constexpr = BLOCK_D != HEAD_D

    start_row = pid_m * BLOCK_M
    rows = start_row + tl.arange(0, BLOCK_M)                             # [BLOCK_M]
    pos = rows // group                                                  # query position
    head = hkv * group + rows % group                                    # query head (int64)
    row_ok = rows < seqlen_q * group
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    offs_n = tl.arange(0, BLOCK_N)

    q_ptrs = (Q_ptr + b * stride_qb + pos.to(tl.int64)[:, None] * stride_qs
              + head[:, None] * stride_qh + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)
    Table_row = Table_ptr + b * stride_tb
    if STEP_PTRS:  # stepped one tile at a time below
        k_ptrs = (K_ptr + b * stride_kb + hkv * stride_kh
                  + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd)  # K^T tile [BLOCK_D, BLOCK_N]
        v_ptrs = (V_ptr + b * stride_vb + hkv * stride_vh
                  + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd)  # V tile [BLOCK_N, BLOCK_D]
    else:  # the head's columns; each tile adds its keys' rows (_attn_tile)
        k_ptrs = K_ptr + hkv * stride_kh + offs_d[:, None] * stride_kd              # [BLOCK_D, 1]
        v_ptrs = V_ptr + hkv * stride_vh + offs_d[None, :] * stride_vd              # [1, BLOCK_D]
        if not PAGED:
            k_ptrs += b * stride_kb
            v_ptrs += b * stride_vb
    if PAGED:  # row b's keys: its seqlens entry, read through its block table
        seqlen_k = tl.minimum(tl.maximum(tl.load(Seqlens_ptr + b).to(tl.int32), 0), seqlen_k)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # key tiles [full_lo, full_end) are visible to every row of the block; [full_end, end) need the
    # causal mask; keys before kv_lo are left padding
    diag = seqlen_k - seqlen_q  # query at position i sees keys j <= i + diag
    if CAUSAL:
        first_pos = start_row // group
        last_pos = tl.minimum((start_row + BLOCK_M - 1) // group, seqlen_q - 1)
        full_end = tl.maximum(first_pos + diag + 1, 0) // BLOCK_N * BLOCK_N
        end = tl.minimum(tl.maximum(last_pos + diag + 1, 0), seqlen_k)
    else:
        full_end = seqlen_k // BLOCK_N * BLOCK_N
        end = seqlen_k

    kv_lo = 0   # without padding: the plain two stages from key 0
    lead = 0    # the tile holding kv_lo: the first one loaded
    full_lo = 0
    if HAS_KV_START:
        kv_lo = tl.minimum(tl.maximum(tl.load(KvStart_ptr + b).to(tl.int32), 0), seqlen_k)
        lead = kv_lo // BLOCK_N * BLOCK_N
        full_lo = (kv_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        if STEP_PTRS:  # tiles wholly in the padding are never loaded
            k_ptrs += lead.to(tl.int64) * stride_ks
            v_ptrs += lead.to(tl.int64) * stride_vs
        # kv_lo cuts into a tile below the diagonal: mask its padding (every row sees the rest of it)
        if lead < tl.minimum(full_lo, full_end):
            acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, lead, offs_n, pos, d_ok, kv_lo,
                                       seqlen_k, diag, qk_scale, Table_row, stride_tm, stride_kb, stride_ks, stride_vb,
                                       stride_vs, True, False, PAD_D, UPCAST, DOT_PRECISION, PAGED, PAGE_SIZE,
                                       STEP_PTRS)
            if STEP_PTRS:
                k_ptrs += BLOCK_N * stride_ks
                v_ptrs += BLOCK_N * stride_vs
    for start_n in range(full_lo, full_end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_n, pos, d_ok, kv_lo,
                                   seqlen_k, diag, qk_scale, Table_row, stride_tm, stride_kb, stride_ks, stride_vb,
                                   stride_vs, False, CAUSAL, PAD_D, UPCAST, DOT_PRECISION, PAGED, PAGE_SIZE,
                                   STEP_PTRS)
        if STEP_PTRS:
            k_ptrs += BLOCK_N * stride_ks
            v_ptrs += BLOCK_N * stride_vs
    # the pointers now sit at max(full_end, lead) whichever stages ran
    for start_n in range(tl.maximum(full_end, lead), end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_n, pos, d_ok, kv_lo,
                                   seqlen_k, diag, qk_scale, Table_row, stride_tm, stride_kb, stride_ks, stride_vb,
                                   stride_vs, True, CAUSAL, PAD_D, UPCAST, DOT_PRECISION, PAGED, PAGE_SIZE,
                                   STEP_PTRS)
        if STEP_PTRS:
            k_ptrs += BLOCK_N * stride_ks
            v_ptrs += BLOCK_N * stride_vs

    # rows that saw no key have acc = 0 and l = 0 -> output 0; a NaN row stays NaN
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = (O_ptr + b * stride_ob + pos.to(tl.int64)[:, None] * stride_os
              + head[:, None] * stride_oh + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(O_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# CUDA tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) per GPU family and padded head dim, chosen
# so that none spills registers or overflows shared memory (tests/test_triton_compile.py compiles
# them for sm_80 and sm_90); few per head dim because every new (head dim, causal, dtype) compiles
# each of them once. Family 90: Hopper-class parts (228 KB of shared memory, wgmma keeps fewer
# values in registers); family 80: Ampere and the rest (A100: 164 KB; sm_86/89/120: 99 KB).
TILES = {
    90: {
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3)],
        128: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3)],
        256: [(64, 64, 8, 2), (64, 32, 8, 2)],
    },
    80: {
        64: [(64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3)],
        128: [(64, 64, 8, 3), (64, 32, 4, 3), (32, 32, 4, 3)],
        256: [(64, 32, 8, 2), (32, 32, 4, 2)],
    },
}
# The kv_start and paged variants keep a few more values live (kv_start and the first tile; the
# table row and a 64-bit address per key); these tiles, at the register limit already, then spill
# on sm_90 (bf16 and fp16), so their launches skip them.
VARIANT_SPILLS = {90: {128: {(128, 128, 8, 3)}, 256: {(64, 64, 8, 2)}}}
# Before triton 3.9 (checked on 3.6) that sm_90 tile spills in the dense kernel too (48 bytes of stack
# per thread at 255 registers, bf16, head dim 80), so there every launch skips it.
OLD_TRITON_SPILLS = {} if TRITON >= (3, 9) else {90: {128: {(128, 128, 8, 3)}}}
# fp32 uses exact fp32 products (input_precision="ieee", no tensor cores): a correctness path
# whose big tiles compile for a minute and spill, so it gets one small tile per head dim and no
# tuning (the smallest that does not spill on each family).
FP32_TILES = {
    90: {64: (16, 16, 4, 2), 128: (16, 16, 4, 2), 256: (16, 16, 4, 2)},
    80: {64: (16, 16, 4, 2), 128: (32, 16, 4, 2), 256: (32, 16, 8, 2)},
}
# The paged fp32 kernel on sm_90 spills 8 bytes (at 80 registers) with 2 stages for some block
# sizes; 3 stages spill for none.
PAGED_FP32_TILES = {**FP32_TILES, 90: {64: (16, 16, 4, 3), 128: (16, 16, 4, 3), 256: (16, 16, 4, 3)}}


def _family():
    """90 on Hopper-class GPUs (sm_90 to sm_10x), 80 on the others: picks the tile table."""
    arch = triton.runtime.driver.active.get_current_target().arch  # of the current device
    return 90 if 90 <= arch < 120 else 80


def _tiles_for(family, block_d, variant=False):
    """The tiles of a family and head dim; variant: the kv_start or paged kernel."""
    padded_d = min(t for t in TILES[family] if t >= block_d)
    skip = OLD_TRITON_SPILLS.get(family, {}).get(padded_d, set())
    if variant:
        skip = skip | VARIANT_SPILLS.get(family, {}).get(padded_d, set())
    return [t for t in TILES[family][padded_d] if t not in skip]


def _configs():
    shapes = {t for family in TILES.values() for tiles in family.values() for t in tiles}
    shapes |= {t for table in (FP32_TILES, PAGED_FP32_TILES) for family in table.values() for t in family.values()}
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in sorted(shapes)]


def _prune(configs, named_args, **kwargs):
    """The tiles of this GPU, head dim and variant (BLOCK_M no taller than the rows need), or the fp32 tile."""
    args = {**named_args, **kwargs}
    family = args["family"]
    if args["DOT_PRECISION"] == "ieee":
        fp32 = (PAGED_FP32_TILES if args["PAGED"] else FP32_TILES)[family]
        wanted = [fp32[min(t for t in fp32 if t >= args["BLOCK_D"])]]
    else:
        tiles = _tiles_for(family, args["BLOCK_D"], args["HAS_KV_START"] or args["PAGED"])
        short = [t for t in tiles if t[0] <= max(args["rows_bucket"], 32)]
        wanted = short or [min(tiles)]
    return [c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]


_attn_fwd_tuned = triton.autotune(
    # the kv_start and paged variants tune apart, over their own tiles
    configs=_configs(),
    key=["rows_bucket", "keys_bucket", "family", "HEAD_D", "CAUSAL", "HAS_KV_START", "PAGED"],
    prune_configs_by={"early_config_prune": _prune},
)(_attn_fwd_kernel)

# Under the interpreter (CPU): one small fixed tile; autotuning there would only measure numpy.
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}


def _bucket(n):
    """Lengths bucketed to powers of two (16 .. 16384) so autotuning runs once per bucket."""
    return min(max(triton.next_power_of_2(n), 16), 16384)


def attention(q, k, v, causal=True, scale=None, kv_start=None):
    """softmax(q k^T * scale) v. q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> [B, Sq, Hq, D] in q.dtype.

    kv_start [B] int (optional): row b skips its first kv_start[b] keys. Shapes, dtypes and
    devices were checked by fuselm.ops.attention.
    """
    return _attention(q, k, v, causal, scale, kv_start=kv_start)


def paged_attention(q, k_pool, v_pool, block_tables, seqlens, causal=True, scale=None):
    """Attention for queries after a cached prefix, keys read through block tables.

    q [B, Sq, Hq, D] are the last Sq of row b's seqlens[b] tokens (bottom-right causal per row);
    pools [num_blocks, block_size, Hkv, D] (any strides), block_tables [B, M] int32, seqlens [B]
    int -> [B, Sq, Hq, D] in q.dtype. Key j of row b is pool[block_tables[b, j // block_size],
    j % block_size]; the launch (grid, tiles) depends on the shapes only (Sk = M * block_size).
    Checked by fuselm.ops.paged_attention.
    """
    return _attention(q, k_pool, v_pool, causal, scale, seqlens=seqlens, block_tables=block_tables)


def _attention(q, k, v, causal, scale, kv_start=None, seqlens=None, block_tables=None):
    """Both launchers: dense k/v [B, Sk, Hkv, D], or pools read through block_tables [B, M] with seqlens [B]."""
    B, Sq, Hq, D = q.shape
    paged = block_tables is not None
    Sk, Hkv = (block_tables.shape[1] * k.shape[1] if paged else k.shape[1]), k.shape[2]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"triton attention supports head dims up to {MAX_HEAD_DIM}, got {D}")
    if max(B, Hkv) > 65535:
        raise ValueError(f"triton attention launches one program per (batch, kv head); got B={B}, Hkv={Hkv} "
                         "(each must be <= 65535)")
    group = Hq // Hkv
    out = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)   # [B, Sq, Hq, D]
    if out.numel() == 0:
        return out
    if paged and Sk == 0:  # no block in the table, or blocks of no key: no query sees a key
        return out.zero_()
    scale = D ** -0.5 if scale is None else float(scale)
    if kv_start is not None and kv_start.dtype not in (torch.int32, torch.int64):
        kv_start = kv_start.to(torch.int32)
    if paged and seqlens.dtype not in (torch.int32, torch.int64):
        seqlens = seqlens.to(torch.int32)
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    # pointers a variant never reads: q stands in
    starts = q if kv_start is None else kv_start.contiguous()
    lengths, table = (seqlens.contiguous(), block_tables) if paged else (q, q)
    args = (
        q, k, v, out, starts, lengths, table, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *(block_tables.stride() if paged else (0, 0)),
        Sq, Sk, group, scale * LOG2E, _bucket(Sq * group), _bucket(Sk),
    )
    meta = dict(
        CAUSAL=bool(causal), HAS_KV_START=kv_start is not None, HEAD_D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        UPCAST=interpreting and q.dtype == torch.bfloat16,
        # fp32 inputs get true fp32 products; tf32 would miss the 1e-5 tolerance
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        PAGED=paged, PAGE_SIZE=k.shape[1] if paged else 1, STEP_PTRS=STEP_POINTERS and not paged,
    )
    if interpreting:
        grid = (triton.cdiv(Sq * group, INTERPRET_CONFIG["BLOCK_M"]), Hkv, B)
        _attn_fwd_kernel[grid](*args, 0, **meta, **INTERPRET_CONFIG)  # family 0: no tile table here
    else:
        grid = lambda cfg: (triton.cdiv(Sq * group, cfg["BLOCK_M"]), Hkv, B)  # noqa: E731
        with torch.cuda.device(q.device):  # triton launches on the current device
            _attn_fwd_tuned[grid](*args, _family(), **meta)
    return out
