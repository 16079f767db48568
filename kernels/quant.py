"""x @ W.T for GGUF-quantized W in Triton: the blocks are dequantized in registers, never in memory.

W [N, K] is a fuselm.quant.QuantizedTensor packed into planes (runtime/quant.py, `planes`):
one layout for every format, weight = s * q + mn per group with q the unsigned value,

    Q4_0 Q5_0 Q8_0   s = d,                mn = -offset * d   (offset 8, 16, 128; computed as d * (q - offset))
    Q4_1 Q5_1        s = d,                mn = m
    Q4_K Q5_K        s = d * sc,           mn = -(dmin * mn)    per 32 values, d and dmin per 256
    Q6_K             s = d * sc6,          mn = -32 s            per 16 values (as s * (q - 32))

in float32, in the reference's order of operations (reference.dequantize_blocks), so every
weight the kernel forms equals the reference's, up to the compiler fusing a multiply and an add
into one FMA on GPUs (one rounding fewer; tests/test_triton_quant.py's bound allows for it).
A qs byte holds the low nibbles of two values 16 columns apart (column 32 b + j and
32 b + 16 + j of 32-block b), so a tile of BLOCK_K / 2 bytes per row is two
[BLOCK_N, BLOCK_K / 2] halves of weights, each multiplied with the x columns it pairs with
(x is small and cached: its strided loads cost nothing next to the weight bytes). Q8_0 stores
one value per byte; its two halves are loaded the same way.

The product: the weights are cast to x's dtype (bf16 / fp16: one rounding per weight, as every
dequantize-then-tensor-core kernel does) and tl.dot accumulates in fp32; fp32 x takes exact fp32
products (input_precision "ieee"). Two configurations of the one kernel:

- decode (M <= DECODE_ROWS): 16-row x tiles (tl.dot's minimum; rows past M load zeros), split-K
  so that the (N / BLOCK_N) x SPLIT programs fill the GPU: each split writes fp32 partials
  [SPLIT, M, N] that torch sums (a fixed order: deterministic) before the bias.
- prefill (M > DECODE_ROWS): 64 x 64 output tiles over the whole K, the bias fused.

The configuration, BLOCK_K and SPLIT depend on (M <= DECODE_ROWS, N, K, the device), never on the
values or on M within a class: a row's result is bitwise the same alone or in any batch of up to
DECODE_ROWS rows (Transformer.invariant_rows), and the launch is CUDA-graph capturable (no sync).

Bytes moved (the limit at decode): the planes once per split range, sum = the format's bytes
(quant.QuantizedTensor.nbytes), plus x (M K elt per N / BLOCK_N program, cached) and the output
(M N 4 per split). Untuned: tiles, warps and stages are first choices, never measured on a GPU.
"""
import torch
import triton
import triton.language as tl

from .decode import _interpreting, _sm_count

DECODE_ROWS = 16
# format -> (KIND, BITS, OFFSET): KIND 0 d * (q - OFFSET), 1 d * q + m, 2 the K-quants' two levels,
# 3 Q6_K
_KINDS = {"Q4_0": (0, 4, 8), "Q5_0": (0, 5, 16), "Q8_0": (0, 8, 128), "Q4_1": (1, 4, 0), "Q5_1": (1, 5, 0),
          "Q4_K": (2, 4, 0), "Q5_K": (2, 5, 0), "Q6_K": (3, 6, 32)}


