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
- Every vector width the kernel is built at (FUSELM_ATTENTION_ISA caps it, in a subprocess): the
  reference, bitwise and invariance tests above at 4 and 8 float lanes (the default runs the CPU's
  widest).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fuselm import native, reference
from tests.checks import assert_matches
from tests.test_attention import _make  # q/k/v views in the layouts the Triton kernel is tested with
from tests.test_decode import _tolerance  # the dtype's bound plus softmax's conditioning at large scores

ROOT = Path(__file__).resolve().parents[1]
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


# ---------------------------------------------------------------- paged

BLOCK_SIZES = [1, 16, 5]  # one key per block, the engine's, and an odd size that no key block divides
BAD_IDS = [-1, 2**31 - 1, -2**31]  # what unused table entries may hold: the kernel never reads them


def _pool(layout, num_blocks, block_size, hkv, D, dtype, g, magnitude):
    """A [num_blocks, block_size, Hkv, D] pool: contiguous, sliced out of a bigger buffer, or head-major."""
    def buffer(*shape):
        return (torch.randn(*shape, generator=g) * magnitude).to(dtype)

    if layout == "contiguous":
        return buffer(num_blocks, block_size, hkv, D)
    if layout == "sliced":
        return buffer(num_blocks + 1, block_size + 2, hkv + 1, D + 8)[1:, 1:block_size + 1, 1:, 3:D + 3]
    return buffer(num_blocks, hkv, block_size, D).transpose(1, 2)


