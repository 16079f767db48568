"""decode_attention kernels vs runtime/reference.py: shapes, GQA/MQA, strides, garbage, invariance.

Under the interpreter (no GPU) the split-KV kernel uses 16-key chunks, so caches
of a few dozen positions already exercise several splits, ragged last chunks and
splits past seqlens; on a GPU the chunks are >= 256 keys and the sizes grow.
Left padding (kv_start) is drawn per row: 0, inside the first tile, at and
around chunk boundaries (whole splits skipped), up to seqlens (no key seen);
garbage fills both the padding and the positions past seqlens.

The paged kernel (pools read through block tables) is tested the same way over
block sizes 1, 5, 16 and any other, tables of 1 to M blocks, lengths from 0 to
a full table, rows sharing blocks, unused table entries holding ids outside the
pool, NaN/inf in every pool slot no row sees, strided pools, tables and q,
batch invariance and block table checks. `paged_kv` builds such a cache (the
prefill tests in test_attention.py use it too).
"""
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from fuselm import ops, reference
from tests.checks import FP32_TOL, LOWP_FLOOR, assert_matches, kernel_backends
from tests.conftest import DEVICE

BACKENDS = kernel_backends("decode_attention")
ON_GPU = DEVICE.type == "cuda"
MAX_SMAX = 1100 if ON_GPU else 70
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _chunk(smax, head_dim):
    """The split length the triton kernel uses (to aim seqlens at chunk boundaries)."""
    from fuselm.kernels.decode import split_plan
    return split_plan(smax, head_dim, DEVICE)[0]


def _randn(shape, dtype, magnitude=1.0):
    return (torch.randn(shape, device=DEVICE) * magnitude).to(dtype)


def _cache(layout, B, smax, hkv, D, dtype, magnitude):
    """A [B, Smax, Hkv, D] cache view: contiguous, sliced out of a bigger buffer, or head-major."""
    if layout == "contiguous":
        return _randn((B, smax, hkv, D), dtype, magnitude)
    if layout == "sliced":  # a cache allocated with more positions, heads and padding than used
        return _randn((B, smax + 5, hkv + 1, D + 8), dtype, magnitude)[:, 2:smax + 2, 1:, 3:D + 3]
    return _randn((B, hkv, smax, D), dtype, magnitude).transpose(1, 2)  # [B, Hkv, Smax, D] storage


@st.composite
def decode_cases(draw):
    B = draw(st.integers(1, 3))
    smax = draw(st.integers(1, MAX_SMAX))
    hkv = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 3, 4, 8]))
    D = draw(st.sampled_from([16, 24, 64, 80, 96, 128, 256]))
    chunk = _chunk(smax, D)
    special = [0, 1, smax, chunk - 1, chunk, chunk + 1, 2 * chunk + 3]
    row_len = st.one_of(st.sampled_from([n for n in special if 0 <= n <= smax]), st.integers(0, smax))
    seqlens = draw(st.lists(row_len, min_size=B, max_size=B))
    kv_start = None
    if draw(st.booleans()):  # left padding: 0, inside the first tile, around chunk boundaries, up to seqlens
        kv_start = [min(draw(st.one_of(st.sampled_from([0, 3, chunk - 1, chunk, chunk + 1, 2 * chunk, L]),
                                       st.integers(0, L))), L) for L in seqlens]
    return dict(
        B=B, smax=smax, hkv=hkv, group=group, D=D,
        seqlens=seqlens, kv_start=kv_start,
        seqlens_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        dtype=draw(st.sampled_from(DTYPES)),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        k_layout=draw(st.sampled_from(["contiguous", "sliced", "head-major"])),
        v_layout=draw(st.sampled_from(["contiguous", "sliced", "head-major"])),
        q_sliced=draw(st.booleans()),
        magnitude=draw(st.sampled_from([1.0, 1.0, 20.0])),
        garbage=draw(st.sampled_from([None, float("nan"), float("inf")])),
    )


