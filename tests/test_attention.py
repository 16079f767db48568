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
(bitwise the same as none) and kv_start argument checks. Paged attention
(queries after a cached prefix, keys read through block tables; tests/test_decode.py's
paged_kv builds the cache) is drawn over block sizes, prefix lengths (none,
some, a full table, nothing stored), Sq = 1 and chunks, strided pools and q,
shared blocks, wild unused table entries and NaN/inf in unseen slots; explicit
tests cover each block size and dtype, no prefix against dense attention,
batch invariance and block table checks.
Under the interpreter (no GPU) lengths stay small: it runs every tile in numpy.
"""
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from fuselm import ops, reference
from tests.checks import assert_matches, kernel_backends
from tests.conftest import DEVICE
from tests.test_decode import paged_backends, paged_kv

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


@pytest.mark.parametrize("step", [True, False])
def test_both_dense_address_schemes(step, monkeypatch):
    """Dense K/V addresses stepped one tile at a time (triton >= 3.9) or formed in each tile from the
    key offsets (older triton; kernels/attention.py STEP_POINTERS): both match the reference, so
    each is tested whichever triton runs here."""
    if "triton" not in BACKENDS:
        pytest.skip("no triton backend on this device")
    from fuselm.kernels import attention as kernel
    monkeypatch.setattr(kernel, "STEP_POINTERS", step)
    for dtype, layout, causal, kv_start in ((torch.float16, "nan_padded", True, [5, 20]),
                                            (torch.bfloat16, "bhsd", False, None),
                                            (torch.float32, "packed", True, None)):
        _check("triton", B=2, Sq=19, Sk=40, Hq=4, Hkv=2, D=80, dtype=dtype, causal=causal, layout=layout,
               kv_start=kv_start)


def test_head_dim_too_large_for_triton():
    q = torch.randn(1, 4, 2, 272, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to"):
        ops.attention(q, q, q, backend="triton")


# ---------------------------------------------------------------------------------------------
# Paged KV cache: queries after a cached prefix, keys read through block tables
# ---------------------------------------------------------------------------------------------

PAGED_BACKENDS = paged_backends("paged_attention")


def _check_paged(backend, seqlens, Sq, M, page, Hkv, group, D, dtype, causal=True, scale=None, layout="contiguous",
                 share=0, table_sliced=False, q_layout="packed", garbage=float("nan"), seed=0):
    """paged_attention against the reference on a paged cache built by tests/test_decode.py's paged_kv."""
    B, Hq = len(seqlens), Hkv * group
    k_pool, v_pool, tables, ref_tables = paged_kv(seqlens, M, page, Hkv, D, dtype, layout=layout, share=share,
                                                  garbage=garbage, table_sliced=table_sliced, seed=seed)
    (q,) = _make(B, Sq, [Hq], D, dtype, q_layout, torch.Generator().manual_seed(seed + 1))
    lengths = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    out = ops.paged_attention(q, k_pool, v_pool, tables, lengths, causal=causal, scale=scale, backend=backend)
    expected = reference.paged_attention(q, k_pool, v_pool, ref_tables, lengths, causal=causal, scale=scale)
    what = (f"seqlens={seqlens} Sq={Sq} M={M} page={page} Hq={Hq} Hkv={Hkv} D={D} {dtype} causal={causal} "
            f"scale={scale} {layout} share={share} q {q_layout}")
    assert_matches(out, expected, dtype, what)
    return q, k_pool, v_pool, tables, lengths, out


