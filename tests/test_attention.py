"""Prefill attention kernels vs runtime/reference.py.

Property tests draw batch, query/key lengths (equal, a query chunk after a
cached prefix, 1, odd, not multiples of the tile), KV heads and the GQA group,
head dims 64/80/96/128 (256 as explicit cases), dtypes, causal or not, the
scale, and strided layouts (q/k/v sliced from a packed qkv tensor as the model
produces them, [B, H, S, D] storage, a strided head dim, views into a bigger
NaN-filled buffer so that any read past the sequence or head dim shows up as
NaN), and left padding: per-row kv_start (0, inside the first key tile, across
several tiles, a fully padded row) with NaN written into the padding, which
must never reach the output. Explicit tests cover head dim 256, queries that
see no key, NaN rows, large scores, batch invariance, kv_start of zeros
(bitwise the same as none) and kv_start argument checks.
Under the interpreter (no GPU) lengths stay small: it runs every tile in numpy.
"""
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from fuselm import ops, reference
from tests.checks import assert_matches, kernel_backends
from tests.conftest import DEVICE

BACKENDS = kernel_backends("attention")
MAX_LEN = 300 if DEVICE.type == "cuda" else 64
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "packed", "bhsd", "strided_d", "nan_padded"]


def _make(B, S, heads, D, dtype, layout, gen):
    """Random [B, S, h, D] tensors, one per h in `heads`, views of one buffer laid out as `layout`."""
    total = sum(heads)
    if layout in ("contiguous", "packed"):  # packed: one [B, S, h1 + h2 + ..., D] tensor sliced along heads
        full = torch.randn(B, S, total, D, generator=gen)
    elif layout == "bhsd":                  # stored head-major, viewed as [B, S, H, D]
        full = torch.randn(B, total, S, D, generator=gen).transpose(1, 2)
    elif layout == "strided_d":             # every other element of a wider last dim
        full = torch.randn(B, S, total, 2 * D, generator=gen)[..., ::2]
    else:  # "nan_padded": a view into a bigger NaN-filled buffer (a KV cache), so any read past S or D shows
        full = torch.full((B, S + 3, total, D + 16), float("nan"))
        full[:, :S, :, :D] = torch.randn(B, S, total, D, generator=gen)
        full = full[:, :S, :, :D]
    full = full.to(dtype=dtype, device=DEVICE)
    out, start = [], 0
    for h in heads:
        t = full[:, :, start:start + h]
        out.append(t.contiguous() if layout == "contiguous" else t)
        start += h
    return out


