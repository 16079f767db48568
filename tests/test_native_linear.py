"""fuselm.native.linear (csrc/linear_cpu.cpp): x @ weight.T (+ bias) on the CPU.

- Matches x.float() @ w.float().T (+ b) within tests.checks' per-dtype tolerance:
  hypothesis draws M 1..40 (M > 32 goes to at::linear), odd N and K (1, not
  multiples of 16/32, large enough to reach the 4-row tiles), fp32/bf16/fp16,
  bias or not, leading dims, strided and transposed x, large and small
  magnitudes; inf/NaN in x propagate like the reference.
- Batch invariance: a row's result is bitwise the same alone, in a batch of up
  to 32 rows (one-row and four-row tiles alike) and with 1 or 2 threads.
- Every ISA path (FUSELM_LINEAR_ISA caps it, in a subprocess): avx512bf16 /
  avx512 / portable, as far as this CPU has them.
- torch.library.opcheck, and clear errors for bad shapes, dtypes and devices.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fuselm import native
from tests.checks import assert_matches

ROOT = Path(__file__).resolve().parent.parent
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def ops():
    native.build()
    return torch.ops.fuselm


def reference(x, w, b=None):
    y = x.float() @ w.float().T
    return y if b is None else y + b.float()


def make_x(base_shape, layout, dtype, g, scale):
    """x of shape base_shape [..., K] in one of several memory layouts."""
    *lead, K = base_shape
    if layout == "row-padded":     # unit column stride, rows K + 3 apart
        return (torch.randn(*lead, K + 3, generator=g) * scale).to(dtype)[..., :K]
    if layout == "col-strided":    # every other column of a wider tensor
        return (torch.randn(*lead, 2 * K, generator=g) * scale).to(dtype)[..., ::2]
    if layout == "transposed":     # [K, M] stored, viewed as [M, K]
        return (torch.randn(K, *lead[::-1], generator=g) * scale).to(dtype).permute(*range(len(lead), 0, -1), 0)
    return (torch.randn(*base_shape, generator=g) * scale).to(dtype)


@settings(max_examples=4 * settings.default.max_examples)  # a call takes microseconds
@given(M=st.integers(1, 40), N=st.sampled_from([1, 3, 7, 17, 33, 64, 97]),
       K=st.sampled_from([1, 5, 15, 16, 31, 33, 100, 577, 1000]),
       dtype=st.sampled_from(DTYPES), bias=st.booleans(), batch=st.sampled_from([1, 2]),
       layout=st.sampled_from(["contiguous", "row-padded", "col-strided", "transposed"]),
       scale=st.sampled_from([1.0, 1e-3, 1e3]), seed=st.integers(0, 2**16))
def test_matches_reference(ops, M, N, K, dtype, bias, batch, layout, scale, seed):
    g = torch.Generator().manual_seed(seed)
    rows = (M + batch - 1) // batch
    x = make_x((batch, rows, K) if batch > 1 else (M, K), layout, dtype, g, scale)
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    y = native.linear(x, w, b)
    assert y.shape == (*x.shape[:-1], N)
    assert_matches(y, reference(x, w, b), dtype, f"linear M={M} N={N} K={K} {layout}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_rows_follow_the_reference(ops, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 70, generator=g).to(dtype)
    x[1, 3] = float("inf")
    x[2, 69] = float("-inf")   # in the zero-filled last step
    x[3, 10] = float("nan")
    w = torch.randn(9, 70, generator=g).to(dtype)
    w[4, 3] = 0                # inf * 0 = NaN
    assert_matches(native.linear(x, w), reference(x, w), dtype, "non-finite")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K", [(37, 1000), (13, 33), (6, 2049)])
def test_batch_invariance(ops, dtype, N, K):
    """Row m alone (one-row tiles) == row m of batches of 2..32 (four-row tiles past 12 KiB of x)."""
    g = torch.Generator().manual_seed(N * K)
    x = torch.randn(32, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    alone = torch.cat([ops.linear(x[m:m + 1], w, b) for m in range(32)])
    for M in (2, 5, 6, 7, 13, 32):
        assert torch.equal(ops.linear(x[:M], w, b), alone[:M]), f"batch of {M} differs from rows alone"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = ops.linear(x, w, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, alone), "1 thread differs from the default thread count"


ISA_CHECK = """
import torch
from fuselm import native
from tests.checks import assert_matches
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for M, N, K in ((1, 1, 1), (3, 7, 31), (7, 9, 577), (32, 13, 700), (33, 5, 40)):
        x = torch.randn(M, K, generator=g).to(dtype)
        w = torch.randn(N, K, generator=g).to(dtype)
        b = torch.randn(N, generator=g).to(dtype)
        y = native.linear(x, w, b)
        assert_matches(y, x.float() @ w.float().T + b.float(), dtype, f"{M}x{N}x{K}")
        if M <= 32:
            alone = torch.cat([native.linear(x[m:m + 1], w, b) for m in range(M)])
            assert torch.equal(y, alone), f"batch invariance {M}x{N}x{K} {dtype}"