def _tolerance(q, k, v, scale, expected):
    """The dtype's usual bound plus the conditioning of softmax in fp32: a score s carries
    ~eps * sum_d |q_d k_d| of rounding in any summation order (kernel and reference alike),
    which exp turns into a relative weight error that moves the output by up to that times
    max |v|. It only matters for large magnitudes (scores in the hundreds). Non-finite garbage
    past seqlens never enters the computation, so it is left out of the bound."""
    group = q.shape[1] // k.shape[2]
    k_abs, v_abs = (t.float().abs().nan_to_num(nan=0.0, posinf=0.0) for t in (k, v))
    s_abs = torch.einsum("bhd,bshd->bhs", q.abs().float(), k_abs.repeat_interleave(group, 2))
    conditioning = 2 * torch.finfo(torch.float32).eps * s_abs.max() * scale * v_abs.max()
    out_scale = expected.abs().max().float().clamp(min=1.0)
    return (FP32_TOL if q.dtype == torch.float32 else LOWP_FLOOR[q.dtype]) * out_scale + conditioning


def _fill_invisible(cache, seqlens, kv_start, value):
    """Write `value` into every position before kv_start[b] or at/past seqlens[b] (in place, through the view)."""
    pos = torch.arange(cache.shape[1], device=cache.device).view(1, -1)
    hidden = pos >= seqlens.view(-1, 1)
    if kv_start is not None:
        hidden |= pos < kv_start.view(-1, 1)
    cache[hidden] = value


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=decode_cases())
@example(case=dict(B=4, smax=70, hkv=2, group=3, D=64, seqlens=[70, 70, 40, 33], kv_start=[5, 33, 40, 16],
                   seqlens_dtype=torch.int32, dtype=torch.bfloat16, scale=None, k_layout="sliced",
                   v_layout="head-major", q_sliced=True, magnitude=1.0, garbage=float("nan")))
def test_matches_reference(backend, case):
    B, hkv, D, dtype, mag = case["B"], case["hkv"], case["D"], case["dtype"], case["magnitude"]
    hq = hkv * case["group"]
    if case["q_sliced"]:  # q as a slice of a fused qkv projection output
        q = _randn((B, hq + 2 * hkv, D), dtype, mag)[:, :hq]
    else:
        q = _randn((B, hq, D), dtype, mag)
    k = _cache(case["k_layout"], B, case["smax"], hkv, D, dtype, mag)
    v = _cache(case["v_layout"], B, case["smax"], hkv, D, dtype, mag)
    seqlens = torch.tensor(case["seqlens"], dtype=case["seqlens_dtype"], device=DEVICE)
    kv_start = None if case["kv_start"] is None else torch.tensor(case["kv_start"], dtype=case["seqlens_dtype"],
                                                                  device=DEVICE)

    if case["garbage"] is not None:  # what lies before kv_start or past seqlens must not reach the output
        _fill_invisible(k, seqlens, kv_start, case["garbage"])
        _fill_invisible(v, seqlens, kv_start, case["garbage"])
    expected = reference.decode_attention(q, k, v, seqlens, scale=case["scale"], kv_start=kv_start)
    out = ops.decode_attention(q, k, v, seqlens, scale=case["scale"], kv_start=kv_start, backend=backend)
    scale = D ** -0.5 if case["scale"] is None else case["scale"]
    atol = _tolerance(q, k, v, scale, expected)
    assert_matches(out, expected, dtype, what=str(case), atol=atol)
    empty = seqlens <= (0 if kv_start is None else kv_start)
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "a row that sees no key must give zeros"


@pytest.mark.parametrize("backend", BACKENDS)
@given(B=st.integers(2, 5), smax=st.integers(1, MAX_SMAX), dtype=st.sampled_from(DTYPES), padded=st.booleans(),
       data=st.data())