def _qkv(B, Sq, Sk, Hq, Hkv, D, dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    if Sq == Sk:  # the model's case: q, k, v are views of one packed projection output
        return _make(B, Sq, [Hq, Hkv, Hkv], D, dtype, layout, gen)
    (q,) = _make(B, Sq, [Hq], D, dtype, layout, gen)
    k, v = _make(B, Sk, [Hkv, Hkv], D, dtype, layout, gen)
    return q, k, v


def _pad(k, v, kv_start):
    """kv_start [B] as a tensor, with NaN written into each row's padding keys (in place, through the views)."""
    if kv_start is None:
        return None
    for b, start in enumerate(kv_start):
        k[b, :start] = float("nan")
        v[b, :start] = float("nan")
    return torch.tensor(kv_start, dtype=torch.int32, device=DEVICE)


def _check(backend, B, Sq, Sk, Hq, Hkv, D, dtype, causal=True, scale=None, layout="contiguous", seed=0,
           kv_start=None):
    q, k, v = _qkv(B, Sq, Sk, Hq, Hkv, D, dtype, layout, seed)
    kv_start = _pad(k, v, kv_start)
    out = ops.attention(q, k, v, causal=causal, scale=scale, kv_start=kv_start, backend=backend)
    expected = reference.attention(q, k, v, causal=causal, scale=scale, kv_start=kv_start)
    what = (f"B={B} Sq={Sq} Sk={Sk} Hq={Hq} Hkv={Hkv} D={D} {dtype} causal={causal} scale={scale} {layout} "
            f"kv_start={kv_start}")
    assert_matches(out, expected, dtype, what)


@st.composite
def cases(draw):
    Sk = draw(st.integers(1, MAX_LEN))
    Sq = draw(st.one_of(st.just(Sk), st.integers(1, Sk), st.just(1)))
    Hkv = draw(st.integers(1, 3))
    B = draw(st.integers(1, 3))
    # left padding per row: none, inside the first key tile (16 under the interpreter), any length up
    # to several tiles, or the whole row
    start = st.one_of(st.just(0), st.integers(1, 15), st.integers(0, Sk), st.just(Sk)).map(lambda n: min(n, Sk))
    kv_start = draw(st.one_of(st.none(), st.lists(start, min_size=B, max_size=B)))
    return dict(
        B=B, Sq=Sq, Sk=Sk, Hkv=Hkv, Hq=Hkv * draw(st.sampled_from([1, 2, 4, 5])),
        D=draw(st.sampled_from([64, 80, 96, 128])), dtype=draw(st.sampled_from(DTYPES)),
        causal=draw(st.booleans()), scale=draw(st.sampled_from([None, 0.05, 0.3, 1.0, -0.2])),
        layout=draw(st.sampled_from(LAYOUTS)), seed=draw(st.integers(0, 2**16)),
        kv_start=kv_start,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases())
@example(case=dict(B=1, Sq=33, Sk=33, Hq=4, Hkv=2, D=80, dtype=torch.bfloat16, causal=True, scale=None,
                   layout="packed", seed=1))
@example(case=dict(B=2, Sq=7, Sk=37, Hq=8, Hkv=1, D=64, dtype=torch.float16, causal=True, scale=None,
                   layout="bhsd", seed=2))
@example(case=dict(B=3, Sq=45, Sk=45, Hq=4, Hkv=2, D=64, dtype=torch.bfloat16, causal=True, scale=None,
                   layout="packed", seed=6, kv_start=[5, 35, 45]))  # inside a tile, across tiles, all padding
@example(case=dict(B=3, Sq=6, Sk=50, Hq=3, Hkv=3, D=96, dtype=torch.float32, causal=False, scale=0.3,
                   layout="nan_padded", seed=7, kv_start=[0, 16, 49]))  # a tile boundary, one visible key
def test_attention_matches_reference(backend, case):
    _check(backend, **case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_head_dim_256(backend, dtype, causal):
    _check(backend, B=1, Sq=19, Sk=35, Hq=2, Hkv=1, D=256, dtype=dtype, causal=causal, layout="nan_padded")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Sq, Sk", [(1, 1), (1, 45), (30, 30), (40, 11)])
def test_edge_lengths(backend, Sq, Sk):
    """Single query/key, a query after a long prefix, and Sq > Sk (early rows see no key: zeros)."""
    _check(backend, B=1, Sq=Sq, Sk=Sk, Hq=6, Hkv=2, D=96, dtype=torch.float32, layout="nan_padded")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_row_stays_in_its_row(backend, dtype):
    """A NaN in one query row makes that output row NaN and leaves every other row exact."""
    q, k, v = _qkv(2, 21, 21, 4, 2, 64, dtype, "packed", seed=3)
    q = q.clone()
    q[1, 9, 3, 5] = float("nan")
    out = ops.attention(q, k, v, causal=True, backend=backend)
    assert out[1, 9, 3].isnan().all()
    expected = reference.attention(q, k, v, causal=True)
    expected[1, 9, 3] = float("nan")
    assert_matches(out, expected, dtype, "NaN row")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_large_scores(backend, dtype, causal):
    """q * 100: scores in the thousands must not overflow exp (the running max is subtracted)."""
    q, k, v = _qkv(1, 24, 37, 4, 4, 64, dtype, "contiguous", seed=4)
    q = q * 100
    out = ops.attention(q, k, v, causal=causal, backend=backend)
    assert out.isfinite().all()
    # fp32 scores near 1e3 carry absolute rounding ~1e-4 that exp turns into relative error in p
    atol = 1e-3 if dtype == torch.float32 else None
    assert_matches(out, reference.attention(q, k, v, causal=causal), dtype, "q*100", atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padded", [False, True])
def test_batch_invariant(backend, padded):
    """One sequence's output is bitwise the same alone or inside a batch (left-padded or not)."""
    q, k, v = _qkv(3, 26, 26, 4, 2, 64, torch.float16, "packed", seed=5)
    kv_start = torch.tensor([20, 3, 0], dtype=torch.int32, device=DEVICE) if padded else None
    full = ops.attention(q, k, v, causal=True, kv_start=kv_start, backend=backend)
    alone = ops.attention(q[1:2], k[1:2], v[1:2], causal=True, kv_start=None if kv_start is None else kv_start[1:2],
                          backend=backend)
    assert torch.equal(full[1:2], alone)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_zero_kv_start_is_bitwise_no_padding(backend, causal):
    """kv_start of zeros (any integer dtype) gives exactly the result without kv_start."""
    q, k, v = _qkv(2, 19, 40, 4, 1, 64, torch.bfloat16, "bhsd", seed=8)
    plain = ops.attention(q, k, v, causal=causal, backend=backend)
    for dtype in (torch.int32, torch.int64, torch.int16):
        zeros = torch.zeros(2, dtype=dtype, device=DEVICE)
        assert torch.equal(ops.attention(q, k, v, causal=causal, kv_start=zeros, backend=backend), plain)


@pytest.mark.parametrize("kv_start, match", [
    (torch.zeros(3, dtype=torch.int32), r"shape \(2,\)"),
    (torch.zeros(2), "integer"),
    (torch.zeros(2, dtype=torch.bool), "integer"),
    ([0, 1], "integer tensor"),
])
def test_kv_start_checked(kv_start, match):
    q = torch.randn(2, 4, 2, 16, device=DEVICE)
    if isinstance(kv_start, torch.Tensor):
        kv_start = kv_start.to(DEVICE)
    with pytest.raises(ValueError, match=match):
        ops.attention(q, q, q, kv_start=kv_start, backend="torch")


def test_head_dim_too_large_for_triton():
    q = torch.randn(1, 4, 2, 272, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to"):
        ops.attention(q, q, q, backend="triton")