@st.composite
def paged_cases(draw):
    page = draw(st.one_of(st.sampled_from([1, 5, 16]), st.integers(1, 24)))
    M = draw(st.integers(1, max(1, MAX_LEN // page)))
    Sk = M * page
    Sq = draw(st.one_of(st.just(1), st.integers(1, Sk)))
    # per row: no prefix (Sq keys, all the queries' own), a prefix, the full table, nothing stored
    row_len = st.one_of(st.just(Sq), st.integers(Sq, Sk), st.just(Sk), st.just(0))
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    return dict(
        seqlens=draw(st.lists(row_len, min_size=B, max_size=B)), Sq=Sq, M=M, page=page, Hkv=Hkv,
        group=draw(st.sampled_from([1, 2, 4, 5])), D=draw(st.sampled_from([64, 80, 96, 128])),
        dtype=draw(st.sampled_from(DTYPES)), causal=draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.05, 0.3, 1.0, -0.2])),
        layout=draw(st.sampled_from(["contiguous", "kv_packed", "sliced", "head_major"])),
        share=draw(st.integers(0, M)), table_sliced=draw(st.booleans()),
        q_layout=draw(st.sampled_from(["contiguous", "packed", "bhsd", "strided_d"])),
        garbage=draw(st.sampled_from([None, float("nan"), float("inf")])), seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@given(case=paged_cases())
@example(case=dict(seqlens=[45, 0, 64], Sq=45, M=4, page=16, Hkv=2, group=2, D=64, dtype=torch.bfloat16,
                   causal=True, scale=None, layout="kv_packed", share=2, table_sliced=True, q_layout="packed",
                   garbage=float("nan"), seed=1))  # no prefix, nothing stored, a full table (a prefix)
@example(case=dict(seqlens=[37, 1, 20], Sq=1, M=40, page=1, Hkv=1, group=5, D=80, dtype=torch.float16,
                   causal=True, scale=None, layout="sliced", share=10, table_sliced=False, q_layout="bhsd",
                   garbage=float("inf"), seed=2))  # one query (a decode step), one key per block, MQA
@example(case=dict(seqlens=[23, 7, 50], Sq=7, M=11, page=5, Hkv=3, group=1, D=96, dtype=torch.float32,
                   causal=False, scale=0.3, layout="head_major", share=1, table_sliced=True,
                   q_layout="strided_d", garbage=float("nan"), seed=3))  # an odd block size, not causal
def test_paged_matches_reference(backend, case):
    """Queries after a prefix (bottom-right causal per row) over any block size; shared blocks, unused
    table entries pointing anywhere and NaN/inf in every slot no row sees must not matter."""
    _check_paged(backend, **case)


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@pytest.mark.parametrize("page", [1, 5, 16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Sq", [1, 19])
def test_paged_block_sizes(backend, page, dtype, Sq):
    """Each block size and dtype, one query and a chunk: a row without prefix (seqlens = Sq), an empty
    row, a full table and an odd prefix, GQA, rows sharing blocks, NaN in every unused slot."""
    M = 48 // page
    _check_paged(backend, [Sq, 0, M * page, Sq + 13], Sq, M, page, Hkv=2, group=2, D=64, dtype=dtype,
                 share=M // 3, table_sliced=True)


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_paged_no_prefix_matches_dense(backend, causal):
    """seqlens = Sq for every row (a prompt's first chunk stored in the pool): the dense attention of
    the same keys."""
    q, k_pool, v_pool, tables, lengths, out = _check_paged(backend, [29, 29], 29, 6, 5, Hkv=2, group=2, D=64,
                                                           dtype=torch.float16, causal=causal)
    k, v = (reference.gather_pages(p, tables)[:, :29] for p in (k_pool, v_pool))
    assert_matches(out, reference.attention(q, k, v, causal=causal), torch.float16, "dense")


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@pytest.mark.parametrize("page", [1, 16])
def test_paged_batch_invariant(backend, page):
    """A row's output is bitwise the same alone (its own table row, the same pools) or in a batch."""
    M = 48 // page
    seqlens = [40, 26, M * page]
    k_pool, v_pool, tables, _ = paged_kv(seqlens, M, page, 2, 64, torch.float16, share=M // 2, seed=5)
    (q,) = _make(3, 26, [4], 64, torch.float16, "packed", torch.Generator().manual_seed(5))
    lengths = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    full = ops.paged_attention(q, k_pool, v_pool, tables, lengths, backend=backend)
    for b in range(3):
        alone = ops.paged_attention(q[b:b + 1], k_pool, v_pool, tables[b:b + 1], lengths[b:b + 1], backend=backend)
        assert torch.equal(full[b:b + 1], alone)


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@pytest.mark.parametrize("tables, match", [
    (torch.zeros(2, 3, dtype=torch.int64), "int32"),
    (torch.zeros(1, 3, dtype=torch.int32), r"\[B=2, max_blocks\]"),
    (torch.zeros(2, 3, 1, dtype=torch.int32), r"\[B=2, max_blocks\]"),
    (None, "a NoneType"),
])
def test_paged_block_tables_checked(backend, tables, match):
    q = torch.randn(2, 3, 4, 16, device=DEVICE)
    pool = torch.randn(6, 4, 2, 16, device=DEVICE)
    seqlens = torch.full((2,), 8, dtype=torch.int32, device=DEVICE)
    if isinstance(tables, torch.Tensor):
        tables = tables.to(DEVICE)
    with pytest.raises(ValueError, match=rf"block_tables must be .*{match}"):
        ops.paged_attention(q, pool, pool, tables, seqlens, backend=backend)
