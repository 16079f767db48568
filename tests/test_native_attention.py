"""fuselm.native.attention / decode_attention (csrc/attention_cpu.cpp) against runtime/reference.py.

- Property tests (hypothesis) against the float32 reference on the same inputs, within
  tests.checks' per-dtype tolerance: odd head dims (1 .. 256), GQA ratios 1..8, lengths 1 to past
  several key blocks (64 keys at D = 64, 16 at D = 256) and query blocks, Sq < Sk and Sq > Sk,
  causal or not, any scale, strided views (packed qkv, head-major storage, a strided head dim, views
  into NaN-filled buffers), per-row kv_start and seqlens with NaN / inf garbage before kv_start
  and past seqlens, int32 and int64 lengths.
- Non-finite values inside the visible keys follow the reference's softmax (NaN, +inf, -inf
  scores, a first key block of only -inf scores), large scores do not overflow.
- Batch invariance: a row's output is bitwise the same alone, in a batch, and with 1 or 2 threads.
- torch.library.opcheck, empty shapes, out-of-range lengths, clear errors (CUDA tensors included).
"""
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fuselm import native, reference
from tests.checks import assert_matches
from tests.test_attention import _make  # q/k/v views in the layouts the Triton kernel is tested with
from tests.test_decode import _tolerance  # the dtype's bound plus softmax's conditioning at large scores

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEAD_DIMS = [1, 5, 16, 33, 64, 80, 96, 128, 256]
LAYOUTS = ["contiguous", "packed", "bhsd", "strided_d", "nan_padded"]  # tests.test_attention._make's


@pytest.fixture(scope="module")
def ops():
    native.build()
    return torch.ops.fuselm


def _fill(t, rows_hidden, value):
    """Write `value` into t[b, j] wherever rows_hidden[b, j] (in place, through the view)."""
    t[rows_hidden] = value


def _f32(*ts):
    return [None if t is None else t.float() for t in ts]


# ---------------------------------------------------------------- prefill

@st.composite
def prefill_cases(draw):
    D = draw(st.sampled_from(HEAD_DIMS))
    Sk = draw(st.integers(1, 150))
    Sq = draw(st.one_of(st.just(Sk), st.integers(1, Sk), st.just(1), st.integers(Sk, Sk + 10)))
    B, Hkv = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    start = st.one_of(st.just(0), st.integers(0, Sk), st.just(Sk))
    return dict(B=B, Sq=Sq, Sk=Sk, Hkv=Hkv, G=draw(st.integers(1, 8)), D=D, dtype=draw(st.sampled_from(DTYPES)),
                causal=draw(st.booleans()), scale=draw(st.sampled_from([None, 0.05, 0.3, -0.2])),
                layout=draw(st.sampled_from(LAYOUTS)),
                kv_start=draw(st.one_of(st.none(), st.lists(start, min_size=B, max_size=B))),
                start_dtype=draw(st.sampled_from([torch.int32, torch.int64])), seed=draw(st.integers(0, 2**16)))


def _prefill(B, Sq, Sk, Hkv, G, D, dtype, layout, seed, kv_start=None, start_dtype=torch.int32):
    """q, k, v and kv_start as a tensor, with NaN written into each row's hidden keys."""
    g = torch.Generator().manual_seed(seed)
    if Sq == Sk:  # the model's case: q, k, v are views of one packed projection
        q, k, v = _make(B, Sq, [Hkv * G, Hkv, Hkv], D, dtype, layout, g)
    else:
        (q,) = _make(B, Sq, [Hkv * G], D, dtype, layout, g)
        k, v = _make(B, Sk, [Hkv, Hkv], D, dtype, layout, g)
    if kv_start is None:
        return q, k, v, None
    start = torch.tensor(kv_start, dtype=start_dtype)
    hidden = torch.arange(Sk).view(1, Sk) < start.view(B, 1)
    _fill(k, hidden, float("nan"))
    _fill(v, hidden, float("nan"))
    return q, k, v, start