def _pages(B, block_size, M, seqlens, shared, unused, pool_layout, hkv, D, dtype, garbage, magnitude, g):
    """Pools and block tables for rows of seqlens[b] <= M * block_size keys: each row's pages are distinct
    blocks in random order, except that row 1 reads the first `shared` pages of row 0 (a shared prefix);
    every pool slot no row reads holds `garbage`. Returns k_pool, v_pool, the table the kernel gets
    (unused entries: 0 or ids of no block, `unused`) and the one the reference gathers (unused: 0)."""
    pages = [-(-n // block_size) for n in seqlens]
    shared = min(shared, *pages[:2]) if B >= 2 else 0
    num_blocks = sum(pages) - shared + 2  # two blocks no row reads
    perm = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.zeros(B, M, dtype=torch.int32)
    for b, n in enumerate(pages):
        for i in range(n):
            table[b, i] = table[0, i] if b == 1 and i < shared else perm.pop()
    k_pool, v_pool = (_pool(pool_layout, num_blocks, block_size, hkv, D, dtype, g, magnitude) for _ in range(2))
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for b, n in enumerate(seqlens):
        j = torch.arange(n)
        used[table[b, j // block_size].long(), j % block_size] = True
    _fill(k_pool, ~used, garbage)
    _fill(v_pool, ~used, garbage)
    kernel_table = table.clone()
    if unused != "zero":
        unread = torch.arange(M).view(1, M) >= torch.tensor(pages).view(B, 1)
        kernel_table[unread] = unused
    return k_pool, v_pool, kernel_table, table


@st.composite
def paged_cases(draw, prefill=False):
    block_size, B = draw(st.sampled_from(BLOCK_SIZES)), draw(st.integers(1, 4))
    M = draw(st.integers(1, 150 // block_size + 1))
    full = M * block_size
    Sq = draw(st.one_of(st.just(1), st.integers(1, min(full, 40)))) if prefill else 1
    lo = Sq if prefill else 0  # prefill rows hold at least their queries
    row = st.one_of(st.sampled_from([lo, full, max(lo, min(full, 65))]), st.integers(lo, full))
    seqlens = draw(st.lists(row, min_size=B, max_size=B))
    if prefill and draw(st.booleans()):
        seqlens = [Sq] * B  # no cached prefix: the queries are the whole row
    return dict(B=B, block_size=block_size, M=M, Sq=Sq, seqlens=seqlens, hkv=draw(st.integers(1, 3)),
                G=draw(st.sampled_from([1, 2, 3, 4, 8])), D=draw(st.sampled_from(HEAD_DIMS)),
                shared=draw(st.integers(0, 3)), unused=draw(st.sampled_from(["zero", *BAD_IDS])),
                pool_layout=draw(st.sampled_from(["contiguous", "sliced", "head-major"])),
                q_sliced=draw(st.booleans()), len_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
                dtype=draw(st.sampled_from(DTYPES)), scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
                causal=draw(st.booleans()) if prefill else False, magnitude=draw(st.sampled_from([1.0, 3.0])),
                garbage=draw(st.sampled_from([float("nan"), float("inf"), float("-inf")])),
                seed=draw(st.integers(0, 2**16)))


def _paged(B, block_size, M, Sq, seqlens, hkv, G, D, shared, unused, pool_layout, q_sliced, len_dtype, dtype,
           magnitude, garbage, seed, prefill):
    """q ([B, Hq, D] for decode, [B, Sq, Hq, D] for prefill; a slice of a packed qkv when q_sliced), pools,
    the kernel's and the reference's tables, seqlens."""
    g = torch.Generator().manual_seed(seed)
    hq = hkv * G
    shape = (B, Sq) if prefill else (B,)
    q = (torch.randn(*shape, hq + 2 * hkv if q_sliced else hq, D, generator=g) * magnitude).to(dtype)[..., :hq, :]
    k_pool, v_pool, table, ref_table = _pages(B, block_size, M, seqlens, shared, unused, pool_layout, hkv, D, dtype,
                                              garbage, magnitude, g)
    return q, k_pool, v_pool, table, ref_table, torch.tensor(seqlens, dtype=len_dtype)


def _same_path(case):
    """Whether the dense op on the gathered (contiguous) cache takes the paged call's path: the split-KV
    decode runs for one non-causal query over rows [Hkv, D] contiguous with D a multiple of 16, a key
    block loop otherwise. Within a path the key blocks and splits are the same, so results are bitwise."""
    return case["pool_layout"] == "contiguous" or case["D"] % 16 != 0 or case["Sq"] > 1 or case["causal"]


def _visible_cache(pool, ref_table, seqlens):
    """The gathered cache [B, M * block_size, Hkv, D] in float32 with zeros past each row's seqlens."""
    cache = reference.gather_pages(pool.float(), ref_table)
    return cache.masked_fill((torch.arange(cache.shape[1]).view(1, -1) >= seqlens.view(-1, 1))[..., None, None], 0.0)


@settings(max_examples=4 * settings.default.max_examples)  # a case takes milliseconds
@given(case=paged_cases())
@example(case=dict(B=3, block_size=16, M=10, Sq=1, seqlens=[150, 0, 160], hkv=3, G=3, D=64, shared=3, unused=-1,
                   pool_layout="contiguous", q_sliced=True, len_dtype=torch.int32, dtype=torch.bfloat16, scale=None,
                   causal=False, magnitude=1.0, garbage=float("nan"), seed=0))  # SmolLM2: split-KV, full table
@example(case=dict(B=2, block_size=5, M=30, Sq=1, seqlens=[149, 131], hkv=2, G=4, D=33, shared=2, unused=2**31 - 1,
                   pool_layout="sliced", q_sliced=False, len_dtype=torch.int64, dtype=torch.float16, scale=0.3,
                   causal=False, magnitude=3.0, garbage=float("inf"), seed=1))  # key blocks across pages
def test_paged_decode_matches_reference(ops, case):
    c = dict(case)
    scale, causal, dtype = c.pop("scale"), c.pop("causal"), c["dtype"]
    q, k_pool, v_pool, table, ref_table, seqlens = _paged(**c, prefill=False)
    out = native.paged_decode_attention(q, k_pool, v_pool, table, seqlens, scale=scale)
    expected = reference.paged_decode_attention(*_f32(q, k_pool, v_pool), ref_table, seqlens, scale=scale)
    k, v = _visible_cache(k_pool, ref_table, seqlens), _visible_cache(v_pool, ref_table, seqlens)
    atol = _tolerance(q, k, v, c["D"] ** -0.5 if scale is None else scale, expected)
    assert_matches(out, expected, dtype, str(case), atol=atol)
    assert not out[seqlens == 0].any(), "a row that sees no key must give zeros"
    if _same_path(case):  # bitwise the dense op over the gathered cache (garbage included: never read)
        dense = native.decode_attention(q, reference.gather_pages(k_pool, ref_table),
                                        reference.gather_pages(v_pool, ref_table), seqlens, scale=scale)
        assert torch.equal(out, dense), "paged decode differs from decode_attention on the gathered cache"


@settings(max_examples=4 * settings.default.max_examples)
@given(case=paged_cases(prefill=True))
@example(case=dict(B=2, block_size=16, M=9, Sq=37, seqlens=[140, 37], hkv=3, G=3, D=64, shared=2, unused=-2**31,
                   pool_layout="contiguous", q_sliced=True, len_dtype=torch.int32, dtype=torch.bfloat16, scale=None,
                   causal=True, magnitude=1.0, garbage=float("nan"), seed=2))  # a chunk after a prefix; no prefix
@example(case=dict(B=2, block_size=1, M=80, Sq=1, seqlens=[80, 1], hkv=1, G=2, D=16, shared=1, unused="zero",
                   pool_layout="head-major", q_sliced=False, len_dtype=torch.int64, dtype=torch.float32, scale=None,
                   causal=False, magnitude=1.0, garbage=float("-inf"), seed=3))
def test_paged_attention_matches_reference(ops, case):
    c = dict(case)
    scale, causal, dtype = c.pop("scale"), c.pop("causal"), c["dtype"]
    q, k_pool, v_pool, table, ref_table, seqlens = _paged(**c, prefill=True)
    out = native.paged_attention(q, k_pool, v_pool, table, seqlens, causal=causal, scale=scale)
    expected = reference.paged_attention(*_f32(q, k_pool, v_pool), ref_table, seqlens, causal=causal, scale=scale)
    k, v = _visible_cache(k_pool, ref_table, seqlens), _visible_cache(v_pool, ref_table, seqlens)
    # decode's bound with each head's largest |q_d| over the queries: scores reach the hundreds at magnitude 3
    atol = _tolerance(q.abs().amax(1), k, v, c["D"] ** -0.5 if scale is None else scale, expected)
    assert_matches(out, expected, dtype, str(case), atol=atol)
    if _same_path(case):  # row b: bitwise the dense op over its gathered keys [0, seqlens[b])
        k, v = reference.gather_pages(k_pool, ref_table), reference.gather_pages(v_pool, ref_table)  # garbage too
        for b, n in enumerate(seqlens.tolist()):
            dense = native.attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], causal=causal, scale=scale)
            assert torch.equal(out[b:b + 1], dense), f"row {b} differs from attention on its gathered keys"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 80])  # split-KV decode and its fallback (D not a multiple of 16)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_paged_is_bitwise_dense_on_gathered_cache(ops, dtype, D, block_size):
    """By design: a paged call loads the same key blocks (decode: the same 64-key splits) as the dense op,
    page run by page run, so over contiguous pools its results are bitwise those of decode_attention /
    attention on gather_pages(pool, table). Rows of 0, odd and full lengths, two rows sharing blocks."""
    M = 160 // block_size + 1
    seqlens = [M * block_size, 0, 131, 67]
    k_pool, v_pool, _, table = _pages(4, block_size, M, seqlens, 4, "zero", "contiguous", 3, D, dtype,
                                      float("nan"), 1.0, torch.Generator().manual_seed(D + block_size))
    k, v = reference.gather_pages(k_pool, table), reference.gather_pages(v_pool, table)
    lens = torch.tensor(seqlens, dtype=torch.int32)
    q = torch.randn(4, 19, 9, D).to(dtype)
    assert torch.equal(native.paged_decode_attention(q[:, 0], k_pool, v_pool, table, lens),
                       native.decode_attention(q[:, 0], k, v, lens))
    for causal in (True, False):
        out = native.paged_attention(q[[0, 2, 3]], k_pool, v_pool, table[[0, 2, 3]], lens[[0, 2, 3]], causal=causal)
        for row, b in enumerate((0, 2, 3)):
            n = seqlens[b]
            assert torch.equal(out[row:row + 1], native.attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n],
                                                                  causal=causal))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 33])
