"""rms_norm / layer_norm of every kernel backend against runtime/reference.py.

Property tests draw shapes (1-D to 3-D, odd widths, one row), dtypes, weight
dtypes, the fused residual and the bias, memory layouts (padded rows, strided
columns, transposed and sliced views, non-collapsible leading dims), magnitudes
from 1e-2 to 1e4 with and without a large mean, and NaN / inf / zero rows.
A width above the kernels' single-block limit (WIDE) is an explicit example, so
the chunked path is always covered. Batch invariance is checked bitwise.
"""
from dataclasses import dataclass

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from fuselm import ops, reference
from tests.checks import assert_matches, kernel_backends
from tests.conftest import DEVICE

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "row_padded", "col_strided", "transposed", "leading_transposed"]
# NaN / inf rows and float16 overflow make the interpreter's numpy arithmetic warn;
# the values themselves are checked against the reference
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

WIDE = 16385  # one past kernels/norm.py's MAX_BLOCK_SIZE: exercises the chunked kernel


@dataclass
class Case:
    lead: tuple          # leading dims; () is a single 1-D row
    hidden: int
    dtype: torch.dtype
    param_dtype: torch.dtype  # weight / bias dtype (may differ from x: ops.py allows it)
    residual: bool
    bias: bool
    layout: str          # layout of x (and of weight/bias when not "contiguous")
    residual_layout: str
    scale: float
    offset: float        # mean of the values, in units of scale
    special: str         # "none", "nan", "inf" or "zero": one row gets it
    eps: float
    seed: int


@st.composite
def norm_cases(draw):
    lead = draw(st.sampled_from([(), "rows", "rows", "3d"]))
    if lead == "rows":
        lead = (draw(st.integers(1, 70)),)
    elif lead == "3d":
        lead = (draw(st.integers(1, 6)), draw(st.integers(1, 12)))
    dtype = draw(st.sampled_from(DTYPES))
    return Case(
        lead=lead,
        hidden=draw(st.integers(1, 5000)),
        dtype=dtype,
        param_dtype=draw(st.sampled_from([dtype, torch.float32])),
        residual=draw(st.booleans()),
        bias=draw(st.booleans()),
        layout=draw(st.sampled_from(LAYOUTS)),
        residual_layout=draw(st.sampled_from(LAYOUTS)),
        scale=draw(st.sampled_from([1e-2, 1.0, 1e4])),
        offset=draw(st.sampled_from([0.0, 3.0])),
        special=draw(st.sampled_from(["none", "none", "nan", "inf", "zero"])),
        eps=draw(st.sampled_from([1e-6, 1e-5, 1e-2])),
        seed=draw(st.integers(0, 2**16)),
    )


def with_layout(v, layout):
    """A tensor equal to v whose memory is laid out as `layout` says."""
    *lead, n = v.shape
    if layout == "row_padded":          # rows further apart than the row length
        buf = torch.empty(*lead, n + 3, dtype=v.dtype, device=v.device)
        buf[..., :n] = v
        return buf[..., :n]
    if layout == "col_strided":         # x[..., ::2]: columns not unit-stride
        buf = torch.empty(*lead, 2 * n, dtype=v.dtype, device=v.device)
        buf[..., ::2] = v
        return buf[..., ::2]
    if layout == "transposed" and lead:  # a sliced view of a transposed buffer
        buf = torch.empty(*lead[:-1], n + 1, lead[-1] + 2, dtype=v.dtype, device=v.device)
        buf[..., :n, :lead[-1]] = v.transpose(-1, -2)
        return buf[..., :n, :lead[-1]].transpose(-1, -2)
    if layout == "leading_transposed" and len(lead) >= 2:  # leading dims do not collapse
        return v.transpose(0, 1).contiguous().transpose(0, 1)
    return v.contiguous()


def make_inputs(c):
    g = torch.Generator().manual_seed(c.seed)
    shape = (*c.lead, c.hidden)

    def values(mean=0.0):
        v = torch.randn(shape, generator=g) * c.scale + mean
        return v.clamp(-6e4, 6e4)  # large, yet finite in float16

    x = values(c.offset * c.scale)
    rows = x.view(-1, c.hidden)
    if c.special != "none":
        r = int(torch.randint(rows.shape[0], (), generator=g))
        if c.special == "zero":
            rows[r] = 0.0
        else:
            rows[r, int(torch.randint(c.hidden, (), generator=g))] = float("nan" if c.special == "nan" else "inf")
    x = with_layout(x.to(c.dtype).to(DEVICE), c.layout)
    residual = with_layout(values().to(c.dtype).to(DEVICE), c.residual_layout) if c.residual else None
    weight = torch.randn(c.hidden, generator=g) * 0.5 + 1.0
    bias = torch.randn(c.hidden, generator=g) if c.bias else None
    return x, residual, param(weight, c), param(bias, c)


def param(p, c):
    """weight / bias in c.param_dtype; a strided view p[::2] whenever x is not contiguous."""
    if p is None:
        return None
    p = p.to(c.param_dtype).to(DEVICE)
    if c.layout == "contiguous":
        return p
    buf = torch.empty(2 * p.numel(), dtype=p.dtype, device=p.device)
    buf[::2] = p
    return buf[::2]