@settings(max_examples=4 * settings.default.max_examples)  # a case takes milliseconds
@given(case=prefill_cases())
@example(case=dict(B=2, Sq=130, Sk=130, Hkv=1, G=1, D=64, dtype=torch.float32, causal=True, scale=None,
                   layout="packed", kv_start=[70, 0], start_dtype=torch.int64, seed=1))  # blocks
@example(case=dict(B=1, Sq=9, Sk=40, Hkv=2, G=8, D=256, dtype=torch.bfloat16, causal=True, scale=None,
                   layout="nan_padded", kv_start=[17], start_dtype=torch.int32, seed=2))
@example(case=dict(B=1, Sq=12, Sk=5, Hkv=1, G=3, D=7, dtype=torch.float16, causal=True, scale=0.3,
                   layout="strided_d", kv_start=None, start_dtype=torch.int32, seed=3))  # Sq > Sk
def test_attention_matches_reference(ops, case):
    c = dict(case)
    causal, scale, dtype = c.pop("causal"), c.pop("scale"), c["dtype"]
    q, k, v, kv_start = _prefill(**c)
    out = native.attention(q, k, v, causal=causal, scale=scale, kv_start=kv_start)
    expected = reference.attention(*_f32(q, k, v), causal=causal, scale=scale, kv_start=kv_start)
    assert_matches(out, expected, dtype, str(case))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_attention_long_rows_and_query_blocks(ops, dtype, causal):
    """Several key blocks and query blocks per row, every head dim class, GQA 3 (SmolLM2's)."""
    for D, S in ((64, 200), (80, 131), (256, 70)):
        q, k, v, kv_start = _prefill(2, S, S, 3, 3, D, dtype, "packed", seed=D, kv_start=[0, 45])
        expected = reference.attention(*_f32(q, k, v), causal=causal, kv_start=kv_start)
        assert_matches(native.attention(q, k, v, causal=causal, kv_start=kv_start), expected, dtype, f"D={D}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_attention_large_scores(ops, dtype, causal):
    """q * 100: scores in the thousands; the running max keeps exp in range."""
    q, k, v, _ = _prefill(1, 70, 90, 2, 2, 64, dtype, "contiguous", seed=4)
    q = q * 100
    out = native.attention(q, k, v, causal=causal)
    assert out.isfinite().all()
    # fp32 scores near 1e3 carry absolute rounding ~1e-4 that exp turns into relative error in p
    atol = 1e-3 if dtype == torch.float32 else None
    assert_matches(out, reference.attention(*_f32(q, k, v), causal=causal), dtype, "q*100", atol=atol)


# ---------------------------------------------------------------- decode

def _cache(layout, B, smax, hkv, D, dtype, g, magnitude):
    """A [B, Smax, Hkv, D] cache: contiguous, sliced out of a bigger buffer, or head-major storage."""
    def buffer(*shape):
        return (torch.randn(*shape, generator=g) * magnitude).to(dtype)

    if layout == "contiguous":
        return buffer(B, smax, hkv, D)
    if layout == "sliced":
        return buffer(B, smax + 5, hkv + 1, D + 8)[:, 2:smax + 2, 1:, 3:D + 3]
    return buffer(B, hkv, smax, D).transpose(1, 2)


@st.composite
def decode_cases(draw):
    B, smax = draw(st.integers(1, 4)), draw(st.integers(1, 150))
    row = st.one_of(st.sampled_from([0, 1, smax, min(64, smax), min(65, smax)]), st.integers(0, smax))
    seqlens = draw(st.lists(row, min_size=B, max_size=B))
    kv_start = None
    if draw(st.booleans()):
        kv_start = [draw(st.integers(0, n)) for n in seqlens]
    return dict(B=B, smax=smax, hkv=draw(st.integers(1, 3)), G=draw(st.sampled_from([1, 2, 3, 4, 8])),
                D=draw(st.sampled_from(HEAD_DIMS)), seqlens=seqlens, kv_start=kv_start,
                len_dtype=draw(st.sampled_from([torch.int32, torch.int64])), dtype=draw(st.sampled_from(DTYPES)),
                scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
                layout=draw(st.sampled_from(["contiguous", "sliced", "head-major"])), q_sliced=draw(st.booleans()),
                magnitude=draw(st.sampled_from([1.0, 3.0])), garbage=draw(st.sampled_from([float("nan"), float("inf")])),
                seed=draw(st.integers(0, 2**16)))


def _decode(B, smax, hkv, G, D, seqlens, kv_start, len_dtype, dtype, layout, q_sliced, magnitude, garbage, seed):
    g = torch.Generator().manual_seed(seed)
    hq = hkv * G
    q = (torch.randn(B, hq + 2 * hkv if q_sliced else hq, D, generator=g) * magnitude).to(dtype)[:, :hq]  # qkv
    k, v = (_cache(layout, B, smax, hkv, D, dtype, g, magnitude) for _ in range(2))
    seqlens = torch.tensor(seqlens, dtype=len_dtype)
    pos = torch.arange(smax).view(1, smax)
    hidden = pos >= seqlens.view(B, 1)
    if kv_start is not None:
        kv_start = torch.tensor(kv_start, dtype=len_dtype)
        hidden |= pos < kv_start.view(B, 1)
    _fill(k, hidden, garbage)  # what lies before kv_start or past seqlens must never be read
    _fill(v, hidden, garbage)
    return q, k, v, seqlens, kv_start


@settings(max_examples=4 * settings.default.max_examples)
@given(case=decode_cases())
@example(case=dict(B=4, smax=150, hkv=3, G=3, D=64, seqlens=[150, 64, 65, 0], kv_start=[5, 64, 1, 0],
                   len_dtype=torch.int32, dtype=torch.bfloat16, scale=None, layout="sliced", q_sliced=True,
                   magnitude=1.0, garbage=float("nan"), seed=0))
def test_decode_matches_reference(ops, case):
    c = dict(case)
    scale, dtype = c.pop("scale"), c["dtype"]
    q, k, v, seqlens, kv_start = _decode(**c)
    out = native.decode_attention(q, k, v, seqlens, scale=scale, kv_start=kv_start)
    expected = reference.decode_attention(*_f32(q, k, v), seqlens, scale=scale, kv_start=kv_start)
    atol = _tolerance(q, k, v, c["D"] ** -0.5 if scale is None else scale, expected)
    assert_matches(out, expected, dtype, str(case), atol=atol)
    empty = seqlens <= (0 if kv_start is None else kv_start)
    assert not out[empty].any(), "a row that sees no key must give zeros"


def test_decode_out_of_range_lengths_clamp_like_reference(ops):
    """Negative or > Smax seqlens and kv_start break the caller's contract; nothing past the cache is read."""
    B, smax, D = 5, 40, 32
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(B, 4, D, generator=g), torch.randn(B, smax, 2, D, generator=g), torch.randn(B, smax, 2, D, generator=g)
    seqlens = torch.tensor([-5, smax + 1, 10 * smax, 7, smax])
    kv_start = torch.tensor([0, -3, 2, 9, 10 * smax])
    for start in (None, kv_start):
        assert_matches(native.decode_attention(q, k, v, seqlens, kv_start=start),
                       reference.decode_attention(q, k, v, seqlens, kv_start=start), torch.float32)


# ---------------------------------------------------------------- non-finite values in the visible keys

@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("where, value", [("q", "nan"), ("k", "nan"), ("k", "inf"), ("k", "-inf"),
                                          ("k_all", "-inf"), ("v", "nan"), ("v", "inf")])
def test_nonfinite_visible_values_match_reference(ops, where, value):
    """As the reference's softmax: NaN or +inf scores make their heads NaN, -inf scores drop their keys
    (here a whole first key block and part of the next), a row of only -inf scores is NaN, NaN / inf in
    V reach the output. Both ops; prefill is non-causal so every query sees the same keys."""
    B, smax, hkv, G, D = 2, 150, 2, 2, 32  # 128 keys per block at D = 32
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, hkv * G, D, generator=g)
    k, v = torch.randn(B, smax, hkv, D, generator=g), torch.randn(B, smax, hkv, D, generator=g)
    seqlens = torch.tensor([smax, smax - 7], dtype=torch.int32)
    target = {"q": q[0, 1], "k": k[1, :131, 0], "k_all": k[1, :, 0], "v": v[1, smax - 8, 1]}[where]
    if value == "nan" or where == "v":
        target.fill_(float(value))
    else:  # q > 0 makes every score of those keys +inf or -inf for all heads of the group
        q[1, :G].abs_()
        target.fill_(float(value))
    assert_matches(native.decode_attention(q, k, v, seqlens), reference.decode_attention(q, k, v, seqlens),
                   torch.float32, f"decode {where}={value}")
    qs = q.unsqueeze(1).expand(B, 3, hkv * G, D)  # three identical queries per row
    assert_matches(native.attention(qs, k, v, causal=False), reference.attention(qs, k, v, causal=False),
                   torch.float32, f"prefill {where}={value}")