def test_paged_batch_invariance(ops, dtype, D):
    """Row b alone == row b of the batch == the batch on one thread, bitwise, for both paged ops."""
    seqlens = [150, 1, 64, 99, 0]
    k_pool, v_pool, table, _ = _pages(5, 16, 10, seqlens, 2, -1, "contiguous", 3, D, dtype, float("nan"), 1.0,
                                      torch.Generator().manual_seed(D))
    lens = torch.tensor(seqlens, dtype=torch.int32)
    q = torch.randn(5, 9, D).to(dtype)
    decoded = native.paged_decode_attention(q, k_pool, v_pool, table, lens)
    assert torch.equal(_threads(1, lambda: native.paged_decode_attention(q, k_pool, v_pool, table, lens)), decoded)
    qp, rows = torch.randn(4, 1, 9, D).to(dtype), [0, 1, 2, 3]  # Sq = 1: every row holds a query
    lens_p = lens[rows]
    for causal in (True, False):
        full = native.paged_attention(qp, k_pool, v_pool, table[rows], lens_p, causal=causal)
        assert torch.equal(_threads(1, lambda: native.paged_attention(qp, k_pool, v_pool, table[rows], lens_p,
                                                                      causal=causal)), full)
        for b in rows:
            alone = native.paged_attention(qp[b:b + 1], k_pool, v_pool, table[b:b + 1], lens_p[b:b + 1], causal=causal)
            assert torch.equal(alone, full[b:b + 1])
    for b in range(5):
        assert torch.equal(native.paged_decode_attention(q[b:b + 1], k_pool, v_pool, table[b:b + 1], lens[b:b + 1]),
                           decoded[b:b + 1])