def call(op, backend, x, residual, weight, bias, eps):
    if op == "rms_norm":
        return ops.rms_norm(x, weight, eps=eps, residual=residual, backend=backend)
    return ops.layer_norm(x, weight, bias, eps=eps, residual=residual, backend=backend)


def reference_op(op, x, weight, bias, eps, residual=None):
    if op == "rms_norm":
        return reference.rms_norm(x, weight, eps=eps, residual=residual)
    return reference.layer_norm(x, weight, bias, eps=eps, residual=residual)


def expected(op, x, residual, weight, bias, eps):
    """(float32 y, h in x.dtype) from the reference: h rounded as unfused, y from that h."""
    h = x if residual is None else reference_op(op, x, weight, bias, eps, residual)[1]
    return reference_op(op, h.float(), weight.float(), None if bias is None else bias.float(), eps), h


def assert_same(a, b, what):
    """Bitwise equal, NaN included."""
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def check_case(op, backend, c):
    x, residual, weight, bias = make_inputs(c)
    if op == "rms_norm":
        bias = None
    inputs = [t.clone() for t in (x, residual) if t is not None]
    out = call(op, backend, x, residual, weight, bias, c.eps)
    y_exp, h_exp = expected(op, x, residual, weight, bias, c.eps)
    y = out[0] if residual is not None else out
    assert_matches(y, y_exp, c.dtype, what=f"{op} y {c}")
    if residual is not None:
        assert isinstance(out, tuple) and len(out) == 2, f"{op} with residual must return (y, h)"
        assert_same(out[1], h_exp, f"{op} h = x + residual")
    # fresh outputs: the caller's x and residual are untouched
    for before, after in zip(inputs, (t for t in (x, residual) if t is not None)):
        assert_same(after, before, f"{op} input modified")


# explicit examples: the chunked path (WIDE), a 1-wide row, a typical model width
WIDE_CASE = Case((2,), WIDE, torch.bfloat16, torch.bfloat16, True, True, "row_padded", "contiguous",
                 1.0, 3.0, "nan", 1e-6, 1)
WIDE_STRIDED = Case((3,), WIDE, torch.float32, torch.float32, False, True, "col_strided", "contiguous",
                    1e4, 3.0, "inf", 1e-5, 2)
ONE_WIDE = Case((5,), 1, torch.float16, torch.float16, True, True, "transposed", "col_strided",
                1.0, 0.0, "none", 1e-5, 3)
MODEL = Case((2, 7), 576, torch.bfloat16, torch.float32, True, False, "leading_transposed", "row_padded",
             1.0, 0.0, "zero", 1e-5, 4)


@pytest.mark.parametrize("op,backend", [(op, b) for op in ("rms_norm", "layer_norm") for b in kernel_backends(op)])
@given(c=norm_cases())
@example(c=WIDE_CASE)
@example(c=WIDE_STRIDED)
@example(c=ONE_WIDE)
@example(c=MODEL)
def test_norm_matches_reference(op, backend, c):
    check_case(op, backend, c)


@pytest.mark.parametrize("op,backend", [(op, b) for op in ("rms_norm", "layer_norm") for b in kernel_backends(op)])
@given(rows=st.integers(2, 40), hidden=st.integers(1, 3000), dtype=st.sampled_from(DTYPES),
       residual=st.booleans(), seed=st.integers(0, 2**16))
@example(rows=3, hidden=WIDE, dtype=torch.bfloat16, residual=True, seed=0)
def test_batch_invariance(op, backend, rows, hidden, dtype, residual, seed):
    """A row's result is bitwise the same alone, in a prefix of the batch, or in the whole batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g).to(dtype).to(DEVICE)                    # [M, N]
    r = torch.randn(rows, hidden, generator=g).to(dtype).to(DEVICE) if residual else None
    w = torch.randn(hidden, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(hidden, generator=g).to(dtype).to(DEVICE)

    def run(sl):  # fresh copies, so only the number of rows differs from the full call
        out = call(op, backend, x[sl].clone(), None if r is None else r[sl].clone(), w, b, 1e-5)
        return out if residual else (out,)

    full = run(slice(None))
    for sl in (slice(0, 1), slice(rows - 1, rows), slice(rows // 2, rows // 2 + 1), slice(0, rows // 2 + 1)):
        for part, whole in zip(run(sl), full):
            assert torch.equal(part, whole[sl]), f"{op}: rows {sl} differ from the same rows in the full batch"


@pytest.mark.parametrize("op,backend", [(op, b) for op in ("rms_norm", "layer_norm") for b in kernel_backends(op)])
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)])
def test_no_rows(op, backend, shape):
    """Zero rows: empty outputs of the right shape and dtype, no launch failure."""
    x = torch.empty(shape, dtype=torch.bfloat16, device=DEVICE)
    w = torch.ones(8, dtype=torch.bfloat16, device=DEVICE)
    y, h = call(op, backend, x, torch.empty_like(x), w, None, 1e-5)
    assert y.shape == h.shape == x.shape and y.dtype == h.dtype == x.dtype