# ---------------------------------------------------------------- batch invariance

def _threads(n, fn):
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        return fn()
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padded", [False, True])
def test_batch_invariance(ops, dtype, padded):
    """Row b alone == row b of the batch == the batch on one thread, bitwise, for both ops."""
    B, S = 4, 150
    q, k, v, kv_start = _prefill(B, S, S, 3, 3, 64, dtype, "packed", seed=5,
                                 kv_start=[20, 3, 0, 77] if padded else None)
    full = native.attention(q, k, v, kv_start=kv_start)
    assert torch.equal(_threads(1, lambda: native.attention(q, k, v, kv_start=kv_start)), full)
    seqlens = torch.tensor([150, 1, 64, 99], dtype=torch.int32)
    qd = q[:, -1]
    decoded = native.decode_attention(qd, k, v, seqlens, kv_start=kv_start)
    assert torch.equal(_threads(1, lambda: native.decode_attention(qd, k, v, seqlens, kv_start=kv_start)), decoded)
    for b in range(B):
        start = None if kv_start is None else kv_start[b:b + 1]
        assert torch.equal(native.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], kv_start=start), full[b:b + 1])
        alone = native.decode_attention(qd[b:b + 1], k[b:b + 1], v[b:b + 1], seqlens[b:b + 1], kv_start=start)
        assert torch.equal(alone, decoded[b:b + 1])