def test_batch_invariance(backend, B, smax, dtype, padded, data):
    """Row b's output is bitwise the same computed alone or inside a bigger batch (left-padded or not)."""
    hkv, group, D = 2, 4, 64
    q = _randn((B, hkv * group, D), dtype)
    k = _randn((B, smax, hkv, D), dtype)
    v = _randn((B, smax, hkv, D), dtype)
    rows = st.lists(st.integers(0, smax), min_size=B, max_size=B)
    seqlens = torch.tensor(data.draw(rows), dtype=torch.int32, device=DEVICE)
    kv_start = torch.tensor(data.draw(rows), dtype=torch.int32, device=DEVICE).minimum(seqlens) if padded else None
    full = ops.decode_attention(q, k, v, seqlens, kv_start=kv_start, backend=backend)
    b = data.draw(st.integers(0, B - 1))
    alone = ops.decode_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], seqlens[b:b + 1],
                                 kv_start=None if kv_start is None else kv_start[b:b + 1], backend=backend)
    assert torch.equal(full[b:b + 1], alone)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("smax", [10, 3 * 16 + 5])  # one split (no combine) and several
def test_zero_kv_start_is_bitwise_no_padding(backend, smax):
    """kv_start of zeros (any integer dtype) gives exactly the result without kv_start."""
    B, hkv, group, D = 3, 2, 2, 32
    q = _randn((B, hkv * group, D), torch.bfloat16)
    k = _randn((B, smax, hkv, D), torch.bfloat16)
    v = _randn((B, smax, hkv, D), torch.bfloat16)
    seqlens = torch.tensor([smax, smax // 2, 1], dtype=torch.int32, device=DEVICE)
    plain = ops.decode_attention(q, k, v, seqlens, backend=backend)
    for dtype in (torch.int32, torch.int64, torch.uint8):
        zeros = torch.zeros(B, dtype=dtype, device=DEVICE)
        assert torch.equal(ops.decode_attention(q, k, v, seqlens, kv_start=zeros, backend=backend), plain)


@pytest.mark.parametrize("kv_start, match", [
    (torch.zeros(1, dtype=torch.int32), r"shape \(2,\)"),
    (torch.zeros(2, dtype=torch.float16), "integer"),
    (3, "integer tensor"),
])
def test_kv_start_checked(kv_start, match):
    q = torch.randn(2, 4, 16, device=DEVICE)
    cache = torch.randn(2, 8, 2, 16, device=DEVICE)
    seqlens = torch.full((2,), 8, dtype=torch.int32, device=DEVICE)
    if isinstance(kv_start, torch.Tensor):
        kv_start = kv_start.to(DEVICE)
    with pytest.raises(ValueError, match=match):
        ops.decode_attention(q, cache, cache, seqlens, kv_start=kv_start, backend="torch")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter, on inf - inf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where, value", [("q", "nan"), ("k", "nan"), ("k", "inf"), ("k", "-inf"),
                                          ("k_all", "-inf"), ("v", "nan")])