def test_paged_out_form_and_lengths(ops):
    """paged_decode_attention.out (the replayed plan's form) writes the functional result bitwise and refuses a
    wrong out; seqlens past the table's capacity or negative clamp like the dense op's; a table with
    non-unit column stride; ops.paged_* dispatch to native."""
    g = torch.Generator().manual_seed(4)
    k_pool, v_pool = torch.randn(12, 4, 2, 32, generator=g), torch.randn(12, 4, 2, 32, generator=g)
    table = torch.randperm(12, generator=g).int().view(2, 6)
    q, lens = torch.randn(2, 4, 32, generator=g), torch.tensor([17, 9], dtype=torch.int32)
    expected = ops.paged_decode_attention(q, k_pool, v_pool, table, lens, None)
    out = torch.empty_like(expected)
    ops.paged_decode_attention.out(q, k_pool, v_pool, table, lens, None, out=out)
    assert torch.equal(out, expected)
    with pytest.raises(RuntimeError, match=r"fuselm::paged_decode_attention: out must be a contiguous"):
        ops.paged_decode_attention.out(q, k_pool, v_pool, table, lens, None, out=torch.empty(1))
    wild = torch.tensor([-5, 10 * 24])
    assert_matches(native.paged_decode_attention(q, k_pool, v_pool, table, wild),
                   reference.paged_decode_attention(q, k_pool, v_pool, table, wild), torch.float32)
    wide = torch.zeros(2, 12, dtype=torch.int32)
    wide[:, ::2] = table
    assert torch.equal(native.paged_decode_attention(q, k_pool, v_pool, wide[:, ::2], lens), expected)
    from fuselm import ops as fuselm_ops
    assert torch.equal(fuselm_ops.paged_decode_attention(q, k_pool, v_pool, table, lens, backend="native"), expected)
    qs = q.unsqueeze(1).expand(2, 3, 4, 32)
    assert torch.equal(fuselm_ops.paged_attention(qs, k_pool, v_pool, table, lens, backend="native"),
                       native.paged_attention(qs, k_pool, v_pool, table, lens))


def _paged_opcheck_cases():
    g = torch.Generator().manual_seed(0)
    q, pool = torch.randn(2, 3, 4, 16, generator=g), torch.randn(6, 5, 2, 16, generator=g)
    table, lens = torch.tensor([[4, 0, 2], [1, 5, 0]], dtype=torch.int32), torch.tensor([11, 3])
    return [("paged_decode_attention", (q[:, 0], pool, pool, table, lens, None)),
            ("paged_decode_attention", (q[:, 0].bfloat16(), pool.bfloat16(), pool.bfloat16(), table, lens.int(), 0.5)),
            ("paged_attention", (q, pool, pool, table, lens, True, None)),
            ("paged_attention", (q.half(), pool.half(), pool.half(), table, lens, False, 0.3))]


@pytest.mark.parametrize("case", range(len(_paged_opcheck_cases())))
def test_paged_opcheck(ops, case):
    name, args = _paged_opcheck_cases()[case]
    torch.library.opcheck(getattr(ops, name).default, args)


@pytest.mark.parametrize("B, Hq, D, blocks, M", [(0, 2, 8, 3, 2), (2, 0, 8, 3, 2), (2, 2, 0, 3, 2), (2, 2, 8, 0, 0),
                                                  (2, 2, 8, 3, 0)])
