"""Triton's quantized linear (fuselm.kernels.quant) on GGUF blocks packed into planes.

Through the interpreter on CPUs (CI) and natively on a GPU, against the float64 product of
reference.dequantize's weights:
- quant.planes keeps every value and scale field of every format (unpacked back, they equal
  reference.unpack_blocks's), at the file's bytes (K-quants: +2.8% / 2.3%).
- Within a bound derived per output element (`bound`): hypothesis draws the format, odd N
  1..70, K 1..4 blocks, M 1..40 (both configurations: decode <= DECODE_ROWS rows, prefill above),
  fp32/bf16/fp16, bias, out_dtype, leading dims, strided and transposed x. The bound is shown to
  catch a wrong scale or a swapped half.
- NaN/inf in a row of x reach only that row, in the reference's pattern.
- Batch invariance: a row's output is bitwise the same alone and in any batch of up to
  DECODE_ROWS rows; in the prefill configuration it does not depend on the other rows' values.
- ops.linear dispatch: quantized weights run this kernel under backend 'triton' (and 'auto' on
  CUDA); dense weights run torch's GEMM there, logged; clear errors for unpacked weights.
- Models: GGUF blocks kept quantized on backend 'triton' give the greedy tokens of the same file
  dequantized, and logits within float32 accumulation of it; batched == alone.
"""
import logging

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fuselm
from fuselm import ops, quant, reference
from fuselm.kernels import quant as kq
from tests.conftest import DEVICE
from tests.fixtures import save_tiny_gguf, save_tiny_model
from tests.test_quant import OUT_TINY, OUT_U, U32, U64, assert_within, decomposed, gen, random_blocks

FORMATS = list(quant.FORMATS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# the weights' rounding to x's dtype: unit roundoff and half the smallest subnormal step
W_U = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
W_TINY = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0 ** -25}