@triton.jit
def _halves(Qs_ptr, Qh_ptr, D_ptr, M_ptr, Sc_ptr, Mn_ptr, rn, c, lo, mask, K,
            KIND: tl.constexpr, BITS: tl.constexpr, OFFSET: tl.constexpr):
    """The fp32 weights [BLOCK_N, HALF] of columns lo (qs bytes c) and lo + 16 of rows rn."""
    row = rn.to(tl.int64)[:, None]
    if BITS == 8:
        q_lo = tl.load(Qs_ptr + row * K + lo[None, :], mask=mask, other=0).to(tl.int32)
        q_hi = tl.load(Qs_ptr + row * K + lo[None, :] + 16, mask=mask, other=0).to(tl.int32)
    else:
        byte = tl.load(Qs_ptr + row * (K // 2) + c[None, :], mask=mask, other=0).to(tl.int32)
        q_lo, q_hi = byte & 15, byte >> 4
        if BITS > 4:
            HB: tl.constexpr = BITS - 4
            PER: tl.constexpr = 4 // HB
            h = tl.load(Qh_ptr + row * (K // 2 // PER) + (c // PER)[None, :], mask=mask, other=0).to(tl.int32)
            h = h >> ((c % PER) * 2 * HB)[None, :]
            q_lo = q_lo | ((h & ((1 << HB) - 1)) << 4)
            q_hi = q_hi | (((h >> HB) & ((1 << HB) - 1)) << 4)
    block = (c // 16)[None, :]                                          # the 32-block of both halves
    if KIND == 0:
        d = tl.load(D_ptr + row * (K // 32) + block, mask=mask, other=0).to(tl.float32)
        w_lo, w_hi = d * (q_lo - OFFSET).to(tl.float32), d * (q_hi - OFFSET).to(tl.float32)
    elif KIND == 1:
        d = tl.load(D_ptr + row * (K // 32) + block, mask=mask, other=0).to(tl.float32)
        m = tl.load(M_ptr + row * (K // 32) + block, mask=mask, other=0).to(tl.float32)
        w_lo, w_hi = d * q_lo.to(tl.float32) + m, d * q_hi.to(tl.float32) + m
    elif KIND == 2:
        sup = (lo // 256)[None, :]
        s = tl.load(D_ptr + row * (K // 256) + sup, mask=mask, other=0).to(tl.float32) * \
            tl.load(Sc_ptr + row * (K // 32) + block, mask=mask, other=0).to(tl.float32)
        low = tl.load(M_ptr + row * (K // 256) + sup, mask=mask, other=0).to(tl.float32) * \
            tl.load(Mn_ptr + row * (K // 32) + block, mask=mask, other=0).to(tl.float32)
        w_lo, w_hi = s * q_lo.to(tl.float32) - low, s * q_hi.to(tl.float32) - low
    else:
        d = tl.load(D_ptr + row * (K // 256) + (lo // 256)[None, :], mask=mask, other=0).to(tl.float32)
        sc = Sc_ptr + row * (K // 16) + 2 * block                      # 16-value groups: lo's, then hi's
        w_lo = d * tl.load(sc, mask=mask, other=0).to(tl.float32) * (q_lo - OFFSET).to(tl.float32)
        w_hi = d * tl.load(sc + 1, mask=mask, other=0).to(tl.float32) * (q_hi - OFFSET).to(tl.float32)
    return w_lo, w_hi


@triton.jit
def _qmatmul_kernel(X_ptr, Qs_ptr, Qh_ptr, D_ptr, M_ptr, Sc_ptr, Mn_ptr, Bias_ptr, Out_ptr,
                    M, N, K, stride_xm, stride_xk, stride_os, stride_om, tiles_per_split,
                    KIND: tl.constexpr, BITS: tl.constexpr, OFFSET: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Programs (N tiles, M tiles, splits): split s sums qs-byte tiles [s T, (s + 1) T) of BLOCK_K / 2
    bytes (T = tiles_per_split) and stores its fp32 sum into Out[s] (SPLIT > 1: partials; one split:
    Out is the output, bias added, cast to its dtype)."""
    HALF: tl.constexpr = BLOCK_K // 2
    pid_n, pid_m, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok, m_ok = rn < N, rm < M
    x_rows = X_ptr + rm.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(K // 2, HALF))
    for t in range(t0, t1):
        c = t * HALF + tl.arange(0, HALF)                                 # qs bytes (value pairs)
        c_ok = c < K // 2
        lo = 32 * (c // 16) + c % 16                                      # the pair's low column
        w_lo, w_hi = _halves(Qs_ptr, Qh_ptr, D_ptr, M_ptr, Sc_ptr, Mn_ptr, rn, c, lo,
                             n_ok[:, None] & c_ok[None, :], K, KIND, BITS, OFFSET)
        x_mask = m_ok[:, None] & c_ok[None, :]
        x_cols = lo.to(tl.int64)[None, :] * stride_xk                     # (transposed x: large strides)
        x_lo = tl.load(x_rows + x_cols, mask=x_mask, other=0)
        x_hi = tl.load(x_rows + x_cols + 16 * stride_xk, mask=x_mask, other=0)
        w_lo, w_hi = w_lo.to(x_lo.dtype), w_hi.to(x_lo.dtype)
        if UPCAST:  # the interpreter's numpy has no bf16 matmul: the same rounded values in fp32
            x_lo, x_hi = x_lo.to(tl.float32), x_hi.to(tl.float32)
            w_lo, w_hi = w_lo.to(tl.float32), w_hi.to(tl.float32)
        acc = tl.dot(x_lo, tl.trans(w_lo), acc, input_precision=DOT_PRECISION)
        acc = tl.dot(x_hi, tl.trans(w_hi), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(Bias_ptr + rn, mask=n_ok, other=0).to(tl.float32)[None, :]
    out = Out_ptr + pid_s.to(tl.int64) * stride_os + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(Out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def plan(M, N, K, dtype, device):
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages): a function of (M <= DECODE_ROWS, N, K,
    dtype, device) only (see the module docstring)."""
    fp32 = dtype == torch.float32  # exact fp32 products run on the FMA units: smaller weight tiles
    if M > DECODE_ROWS:
        return (64, 32, 32, 1, 8, 2) if fp32 else (64, 64, 64, 1, 4, 3)  # no spills on sm_80/90 (test_triton_compile)
    block_n, block_k = (32, 64) if fp32 else (64, 128)
    if device.type == "cuda":  # about two programs per SM, each split at least 4 tiles of K
        target, min_tiles = 2 * _sm_count(device), 4
    else:                      # the interpreter: small test weights still take several splits
        target, min_tiles = 4, 1
    tiles = triton.cdiv(K, block_k)
    split = max(1, min(target // triton.cdiv(N, block_n), tiles // min_tiles))
    return (DECODE_ROWS, block_n, block_k, triton.cdiv(tiles, triton.cdiv(tiles, split)), 4, 3)


def linear(x, weight, bias=None, out_dtype=None):
    """x [..., K] (any strides) @ weight.T (+ bias): weight a QuantizedTensor [N, K] packed into planes
    (pack_planes), bias [N] or None -> [..., N] in out_dtype (default x's)."""
    p = weight.require("planes")
    N, K = weight.shape
    out_dtype = out_dtype or x.dtype
    x2 = x.reshape(-1, K)  # a view where x's strides allow, so strided rows are read in place
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=x.device)
    if M == 0 or N == 0:
        return out.reshape(*x.shape[:-1], N)
    block_m, block_n, block_k, split, warps, stages = plan(M, N, K, x.dtype, x.device)
    tiles = triton.cdiv(K, block_k)
    per_split = triton.cdiv(tiles, split)
    part = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    kind, bits, offset = _KINDS[weight.fmt.name]
    qs = p["qs"]
    _qmatmul_kernel[(triton.cdiv(N, block_n), triton.cdiv(M, block_m), split)](
        x2, qs, p.get("qh", qs), p["d"], p.get("m", p.get("dmin", qs)), p.get("sc", p.get("sc6", qs)),
        p.get("mn", qs), bias if bias is not None and split == 1 else qs, part,
        M, N, K, x2.stride(0), x2.stride(1), part.stride(0) if split > 1 else 0, part.stride(-2), per_split,
        KIND=kind, BITS=bits, OFFSET=offset, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_BIAS=bias is not None and split == 1, UPCAST=_interpreting() and x.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages)
    if split > 1:
        y = part.sum(0)
        if bias is not None:
            y += bias.float()
        out.copy_(y)
    return out.reshape(*x.shape[:-1], N)