@pytest.mark.parametrize("causal", [True, False])
def test_zero_kv_start_is_bitwise_no_padding(ops, causal):
    """kv_start of zeros (int32, int64, int16, uint8) gives exactly the result without it."""
    q, k, v, _ = _prefill(2, 19, 40, 1, 4, 64, torch.bfloat16, "bhsd", seed=8)
    seqlens = torch.tensor([40, 17])
    plain, plain_decode = native.attention(q, k, v, causal=causal), native.decode_attention(q[:, 0], k, v, seqlens)
    for dtype in (torch.int32, torch.int64, torch.int16, torch.uint8):
        zeros = torch.zeros(2, dtype=dtype)
        assert torch.equal(native.attention(q, k, v, causal=causal, kv_start=zeros), plain)
        assert torch.equal(native.decode_attention(q[:, 0], k, v, seqlens.to(dtype), kv_start=zeros), plain_decode)


# ---------------------------------------------------------------- registration, shapes, errors

def _opcheck_cases():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 5, 6, 40, generator=g), torch.randn(2, 7, 2, 40, generator=g), torch.randn(2, 7, 2, 40, generator=g)
    seqlens, start = torch.tensor([7, 3], dtype=torch.int32), torch.tensor([1, 0])
    return [("attention", (q, k, v, True, None, None)),
            ("attention", (q.bfloat16(), k.bfloat16(), v.bfloat16(), False, 0.3, start)),
            ("attention", (q.half().transpose(1, 2).contiguous().transpose(1, 2), k.half(), v.half(), True, None,
                           start.int())),
            ("decode_attention", (q[:, 0], k, v, seqlens, None, None)),
            ("decode_attention", (q[:, 0].bfloat16(), k.bfloat16(), v.bfloat16(), seqlens.long(), 0.5, start))]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(ops, case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(ops, name).default, args)