print("ok")
"""


@pytest.mark.parametrize("isa", ["portable", "avx512", "avx512bf16"])
def test_each_isa_path(ops, isa):
    """FUSELM_LINEAR_ISA caps the path (to what the CPU has); each path is correct and batch invariant."""
    env = dict(os.environ, FUSELM_LINEAR_ISA=isa)
    out = subprocess.run([sys.executable, "-c", ISA_CHECK], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_bad_isa_name_is_clear(ops):
    code = "import torch\nfrom fuselm import native\nnative.linear(torch.ones(1, 2), torch.ones(3, 2))\n"
    env = dict(os.environ, FUSELM_LINEAR_ISA="sse9")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "FUSELM_LINEAR_ISA must be portable, avx512 or avx512bf16" in out.stderr


@pytest.mark.parametrize("case", range(5))
def test_opcheck(ops, case):
    g = torch.Generator().manual_seed(case)
    x = torch.randn(2, 3, 40, generator=g)
    w, b = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    args = [(x, w, b), (x.bfloat16(), w.bfloat16(), None), (x[0, 0], w, b),
            (x.half().transpose(0, 1), w.half(), b.half()), (torch.randn(40, 40, generator=g), w, b)][case]
    torch.library.opcheck(ops.linear.default, args)


def test_errors_name_the_problem(ops):
    x, w = torch.randn(2, 8), torch.randn(5, 8)
    with pytest.raises(RuntimeError, match=r"x must end in K = 8"):
        ops.linear(torch.randn(2, 7), w)
    with pytest.raises(RuntimeError, match=r"weight must be \[N, K\]"):
        ops.linear(x, torch.randn(5, 8, 1))
    with pytest.raises(RuntimeError, match="weight is BFloat16 but x is Float"):
        ops.linear(x, w.bfloat16())
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        ops.linear(x.double(), w.double())
    with pytest.raises(RuntimeError, match=r"bias must have shape \(5,\)"):
        ops.linear(x, w, torch.randn(4))
    with pytest.raises(RuntimeError, match="bias is Half but x is Float"):
        ops.linear(x, w, torch.randn(5).half())
    with pytest.raises(RuntimeError, match="runs on the CPU only \\(weight is on meta\\)"):
        native.linear(x, w.to("meta"))


def test_empty_and_zero_k(ops):
    w, b = torch.randn(5, 8), torch.randn(5)
    assert ops.linear(torch.randn(0, 8), w, b).shape == (0, 5)
    assert ops.linear(torch.randn(3, 8), torch.randn(0, 8)).shape == (3, 0)
    assert torch.equal(ops.linear(torch.randn(3, 0), torch.randn(5, 0), b), b.expand(3, 5))