def test_paged_empty_shapes(ops, B, Hq, D, blocks, M):
    """Empty batch, heads, head dim, pool or table: the reference's empty / zero result (seqlens 0 where the
    table or the pool holds nothing to read)."""
    pool, table = torch.randn(blocks, 4, 1, D), torch.zeros(B, M, dtype=torch.int32)
    lens = torch.full((B,), 3 if blocks and M else 0, dtype=torch.int32)
    q = torch.randn(B, 3, Hq, D)
    assert torch.equal(native.paged_decode_attention(q[:, 0], pool, pool, table, lens, scale=1.0),
                       reference.paged_decode_attention(q[:, 0], pool, pool, table, lens, scale=1.0))
    assert torch.equal(native.paged_attention(q, pool, pool, table, lens, scale=1.0),
                       reference.paged_attention(q, pool, pool, table, lens, scale=1.0))


def test_paged_errors_name_the_problem(ops):
    q, pool = torch.randn(2, 3, 4, 16), torch.randn(6, 5, 2, 16)
    q1, table, lens = q[:, 0], torch.tensor([[4, 0, 2], [1, 5, 0]], dtype=torch.int32), torch.tensor([11, 3])
    pd, pa = native.paged_decode_attention, native.paged_attention
    cases = [
        (lambda: pd(q1, pool, pool, table.long(), lens), "paged_decode_attention: block_tables must be an int32 tensor, got Long"),
        (lambda: pa(q, pool, pool, table.long(), lens), "paged_attention: block_tables must be an int32 tensor"),
        (lambda: pd(q1, pool, pool, table[0], lens), r"block_tables must have shape \(2, max_blocks\), got \[3\]"),
        (lambda: pa(q, pool, pool, table[:1], lens), r"block_tables must have shape \(2, max_blocks\), got \[1, 3\]"),
        (lambda: pd(q1, pool, pool, table.masked_fill(table == 2, 6), lens),
         r"block_tables\[0, 2\] = 6 is not a block of the pool \(6 blocks\), and row 0 reads it \(seqlens 11"),
        (lambda: pa(q, pool, pool, table.masked_fill(table == 1, -1), lens), r"block_tables\[1, 0\] = -1 is not a block"),
        (lambda: pd(q1, pool, pool[:, :4], table, lens), r"v_pool has shape \[6, 4, 2, 16\] but k_pool has"),
        (lambda: pd(q1, pool[0], pool[0], table, lens), r"k_pool must be \[num_blocks, block_size, H, D\]"),
        (lambda: pd(q1, pool[:, :0], pool[:, :0], table, lens), "has blocks of 0 keys"),
        (lambda: pd(q1, pool[..., :8], pool[..., :8], table, lens), "k_pool .* must share the head dim with q"),
        (lambda: pd(q1[:, :3], pool, pool, table, lens), r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
        (lambda: pd(q1, pool.half(), pool.half(), table, lens), "k_pool is Half but q is Float"),
        (lambda: pd(q, pool, pool, table, lens), r"paged_decode_attention: q must be \[B, H, D\]"),
        (lambda: pa(q1, pool, pool, table, lens), r"paged_attention: q must be \[B, S, H, D\]"),
        (lambda: pd(q1, pool, pool, table, lens.float()), "seqlens must be an integer tensor"),
        (lambda: pa(q, pool, pool, table, lens[:1]), r"seqlens must have shape \(2,\)"),
        (lambda: pd(q1, pool, pool, table.to("meta"), lens),
         r"paged_decode_attention runs on the CPU only \(block_tables is on meta\); use backend='triton' on GPUs"),
        (lambda: pa(q, pool.to("meta"), pool, table, lens), r"paged_attention runs on the CPU only \(k_pool is on meta\)"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


# ---------------------------------------------------------------- each vector width

@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_each_vector_width(ops, isa):
    """The checks of this file that compare against the reference or bitwise, on the build of `isa`'s
    width (capped by the CPU: on an AVX2-only CPU avx2 is the default build again)."""
    env = dict(os.environ, FUSELM_ATTENTION_ISA=isa)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "reference or bitwise or invariance or nonfinite or large_scores"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def test_bad_vector_width_name_is_clear(ops):
    code = ("import torch\nfrom fuselm import native\nq = torch.ones(1, 2, 16)\n"
            "native.decode_attention(q, torch.ones(1, 4, 2, 16), torch.ones(1, 4, 2, 16), torch.tensor([4]))\n")
    env = dict(os.environ, FUSELM_ATTENTION_ISA="sse9")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "FUSELM_ATTENTION_ISA must be portable, avx2 or avx512" in out.stderr
