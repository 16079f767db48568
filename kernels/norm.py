"""RMSNorm and LayerNorm over the last dim, optionally fused with the residual add.

    h = x                                   (or  h = round_to_x_dtype(x + residual))
    rms_norm:   y = h * rsqrt(mean(h^2) + eps) * weight
    layer_norm: y = (h - mean(h)) * rsqrt(var(h) + eps) * weight (+ bias)

Same semantics as runtime/reference.py: statistics and y in float32, y rounded
to x.dtype; with `residual` the kernel also writes h (a fresh tensor) and
computes y from the rounded h, exactly as the unfused add would.

Bytes moved for M rows of N columns (e = element size): read M*N*e of x
(+ M*N*e of residual), N*e of weight (+ bias), write M*N*e of y (+ M*N*e of h).
FLOPs are a handful per element, so the kernels are bound by memory bandwidth.

One program per row: a row's reduction order depends only on N, never on how
many rows share the launch (batch invariance). Rows up to MAX_BLOCK_SIZE
columns are held in registers in one block (one read, one write). Longer rows
are tiled in CHUNK_SIZE pieces and read twice (statistics, then output), so
the register footprint stays fixed and nothing spills, however wide the row.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

MAX_BLOCK_SIZE = 16384  # widest row held in registers by the single-pass kernel
CHUNK_SIZE = 4096       # tile width of the chunked kernel for wider rows
CHUNK_WARPS = 8
# Triton's interpreter casts float32 -> bfloat16 by truncation (the GPU rounds to
# nearest even), so under the interpreter bf16 results are rounded by hand.
# Decided when triton decides, at import: the GPU path never sees it.
_EXACT_BF16 = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _to(x, dtype: tl.constexpr, EXACT_BF16: tl.constexpr):
    """float32 x -> dtype, rounded to nearest even."""
    if EXACT_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = tl.where(x != x, bits | 0x400000, rounded)  # NaN stays a (quiet) NaN
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _load_h(X_ptr, R_ptr, H_ptr, cols, mask, HAS_RESIDUAL: tl.constexpr, EXACT_BF16: tl.constexpr):
    """h = x (+ residual rounded to x's dtype, and stored to H) as float32."""
    x = tl.load(X_ptr + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R_ptr + cols, mask=mask, other=0.0)
        x = _to(x.to(tl.float32) + r.to(tl.float32), X_ptr.dtype.element_ty, EXACT_BF16)
        tl.store(H_ptr + cols, x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _norm_row_kernel(
    X_ptr, stride_x_row, R_ptr, stride_r_row, W_ptr, B_ptr, Y_ptr, H_ptr,
    n_cols, eps,
    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, EXACT_BF16: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One row per program, the whole row in one block: read once, write once."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may pass 2^31
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    h = _load_h(X_ptr + row * stride_x_row, R_ptr + row * stride_r_row, H_ptr + row * n_cols,
                cols, mask, HAS_RESIDUAL, EXACT_BF16)                                    # [BLOCK_SIZE] fp32
    if IS_RMS:
        xhat = h * tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    else:
        # two-step variance (mean first) as in the reference: no cancellation
        diff = tl.where(mask, h - tl.sum(h, axis=0) / n_cols, 0.0)
        xhat = diff * tl.rsqrt(tl.sum(diff * diff, axis=0) / n_cols + eps)
    y = xhat * tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y_ptr + row * n_cols + cols, _to(y, Y_ptr.dtype.element_ty, EXACT_BF16), mask=mask)


@triton.jit
def _norm_chunked_kernel(
    X_ptr, stride_x_row, R_ptr, stride_r_row, W_ptr, B_ptr, Y_ptr, H_ptr,
    n_cols, eps,
    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, EXACT_BF16: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
):
    """One row per program in CHUNK_SIZE tiles: pass 1 statistics, pass 2 output."""
    row = tl.program_id(0).to(tl.int64)
    X_ptr += row * stride_x_row
    R_ptr += row * stride_r_row
    Y_ptr += row * n_cols
    H_ptr += row * n_cols
    offs = tl.arange(0, CHUNK_SIZE)
    # pass 1. rms: per-lane sums of h^2, reduced once at the end.
    # layer: each chunk's mean and squared deviations from it (two-step, as in
    # the single-pass kernel), merged into the running ones with Chan's parallel
    # formula, so a large mean never cancels against the variance.
    sum_sq = tl.zeros([CHUNK_SIZE], dtype=tl.float32)
    mean = 0.0
    m2 = 0.0
    for start in range(0, n_cols, CHUNK_SIZE):
        cols = start + offs
        mask = cols < n_cols
        h = _load_h(X_ptr, R_ptr, H_ptr, cols, mask, HAS_RESIDUAL, EXACT_BF16)          # [CHUNK_SIZE] fp32
        if IS_RMS:
            sum_sq += h * h
        else:
            n_seen = start * 1.0
            n_chunk = tl.minimum(n_cols - start, CHUNK_SIZE) * 1.0
            chunk_mean = tl.sum(h, axis=0) / n_chunk
            dev = tl.where(mask, h - chunk_mean, 0.0)
            delta = chunk_mean - mean
            n_total = n_seen + n_chunk
            mean += delta * (n_chunk / n_total)
            m2 += tl.sum(dev * dev, axis=0) + delta * delta * (n_seen * n_chunk / n_total)
    if IS_RMS:
        rstd = tl.rsqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
    else:
        rstd = tl.rsqrt(m2 / n_cols + eps)
    if HAS_RESIDUAL:
        # pass 2 reads back the rounded h this block wrote (one tensor instead of
        # x and residual); the barrier makes those global writes visible to it
        tl.debug_barrier()
        SRC_ptr = H_ptr
    else:
        SRC_ptr = X_ptr
    # pass 2: normalize and write
    for start in range(0, n_cols, CHUNK_SIZE):
        cols = start + offs
        mask = cols < n_cols
        h = tl.load(SRC_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if IS_RMS:
            xhat = h * rstd
        else:
            xhat = (h - mean) * rstd
        y = xhat * tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y_ptr + cols, _to(y, Y_ptr.dtype.element_ty, EXACT_BF16), mask=mask)


def _rows(t, n_cols):
    """t [..., N] -> a [M, N] view with unit column stride (copying only when needed)."""
    if n_cols > 1 and t.stride(-1) != 1:
        # the kernels address columns with unit stride (coalesced, vectorized
        # loads), so a column-strided view such as x[..., ::2] is copied first
        t = t.contiguous()
    # a view when the leading dims collapse into one row stride; a copy otherwise
    # (e.g. leading dims transposed)
    return t.reshape(-1, n_cols)


def _norm(x, weight, bias, eps, residual, is_rms):
    n_cols = x.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = None if residual is None else torch.empty_like(y)
    n_rows = y.numel() // n_cols
    has_bias = bias is not None
    if n_rows > 0:
        x2 = _rows(x, n_cols)                                                # [M, N]
        r2 = x2 if residual is None else _rows(residual, n_cols)             # [M, N]
        weight = weight.contiguous()  # [N]; a copy only for a strided view
        bias = bias.contiguous() if has_bias else weight  # a placeholder pointer when HAS_BIAS is False
        block = triton.next_power_of_2(n_cols)
        if block <= MAX_BLOCK_SIZE:
            kernel, tile, num_warps = _norm_row_kernel, block, min(16, max(1, block // 512))
        else:
            kernel, tile, num_warps = _norm_chunked_kernel, CHUNK_SIZE, CHUNK_WARPS
        # 16 warps (512 threads) allow 128 registers each; stated explicitly, because
        # without it ptxas may trade spills for occupancy (64 registers and an 8-byte
        # stack for fp32 layer_norm of 16384 columns on sm_80, triton 3.9)
        maxnreg = 128 if num_warps == 16 else None
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            kernel[(n_rows,)](
                x2, x2.stride(0), r2, r2.stride(0), weight, bias, y, y if h is None else h,
                n_cols, eps,
                is_rms, residual is not None, has_bias, _EXACT_BF16,
                tile, num_warps=num_warps, maxnreg=maxnreg,
            )
    return y if residual is None else (y, h)


def rms_norm(x, weight, eps=1e-6, residual=None):
    """RMSNorm of x [..., N] with weight [N]; with residual returns (y, x + residual)."""
    return _norm(x, weight, None, eps, residual, is_rms=True)


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    """LayerNorm of x [..., N] with weight [N] and bias [N] or None; residual as in rms_norm."""
    return _norm(x, weight, bias, eps, residual, is_rms=False)