def make_weight(fmt, N, K, g):
    """A QuantizedTensor [N, K] of random valid blocks (O(1) weights) with raw (the oracle's) and planes."""
    f = quant.FORMATS[fmt]
    raw = random_blocks(fmt, N * K // f.block, g, linear=True).reshape(N, f.row_bytes(K))
    qt = quant.QuantizedTensor(fmt, (N, K), raw, name=f"w.{fmt}").pack_planes(DEVICE, keep_raw=True)
    qt.raw = raw  # the oracle reads it on the CPU
    return qt


def bound(x, qt, bias, out_dtype):
    """y_ref = x.double() @ dequantize(w).double().T (+ b) and, per output element, how far the kernel
    may be from it. Derivation (the module docstring of fuselm.kernels.quant describes the kernel):

    1. The kernel forms each weight w' in float32 from the same fields with the reference's
       operations; the compiler may contract a multiply and an add into an FMA, so
       |w' - w| <= 2 u32 (|s q| + |m|) (decomposed: the two terms before their roundings).
    2. It rounds w' to x's dtype: |w'' - w'| <= u_c |w'| + tiny_c (bf16 2^-8, fp16 2^-11 and half
       the fp16 subnormal step, fp32 exact).
    3. x_i w''_i is exact in float32 for bf16/fp16 (8 + 8 or 11 + 11 significant bits); for fp32 it
       is one rounding. The dot, the split partial sums and the bias make at most n = K + S + 2
       roundings per term in any order, S the splits; each at most 2 u32 (a tensor core's
       accumulator may truncate), so A3 = gamma_n(2 u32) (sum |x_i w''_i| + |b|).
    4. The float64 reference: gamma_{K+2}(u64) (sum |x_i w_i| + |b|).
    5. The output: half an ulp of bf16 / fp16 on |y_ref| + the above, plus fp16's subnormal half-step.
    """
    N, K = qt.shape
    dtype = x.dtype
    xd = x.double().reshape(-1, K).cpu()
    w = reference.dequantize(qt.fmt.name, qt.raw, qt.shape).double()
    sq, m = decomposed(qt.fmt.name, qt.raw, qt.shape)
    b = torch.zeros(N, dtype=torch.float64) if bias is None else bias.double().cpu()
    y_ref = xd @ w.T + b
    dw1 = 2 * U32 * (sq.abs() + m.abs())
    w1 = w.abs() + dw1
    dw2 = W_U[dtype] * w1 + W_TINY[dtype]
    w2 = w1 + dw2
    split = kq.plan(xd.shape[0], N, K, dtype, DEVICE)[3]
    n = K + split + 2
    gamma = n * 2 * U32 / (1 - n * 2 * U32)
    kernel = xd.abs() @ (dw1 + dw2).T + gamma * (xd.abs() @ w2.T + b.abs())
    kernel += (K + 2) * U64 / (1 - (K + 2) * U64) * (xd.abs() @ w.abs().T + b.abs())
    return y_ref, kernel + OUT_U[out_dtype] * (y_ref.abs() + kernel) + OUT_TINY[out_dtype]


def linear(x, qt, b=None, out_dtype=None):
    return ops.linear(x, qt, b, out_dtype, backend="triton")


# ---------------------------------------------------------------- the planes

@pytest.mark.parametrize("fmt", FORMATS)
def test_planes_keep_every_field(fmt):
    f = quant.FORMATS[fmt]
    N, K = 5, 512
    raw = random_blocks(fmt, N * K // f.block, gen(1)).reshape(N, f.row_bytes(K))
    p = quant.planes(fmt, raw)
    fields = reference.unpack_blocks(fmt, raw.reshape(-1, f.type_size))
    q = fields["q"].reshape(N, K).int()
    if f.bits == 8:
        got = p["qs"].int()
    else:
        qs = p["qs"].int().reshape(N, K // 32, 16)
        got = torch.stack((qs & 15, qs >> 4), dim=2).reshape(N, K // 32, 32)
        if f.bits > 4:
            hb = f.bits - 4
            per = 4 // hb
            h = p["qh"].int().repeat_interleave(per, dim=1) >> (torch.arange(K // 2) % per * 2 * hb)
            h = h.reshape(N, K // 32, 16)
            high = torch.stack((h & (2 ** hb - 1), (h >> hb) & (2 ** hb - 1)), dim=2).reshape(N, K // 32, 32)
            got = got | (high << 4)
        got = got.reshape(N, K)
    assert torch.equal(got, q)
    for name in ("d", "m", "dmin"):
        if name in fields:
            assert p[name].dtype == torch.float16
            assert torch.equal(p[name].float().reshape(-1), fields[name].reshape(-1)), name
    for name in ("sc", "mn", "sc6"):
        if name in fields:
            assert torch.equal(p[name].reshape(-1), fields[name].reshape(-1)), name
    planes_bytes = sum(t.numel() * t.element_size() for t in p.values())
    extra = {"Q4_K": 2 * 8 - 12, "Q5_K": 2 * 8 - 12}.get(fmt, 0) * N * K // 256  # 6-bit scales unpacked
    assert planes_bytes == raw.numel() + extra


# ---------------------------------------------------------------- within the derived bound

def check(fmt, N, nb, M, dtype, seed=0, bias=False, out_dtype=None, layout="contiguous", lead=()):
    g = gen(seed)
    K = nb * quant.FORMATS[fmt].block
    qt = make_weight(fmt, N, K, g)
    x = torch.randn(*lead, M, K, generator=g).to(dtype)
    if layout == "strided":      # every other column of a wider tensor
        x = torch.randn(*lead, M, 2 * K, generator=g).to(dtype)[..., ::2]
    elif layout == "transposed":  # column-major rows
        x = torch.randn(*lead, K, M, generator=g).to(dtype).transpose(-1, -2)
    b = torch.randn(N, generator=g).to(dtype).to(DEVICE) if bias else None
    y = linear(x.to(DEVICE), qt, b, out_dtype)
    assert y.shape == (*lead, M, N) and y.dtype == (out_dtype or dtype)
    assert_within(y.cpu().reshape(-1, N), *bound(x, qt, b, out_dtype or dtype),
                  f"{fmt} N={N} K={K} M={M} {dtype} {layout}")
    return y


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_format_and_dtype_in_both_configurations(fmt, dtype):
    for M in (1, kq.DECODE_ROWS + 3):
        check(fmt, 37, 2, M, dtype, bias=True)


@given(fmt=st.sampled_from(FORMATS), N=st.integers(1, 70), nb=st.integers(1, 4), M=st.integers(1, 40),
       dtype=st.sampled_from(DTYPES), bias=st.booleans(), out_dtype=st.sampled_from([None, torch.float32]),
       layout=st.sampled_from(["contiguous", "strided", "transposed"]), lead=st.sampled_from([(), (2,)]),
       seed=st.integers(0, 2 ** 16))
def test_linear_within_bound(fmt, N, nb, M, dtype, bias, out_dtype, layout, lead, seed):
    if quant.FORMATS[fmt].block == 256:
        nb = min(nb, 2)  # 512 columns: the interpreter's time goes to the K-quants' big blocks
    check(fmt, N, nb, M, dtype, seed, bias, out_dtype, layout, lead)


@pytest.mark.parametrize("fmt", ["Q4_1", "Q6_K"])
@pytest.mark.parametrize("dtype, off", [(torch.float32, 2 ** -7), (torch.bfloat16, 0.1)])
def test_bound_catches_plausible_bugs(fmt, dtype, off):
    """The bound is tight enough to fail a kernel that swaps a block's halves or has its scales
    `off` (relative): each, emulated on the reference weights, lands outside it. The bound allows
    every rounding adding up in one direction (K u |x||w| for the accumulation, and in bf16 2^-8 per
    weight), so a systematic error shows once it is larger than that: 1% in fp32, 10% in bf16."""
    g = gen(3)
    K = 2 * quant.FORMATS[fmt].block
    qt = make_weight(fmt, 40, K, g)
    x = torch.randn(4, K, generator=g).to(dtype)
    y_ref, b = bound(x, qt, None, dtype)
    w = reference.dequantize(fmt, qt.raw, qt.shape).double()
    swapped = w.reshape(40, K // 32, 2, 16).flip(2).reshape(40, K)
    for name, wrong in (("swapped halves", swapped), ("scale off", w * (1 + off))):
        y = x.double() @ wrong.T
        assert ((y - y_ref).abs() > b).any(), name


# ---------------------------------------------------------------- non-finite inputs, batch invariance

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [3, kq.DECODE_ROWS + 2])
def test_non_finite_rows_stay_in_their_row(dtype, M):
    g = gen(4)
    qt = make_weight("Q4_0", 33, 64, g)
    x = torch.randn(M, 64, generator=g).to(dtype)
    clean = linear(x.to(DEVICE), qt).cpu()
    x[1, 5], x[2, 7] = float("nan"), float("inf")
    y = linear(x.to(DEVICE), qt).cpu()
    keep = [r for r in range(M) if r not in (1, 2)]
    assert torch.equal(y[keep], clean[keep])
    assert y[1].isnan().all()
    w = reference.dequantize("Q4_0", qt.raw, qt.shape).to(dtype)   # the weights the kernel multiplies
    expected = torch.where(w[:, 7] == 0, float("nan"), torch.sign(w[:, 7].float()) * float("inf"))
    assert torch.equal(y[2].float().isnan(), expected.isnan())
    assert torch.equal(y[2].float()[~expected.isnan()], expected[~expected.isnan()])


@pytest.mark.parametrize("fmt", ["Q8_0", "Q5_1", "Q4_K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance(fmt, dtype):
    g = gen(5)
    K = 2 * quant.FORMATS[fmt].block
    qt = make_weight(fmt, 45, K, g)
    x = torch.randn(40, K, generator=g).to(dtype).to(DEVICE)
    alone = torch.cat([linear(x[r:r + 1], qt) for r in range(kq.DECODE_ROWS)])
    for M in (2, 7, kq.DECODE_ROWS):
        assert torch.equal(linear(x[:M], qt), alone[:M]), M
    big = linear(x, qt)
    other = x.clone()
    other[1:] = torch.randn(39, K, generator=g).to(dtype).to(DEVICE)
    assert torch.equal(linear(other, qt)[0], big[0])    # prefill: a row ignores the other rows' values


# ---------------------------------------------------------------- dispatch and errors

def test_dense_weights_run_torch_under_triton_and_say_so(caplog):
    x, w = torch.randn(3, 64, device=DEVICE), torch.randn(8, 64, device=DEVICE)
    ops._logged.clear()
    with caplog.at_level(logging.INFO, logger="fuselm"):
        y = ops.linear(x, w, backend="triton")
    assert torch.equal(y, torch.nn.functional.linear(x, w))
    assert "linear of dense weights runs on backend 'torch'" in caplog.text


def test_unpacked_and_mismatched_weights_raise():
    raw = random_blocks("Q8_0", 4, gen(6), linear=True).reshape(2, 68)
    qt = quant.QuantizedTensor("Q8_0", (2, 64), raw.to(DEVICE))
    with pytest.raises(ValueError, match=r"not packed for the Triton kernels; call .pack_planes\(\)"):
        linear(torch.randn(1, 64, device=DEVICE), qt)
    qt.pack_planes()
    with pytest.raises(ValueError, match=r"x must end in K = 64"):
        linear(torch.randn(1, 32, device=DEVICE), qt)
    assert linear(torch.randn(0, 64, device=DEVICE), qt).shape == (0, 2)


# ---------------------------------------------------------------- models

@pytest.mark.parametrize("arch, qtype", [("llama", "Q8_0"), ("gpt2", "Q4_1")])
def test_model_kept_quantized_on_triton_matches_its_dequantized_self(tmp_path, arch, qtype):
    gguf_file = save_tiny_gguf(save_tiny_model(arch, tmp_path / "hf"), tmp_path / "m.gguf", qtype=qtype)
    ours = fuselm.load(gguf_file, dtype="float32", device=DEVICE, backend="triton", progress=False)
    w = ours.net.w["layers.0.o.weight"]
    assert isinstance(w, quant.QuantizedTensor) and w.planes is not None and w.tiles is None
    dense = fuselm.load(gguf_file, dtype="float32", device=DEVICE, backend="torch", progress=False)
    assert not isinstance(dense.net.w["layers.0.o.weight"], quant.QuantizedTensor)
    ids = torch.tensor([ours.tokenizer.encode("hello world, a longer prompt")], device=DEVICE)
    expected, got = dense.logits(ids), ours.logits(ids)
    # the same weights, both in float32: only the accumulation order differs (~K u32 relative)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max(), (got - expected).abs().max()
    prompts = ["hello world", "a longer prompt with more words"]
    batch = ours.generate(prompts, max_new_tokens=6)
    assert batch == dense.generate(prompts, max_new_tokens=6)
    assert batch == [ours.generate(p, max_new_tokens=6) for p in prompts]
    assert ours.net.invariant_rows() == kq.DECODE_ROWS