@pytest.mark.parametrize("B, Sq, Sk, Hq, Hkv, D", [(0, 3, 4, 2, 1, 8), (2, 0, 4, 2, 1, 8), (2, 3, 0, 2, 1, 8),
                                                   (2, 3, 4, 0, 1, 8), (2, 3, 4, 2, 1, 0)])
def test_empty_shapes(ops, B, Sq, Sk, Hq, Hkv, D):
    """Empty batch, queries, keys, heads or head dim: the reference's empty / zero result."""
    q, k, v = torch.randn(B, Sq, Hq, D), torch.randn(B, Sk, Hkv, D), torch.randn(B, Sk, Hkv, D)
    for causal in (True, False):  # scale given: the reference's default D ** -0.5 fails at D = 0
        out = native.attention(q, k, v, causal=causal, scale=1.0)
        assert torch.equal(out, reference.attention(q, k, v, causal=causal, scale=1.0))
    if Sq > 0:
        seqlens = torch.full((B,), Sk, dtype=torch.int32)
        out = native.decode_attention(q[:, 0], k, v, seqlens, scale=1.0)
        assert torch.equal(out, reference.decode_attention(q[:, 0], k, v, seqlens, scale=1.0))


def test_errors_name_the_problem(ops):
    q, kv = torch.randn(2, 3, 4, 16), torch.randn(2, 5, 2, 16)
    q1, lens = q[:, 0], torch.tensor([5, 5])
    cases = [
        (lambda: ops.attention(q, kv, kv[:, :4]), r"v has shape \[2, 4, 2, 16\] but k has \[2, 5, 2, 16\]"),
        (lambda: ops.attention(q, kv.half(), kv.half()), "k is Half but q is Float"),
        (lambda: ops.attention(q[..., :8], kv, kv), "must share batch and head dim with q"),
        (lambda: ops.attention(q[:, :, :3], kv, kv), r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
        (lambda: ops.attention(q.double(), kv.double(), kv.double()), "q must be float32, float16 or bfloat16"),
        (lambda: ops.attention(q[0], kv, kv), r"q must be \[B, S, H, D\]"),
        (lambda: ops.attention(q, kv, kv, kv_start=torch.zeros(2)), "kv_start must be an integer tensor"),
        (lambda: ops.attention(q, kv, kv, kv_start=torch.zeros(3, dtype=torch.int32)), r"kv_start must have shape \(2,\)"),
        (lambda: ops.decode_attention(q, kv, kv, lens), r"q must be \[B, H, D\]"),
        (lambda: ops.decode_attention(q1, kv, kv, lens.float()), "seqlens must be an integer tensor"),
        (lambda: ops.decode_attention(q1, kv, kv, lens[:1]), r"seqlens must have shape \(2,\)"),
        (lambda: ops.decode_attention(q1, kv[0], kv[0], lens), r"k_cache must be \[B, S, H, D\]"),
        (lambda: native.attention(q, kv.to("meta"), kv), r"attention runs on the CPU only \(k is on meta\); use "
                                                         r"backend='triton' on GPUs"),
        (lambda: native.decode_attention(q1, kv, kv, lens.to("meta")), r"runs on the CPU only \(seqlens is on meta\)"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()
