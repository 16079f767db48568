"""decode_attention kernels vs runtime/reference.py: shapes, GQA/MQA, strides, garbage, invariance.

Under the interpreter (no GPU) the split-KV kernel uses 16-key chunks, so caches
of a few dozen positions already exercise several splits, ragged last chunks and
splits past seqlens; on a GPU the chunks are >= 256 keys and the sizes grow.
Left padding (kv_start) is drawn per row: 0, inside the first tile, at and
around chunk boundaries (whole splits skipped), up to seqlens (no key seen);
garbage fills both the padding and the positions past seqlens.
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