def test_nonfinite_visible_values_match_reference(backend, where, value):
    """NaN/inf inside the visible cache or in q behave like the reference's softmax: NaN or
    +inf scores make their heads NaN, -inf scores drop their keys (across whole splits), a
    row whose every visible score is -inf is NaN, NaN in V reaches the output."""
    chunk = _chunk(40, 32)
    B, smax, hkv, group, D = 2, 3 * chunk + 5, 2, 2, 32
    q = _randn((B, hkv * group, D), torch.float32)
    k = _randn((B, smax, hkv, D), torch.float32)
    v = _randn((B, smax, hkv, D), torch.float32)
    seqlens = torch.tensor([smax, smax - 7], dtype=torch.int32, device=DEVICE)
    # k: keys 0 .. chunk+2 of kv head 0 (a whole split and part of the next); k_all: all its keys
    target = {"q": q[0, 1], "k": k[1, :chunk + 3, 0], "k_all": k[1, :, 0], "v": v[1, smax - 8, 1]}[where]
    if value == "nan":
        target.fill_(float("nan"))
    else:  # q > 0 makes every score of those keys +inf or -inf for all heads of the group
        q[1, :group].abs_()
        target.fill_(float(value))
    expected = reference.decode_attention(q, k, v, seqlens)
    out = ops.decode_attention(q, k, v, seqlens, backend=backend)
    assert_matches(out, expected, torch.float32, what=f"{where}={value}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_seqlens_clamp_like_reference(backend):
    """seqlens outside [0, Smax] and kv_start outside [0, seqlens] break the caller's contract; the
    kernel still never reads past the cache and agrees with the reference (negative seqlens or
    kv_start past seqlens: nothing visible, seqlens > Smax: everything, kv_start < 0: from key 0)."""
    B, smax, hkv, group, D = 5, 2 * _chunk(40, 32) + 3, 1, 4, 32
    q = _randn((B, hkv * group, D), torch.float16)
    k = _randn((B, smax, hkv, D), torch.float16)
    v = _randn((B, smax, hkv, D), torch.float16)
    seqlens = torch.tensor([-5, smax + 1, 10 * smax, 7, smax], dtype=torch.int64, device=DEVICE)
    kv_start = torch.tensor([0, -3, 2, 9, 10 * smax], dtype=torch.int64, device=DEVICE)
    for start in (None, kv_start):
        out = ops.decode_attention(q, k, v, seqlens, kv_start=start, backend=backend)
        assert_matches(out, reference.decode_attention(q, k, v, seqlens, kv_start=start), torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, hq, hkv, smax, D", [(0, 4, 2, 8, 32), (2, 0, 1, 8, 32), (2, 4, 2, 0, 32)])
def test_empty_shapes(backend, B, hq, hkv, smax, D):
    """Empty batch, no query heads, or an empty cache: the reference's empty/zero result."""
    q = _randn((B, hq, D), torch.float16)
    k = _randn((B, smax, hkv, D), torch.float16)
    v = _randn((B, smax, hkv, D), torch.float16)
    seqlens = torch.zeros(B, dtype=torch.int32, device=DEVICE)
    out = ops.decode_attention(q, k, v, seqlens, backend=backend)
    assert torch.equal(out, reference.decode_attention(q, k, v, seqlens))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_capture(backend):
    """The decode step captures in a CUDA graph; replays follow seqlens and kv_start updated in place."""
    B, smax, hkv, group, D, dtype = 3, 2000, 2, 4, 128, torch.bfloat16
    q = _randn((B, hkv * group, D), dtype)
    k = _randn((B, smax, hkv, D), dtype)
    v = _randn((B, smax, hkv, D), dtype)
    seqlens = torch.tensor([1, 700, smax], dtype=torch.int32, device=DEVICE)
    kv_start = torch.zeros(B, dtype=torch.int32, device=DEVICE)
    ops.decode_attention(q, k, v, seqlens, kv_start=kv_start, backend=backend)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.decode_attention(q, k, v, seqlens, kv_start=kv_start, backend=backend)
    for lens, starts in (([0, 1, 2], [0, 0, 2]), ([300, 1999, 1000], [5, 600, 999]), ([smax, 257, 513], [0, 256, 3])):
        seqlens.copy_(torch.tensor(lens, dtype=torch.int32))
        kv_start.copy_(torch.tensor(starts, dtype=torch.int32))
        graph.replay()
        expected = reference.decode_attention(q, k, v, seqlens, kv_start=kv_start)
        assert_matches(out, expected, dtype, what=f"{lens} {starts}")


# ---------------------------------------------------------------------------------------------
# Paged KV cache: pools [num_blocks, block_size, Hkv, D] read through block tables [B, M]
# ---------------------------------------------------------------------------------------------

def paged_backends(op):
    """The kernel backends whose module defines `op` already (each must pass the paged tests)."""
    import importlib
    return [b for b in kernel_backends(op) if hasattr(importlib.import_module(ops._MODULES[b][op]), op)]


PAGED_BACKENDS = paged_backends("paged_decode_attention")
# ids an unused table entry may hold: outside the pool, negative, int32's extremes
WILD_IDS = (-1, -2**31, 2**31 - 1, 10**6)


def _pool(layout, blocks, page, hkv, D, dtype, magnitude, gen):
    """(k_pool, v_pool) [blocks, page, Hkv, D]: separate tensors, one [blocks, 2, page, Hkv, D]
    buffer (K and V of a block side by side), views into bigger buffers, or head-major storage."""
    def randn(*shape):
        return (torch.randn(shape, generator=gen) * magnitude).to(dtype=dtype, device=DEVICE)
    if layout == "kv_packed":
        both = randn(blocks, 2, page, hkv, D)
        return both[:, 0], both[:, 1]
    if layout == "sliced":
        return tuple(randn(blocks + 2, page, hkv + 1, D + 8)[1:-1, :, 1:, 3:D + 3] for _ in range(2))
    if layout == "head_major":
        return tuple(randn(blocks, hkv, page, D).transpose(1, 2) for _ in range(2))
    return randn(blocks, page, hkv, D), randn(blocks, page, hkv, D)


def paged_kv(seqlens, M, page, hkv, D, dtype, *, magnitude=1.0, layout="contiguous", share=0, garbage=None,
             table_sliced=False, seed=0):
    """A paged cache for rows of lengths `seqlens` (ints), M table entries of `page` keys each:
    (k_pool, v_pool, block_tables, ref_tables).

    Blocks are taken in random order, with spare blocks in the pool; rows b > 0 share row 0's first
    `share` blocks (a common prefix). Entries past a row's last block point anywhere in block_tables
    (ids outside the pool too, never read) and at block 0 in ref_tables (what the reference can
    index). `garbage` (NaN, inf) fills every pool slot that no row sees. block_tables may be a
    column slice of a wider table."""
    gen = torch.Generator().manual_seed(seed)
    B = len(seqlens)
    blocks = B * M + 3
    k_pool, v_pool = _pool(layout, blocks, page, hkv, D, dtype, magnitude, gen)
    table = torch.randperm(blocks, generator=gen)[:B * M].view(B, M)
    table[1:, :share] = table[0, :share]
    used = torch.tensor([-(-min(max(n, 0), M * page) // page) for n in seqlens]).view(B, 1)
    unused = torch.arange(M).view(1, M) >= used                                   # [B, M]
    wild = torch.tensor(WILD_IDS)[torch.randint(len(WILD_IDS), (B, M), generator=gen)]
    tables = torch.where(unused, wild, table), torch.where(unused, 0, table)
    if garbage is not None:
        seen = torch.zeros(blocks, page, dtype=torch.bool)
        for b, n in enumerate(seqlens):
            j = torch.arange(min(max(n, 0), M * page))
            seen[table[b, j // page], j % page] = True
        k_pool[~seen.to(DEVICE)] = garbage
        v_pool[~seen.to(DEVICE)] = garbage
    if table_sliced:  # a row stride wider than M
        tables = tuple(torch.cat([t, t[:, :2]], 1)[:, :M] for t in tables)
    block_tables, ref_tables = (t.to(dtype=torch.int32, device=DEVICE) for t in tables)
    return k_pool, v_pool, block_tables, ref_tables


@st.composite
def paged_decode_cases(draw):
    B = draw(st.integers(1, 3))
    page = draw(st.one_of(st.sampled_from([1, 5, 16]), st.integers(1, 24)))
    M = draw(st.integers(1, max(1, MAX_SMAX // page)))
    smax = M * page
    D = draw(st.sampled_from([16, 24, 64, 80, 128]))
    chunk = _chunk(smax, D)
    special = [0, 1, smax, page - 1, page, page + 1, chunk - 1, chunk, chunk + 1]
    row_len = st.one_of(st.sampled_from([n for n in special if 0 <= n <= smax]), st.integers(0, smax))
    return dict(
        seqlens=draw(st.lists(row_len, min_size=B, max_size=B)), M=M, page=page,
        hkv=draw(st.integers(1, 3)), group=draw(st.sampled_from([1, 2, 3, 4, 8])), D=D,
        dtype=draw(st.sampled_from(DTYPES)), seqlens_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        layout=draw(st.sampled_from(["contiguous", "kv_packed", "sliced", "head_major"])),
        share=draw(st.integers(0, M)), table_sliced=draw(st.booleans()), q_sliced=draw(st.booleans()),
        magnitude=draw(st.sampled_from([1.0, 1.0, 20.0])),
        garbage=draw(st.sampled_from([None, float("nan"), float("inf")])), seed=draw(st.integers(0, 2**16)),
    )


def _check_paged_decode(backend, seqlens, M, page, hkv, group, D, dtype, seqlens_dtype=torch.int32, scale=None,
                        layout="contiguous", share=0, table_sliced=False, q_sliced=True, magnitude=1.0,
                        garbage=float("nan"), seed=0):
    B, hq = len(seqlens), hkv * group
    k_pool, v_pool, tables, ref_tables = paged_kv(seqlens, M, page, hkv, D, dtype, magnitude=magnitude,
                                                  layout=layout, share=share, garbage=garbage,
                                                  table_sliced=table_sliced, seed=seed)
    q = _randn((B, hq + 2 * hkv, D) if q_sliced else (B, hq, D), dtype, magnitude)[:, :hq]  # from a fused qkv
    lengths = torch.tensor(seqlens, dtype=seqlens_dtype, device=DEVICE)
    expected = reference.paged_decode_attention(q, k_pool, v_pool, ref_tables, lengths, scale=scale)
    out = ops.paged_decode_attention(q, k_pool, v_pool, tables, lengths, scale=scale, backend=backend)
    k, v = reference.gather_pages(k_pool, ref_tables), reference.gather_pages(v_pool, ref_tables)
    atol = _tolerance(q, k, v, D ** -0.5 if scale is None else scale, expected)
    what = f"seqlens={seqlens} M={M} page={page} hkv={hkv} group={group} D={D} {dtype} {layout} share={share}"
    assert_matches(out, expected, dtype, what=what, atol=atol)
    empty = lengths <= 0
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "a row that sees no key must give zeros"
    return q, k_pool, v_pool, tables, lengths, out


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@given(case=paged_decode_cases())
@example(case=dict(seqlens=[0, 48, 37], M=3, page=16, hkv=2, group=3, D=64, dtype=torch.bfloat16,
                   seqlens_dtype=torch.int32, scale=None, layout="kv_packed", share=2, table_sliced=True,
                   q_sliced=True, magnitude=1.0, garbage=float("nan"), seed=1))  # empty, full, shared prefix
@example(case=dict(seqlens=[70, 1, 33], M=70, page=1, hkv=1, group=8, D=80, dtype=torch.float16,
                   seqlens_dtype=torch.int64, scale=0.3, layout="sliced", share=40, table_sliced=False,
                   q_sliced=False, magnitude=20.0, garbage=float("inf"), seed=2))  # one key per block, MQA
@example(case=dict(seqlens=[64, 17, 5], M=13, page=5, hkv=3, group=1, D=24, dtype=torch.float32,
                   seqlens_dtype=torch.int32, scale=None, layout="head_major", share=1, table_sliced=True,
                   q_sliced=True, magnitude=1.0, garbage=float("nan"), seed=3))  # an odd block size, MHA
def test_paged_matches_reference(backend, case):
    """Any block size, lengths 0 .. M * block_size, shared blocks, unused entries pointing anywhere,
    NaN/inf in every slot no row sees, strided pools, tables and q."""
    _check_paged_decode(backend, **case)


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@pytest.mark.parametrize("page", [1, 5, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_block_sizes(backend, page, dtype):
    """Each block size and dtype: an empty row, a full table, an odd length across several splits,
    GQA, rows sharing blocks, wild unused entries and NaN everywhere else."""
    M = 64 // page
    _check_paged_decode(backend, [0, M * page, M * page // 2 + 3], M, page, hkv=2, group=4, D=32, dtype=dtype,
                        share=M // 3, table_sliced=True)


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@given(B=st.integers(2, 4), page=st.sampled_from([1, 5, 16]), dtype=st.sampled_from(DTYPES), data=st.data())
def test_paged_batch_invariance(backend, B, page, dtype, data):
    """Row b's output is bitwise the same alone (its own table row, the same pools) or in a batch."""
    M = data.draw(st.integers(1, MAX_SMAX // page))
    seqlens = data.draw(st.lists(st.integers(0, M * page), min_size=B, max_size=B))
    k_pool, v_pool, tables, _ = paged_kv(seqlens, M, page, 2, 32, dtype, share=M // 2, seed=B)
    q = _randn((B, 8, 32), dtype)
    lengths = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    full = ops.paged_decode_attention(q, k_pool, v_pool, tables, lengths, backend=backend)
    b = data.draw(st.integers(0, B - 1))
    alone = ops.paged_decode_attention(q[b:b + 1], k_pool, v_pool, tables[b:b + 1], lengths[b:b + 1], backend=backend)
    assert torch.equal(full[b:b + 1], alone)


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
def test_paged_out_of_range_seqlens_clamp_like_reference(backend):
    """seqlens outside [0, M * block_size] break the contract; the kernel still reads no entry past
    the table and agrees with the reference (negative: nothing visible, too long: every key)."""
    page, M = 5, 9
    k_pool, v_pool, tables, ref_tables = paged_kv([M * page] * 3, M, page, 1, 32, torch.float16)
    q = _randn((3, 4, 32), torch.float16)
    lengths = torch.tensor([-4, M * page + 1, 10**6], dtype=torch.int64, device=DEVICE)
    out = ops.paged_decode_attention(q, k_pool, v_pool, tables, lengths, backend=backend)
    assert_matches(out, reference.paged_decode_attention(q, k_pool, v_pool, ref_tables, lengths), torch.float16)


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@pytest.mark.parametrize("B, hq, M, page", [(0, 4, 3, 16), (2, 0, 3, 16), (2, 4, 0, 16)])
def test_paged_empty_shapes(backend, B, hq, M, page):
    """Empty batch, no query heads, or a table of no blocks: the reference's empty/zero result."""
    q = _randn((B, hq, 32), torch.float16)
    pool = _randn((4, page, 2, 32), torch.float16)
    tables = torch.zeros((B, M), dtype=torch.int32, device=DEVICE)
    seqlens = torch.zeros(B, dtype=torch.int32, device=DEVICE)
    out = ops.paged_decode_attention(q, pool, pool, tables, seqlens, backend=backend)
    assert torch.equal(out, reference.paged_decode_attention(q, pool, pool, tables, seqlens))


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@pytest.mark.parametrize("tables, match", [
    (torch.zeros(2, 3, dtype=torch.int64), "int32"),              # the engine's tables are int32
    (torch.zeros(3, 3, dtype=torch.int32), r"\[B=2, max_blocks\]"),  # one row per sequence
    (torch.zeros(6, dtype=torch.int32), r"\[B=2, max_blocks\]"),
    ([[0, 1, 2], [3, 4, 5]], "a list"),
])
def test_paged_block_tables_checked(backend, tables, match):
    q = torch.randn(2, 4, 16, device=DEVICE)
    pool = torch.randn(6, 4, 2, 16, device=DEVICE)
    seqlens = torch.full((2,), 8, dtype=torch.int32, device=DEVICE)
    if isinstance(tables, torch.Tensor):
        tables = tables.to(DEVICE)
    with pytest.raises(ValueError, match=rf"block_tables must be .*{match}"):
        ops.paged_decode_attention(q, pool, pool, tables, seqlens, backend=backend)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", PAGED_BACKENDS)
def test_paged_cuda_graph_capture(backend):
    """The paged decode step captures in a CUDA graph; replays follow seqlens and block tables
    updated in place (the split plan is M * block_size's, whatever the lengths)."""
    page, M, dtype = 16, 128, torch.bfloat16
    seqlens = [1, 700, M * page]
    k_pool, v_pool, tables, _ = paged_kv(seqlens, M, page, 2, 128, dtype, garbage=None)
    q = _randn((3, 8, 128), dtype)
    lengths = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    tables = torch.where(tables < 0, 0, tables).remainder(k_pool.shape[0])  # valid ids: updates below reuse them
    ops.paged_decode_attention(q, k_pool, v_pool, tables, lengths, backend=backend)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.paged_decode_attention(q, k_pool, v_pool, tables, lengths, backend=backend)
    for lens in ([0, 1, 2], [300, 1999, 1000], [M * page, 257, 513]):
        lengths.copy_(torch.tensor(lens, dtype=torch.int32))
        tables.copy_(tables.roll(1, dims=0))
        graph.replay()
        expected = reference.paged_decode_attention(q, k_pool, v_pool, tables, lengths)
        assert_matches(out, expected, dtype, what=f"{lens}")
