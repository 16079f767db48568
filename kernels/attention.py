"""Prefill flash attention: causal (bottom-right aligned) or not, GQA/MQA, any length.

    out[b, i, h] = sum_j softmax_j(q[b, i, h] . k[b, j, h // G] * scale) v[b, j, h // G]

with G = Hq // Hkv query heads per KV head. Causal: query i sees keys
j <= i + Sk - Sq (queries follow a cached prefix of Sk - Sq keys); a query
that sees no key outputs zeros. Same semantics as runtime/reference.py.

Flash attention (FlashAttention 2, the Triton fused-attention tutorial): each
program owns BLOCK_M query rows and streams K/V in BLOCK_N tiles, keeping an
online softmax in fp32 (running max m, running sum l, unnormalised output
acc), so the [Sq, Sk] score matrix never reaches memory. exp2 replaces exp
with log2(e) folded into the scale. Causal programs run two stages: key tiles
every row of the block sees completely (no mask), then the few tiles on the
diagonal (mask applied); tiles above the diagonal are never loaded.

GQA: a program's BLOCK_M rows are (position, head) pairs of all G query heads
that share one KV head (row r = position * G + head-in-group), so each K/V
tile is loaded once for the whole group instead of once per query head. This
pays most for short Sq (chunked prefill), where G heads fill a block that one
head alone would leave mostly empty.

Work: FLOPs = 4 * B * Hq * Sq * Sk * D (two matmuls; about half that when
causal with Sq == Sk). Bytes: read q and write out once (2 * B*Sq*Hq*D*e),
read K and V once per BLOCK_M-row block of a head group
(2 * B*Hkv*Sk*D*e * ceil(Sq*G / BLOCK_M), halved when causal), e = element size.
For D >= 64 and Sq >= 128 this is far above the FLOP:byte ratio of a GPU, so
the kernel is bound by tensor-core throughput.

Inputs may be strided views (e.g. q/k/v sliced from a packed qkv tensor): all
four strides of each tensor go to the kernel, nothing is copied. The output is
a fresh contiguous [B, Sq, Hq, D] tensor in q's dtype.
"""
import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256  # q, acc and a K/V tile of BLOCK_D columns live in registers / shared memory


@triton.jit
def _attn_tile(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_n, pos, d_ok, seqlen_k, diag, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over the key tile [start_n, start_n + BLOCK_N)."""
    cols = start_n + offs_n                                               # [BLOCK_N]
    if MASKED:
        n_ok = cols < seqlen_k
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


@triton.jit
def _attn_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, O_ptr,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    seqlen_q, seqlen_k, group, qk_scale,
    rows_bucket, keys_bucket,  # autotune keys only (bucketed lengths), unused in the body
    CAUSAL: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (row blocks, Hkv, B): one program = BLOCK_M (position, head) rows of one head group."""
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
    k_ptrs = (K_ptr + b * stride_kb + hkv * stride_kh
              + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd)  # K^T tile [BLOCK_D, BLOCK_N]
    v_ptrs = (V_ptr + b * stride_vb + hkv * stride_vh
              + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd)  # V tile [BLOCK_N, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # key tiles [0, full_end) are visible to every row of the block; [full_end, end) need the mask
    diag = seqlen_k - seqlen_q  # query at position i sees keys j <= i + diag
    if CAUSAL:
        first_pos = start_row // group
        last_pos = tl.minimum((start_row + BLOCK_M - 1) // group, seqlen_q - 1)
        full_end = tl.maximum(first_pos + diag + 1, 0) // BLOCK_N * BLOCK_N
        end = tl.minimum(tl.maximum(last_pos + diag + 1, 0), seqlen_k)
    else:
        full_end = seqlen_k // BLOCK_N * BLOCK_N
        end = seqlen_k

    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_n, pos, d_ok,
                                   seqlen_k, diag, qk_scale, False, CAUSAL, PAD_D, UPCAST, DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    for start_n in range(full_end, end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_n, pos, d_ok,
                                   seqlen_k, diag, qk_scale, True, CAUSAL, PAD_D, UPCAST, DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs

    # rows that saw no key have acc = 0 and l = 0 -> output 0; a NaN row stays NaN
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = (O_ptr + b * stride_ob + pos.to(tl.int64)[:, None] * stride_os
              + head[:, None] * stride_oh + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(O_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _configs():
    """Candidate tiles for CUDA; `_prune` drops the ones that do not fit a head dim / length."""
    shapes = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
        (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4),
        (64, 64, 4, 3), (64, 32, 4, 4), (64, 128, 4, 3), (32, 64, 4, 3),
        (128, 64, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _prune(configs, named_args, **kwargs):
    """Big head dims need small tiles (registers, shared memory); short queries need small BLOCK_M."""
    args = {**named_args, **kwargs}
    block_d, rows = args["BLOCK_D"], args["rows_bucket"]
    keep = []
    for c in configs:
        m, n, stages = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
        if block_d > 128 and (m * n > 128 * 64 or stages > 2):
            continue
        if block_d <= 128 and stages < 3:
            continue
        if m > max(rows, 32):
            continue
        keep.append(c)
    return keep


_attn_fwd_tuned = triton.autotune(
    configs=_configs(), key=["rows_bucket", "keys_bucket", "HEAD_D", "CAUSAL"],
    prune_configs_by={"early_config_prune": _prune},
)(_attn_fwd_kernel)

# Under the interpreter (CPU): one small fixed tile; autotuning there would only measure numpy.
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}


def _bucket(n):
    """Lengths bucketed to powers of two (16 .. 16384) so autotuning runs once per bucket."""
    return min(max(triton.next_power_of_2(n), 16), 16384)


def attention(q, k, v, causal=True, scale=None):
    """softmax(q k^T * scale) v. q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> [B, Sq, Hq, D] in q.dtype.

    Shapes, dtypes and devices were checked by fuselm.ops.attention.
    """
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"triton attention supports head dims up to {MAX_HEAD_DIM}, got {D}")
    if max(B, Hkv) > 65535:
        raise ValueError(f"triton attention launches one program per (batch, kv head); got B={B}, Hkv={Hkv} "
                         "(each must be <= 65535)")
    group = Hq // Hkv
    out = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)   # [B, Sq, Hq, D]
    if out.numel() == 0:
        return out
    scale = D ** -0.5 if scale is None else float(scale)
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    args = (
        q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        Sq, Sk, group, scale * LOG2E, _bucket(Sq * group), _bucket(Sk),
    )
    meta = dict(
        CAUSAL=bool(causal), HEAD_D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        UPCAST=interpreting and q.dtype == torch.bfloat16,
        # fp32 inputs get true fp32 products; tf32 would miss the 1e-5 tolerance
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if interpreting:
        grid = (math.ceil(Sq * group / INTERPRET_CONFIG["BLOCK_M"]), Hkv, B)
        _attn_fwd_kernel[grid](*args, **meta, **INTERPRET_CONFIG)
    else:
        grid = lambda cfg: (triton.cdiv(Sq * group, cfg["BLOCK_M"]), Hkv, B)  # noqa: E731
        _attn_fwd_tuned[grid](*args, **meta)
    return out
