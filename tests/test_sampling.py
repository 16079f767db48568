"""fuselm.ops.sample of every backend against runtime/reference.sampling_probs.

Sampling is random, so it is checked three ways:
- Statistics: many rows of the same logits in one call. The total-variation
  distance between the empirical frequencies and the reference distribution
  must stay below tv_bound (its expectation plus a McDiarmid deviation that a
  correct sampler exceeds with probability < 1e-6), and
  test_bound_detects_off_by_one proves that a sampler whose top-k / top-p /
  min-p set is one token off (a tie dropped, a token too many) exceeds it.
- Support: no drawn token ever lies outside the kept set. The oracle
  (kept_band) re-derives that set in float64 from the float32 scaled logits,
  widened (loose) or narrowed (strict) by SLACK at the top-p and min-p cuts, so
  float rounding exactly at a threshold is no failure; the reference itself
  must lie between the two.
- Exactness: temperature 0 and top_k == 1 are argmax; seeds reproduce and
  differ; the memory layout of the logits does not change the tokens.
Property-test logits lie on a grid (integers times a scale), so ties are exact
and distinct values are far apart in probability. The random draws come from
seeded generators, so every run sees the same tokens.
"""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuselm import ops, reference
from tests.checks import kernel_backends
from tests.conftest import DEVICE

KERNELS = kernel_backends("sample")
BACKENDS = ["torch"] + KERNELS  # "torch" validates the reference and the oracles themselves
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SLACK = 1e-5
N_STAT = 4000  # rows per statistical check
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]


def gen(seed=0):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def draw(backend, logits, seed=0, **params):
    out = ops.sample(logits, generator=gen(seed), backend=backend, **params)
    assert out.shape == (logits.shape[0],) and out.dtype == torch.int64 and out.device == logits.device
    return out.cpu()


def _per_row(value, rows, dtype):
    """A number or a [B] / 0-dim tensor -> [B, 1] on the CPU."""
    return torch.as_tensor(value).cpu().to(dtype).reshape(-1).expand(rows).reshape(rows, 1)


def kept_band(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """(loose, strict) [B, V] bool: what a sampler may draw / what the reference must keep.

    Rows must hold a distribution (no NaN, a finite max). Top-k ranks the float32
    scaled logits, keeping ties; top-p keeps a token while the renormalized mass
    of strictly larger tokens is < top_p (+-SLACK); min-p keeps p >= (min_p
    +-SLACK) * max p. Temperature-0 rows keep the argmax alone.
    """
    B, V = logits.shape
    t = _per_row(temperature, B, torch.float32)
    k = _per_row(top_k, B, torch.int64)
    p_top = _per_row(top_p, B, torch.float64)
    p_min = _per_row(min_p, B, torch.float64)
    x = logits.detach().float().cpu()
    l = (x / torch.where(t == 0, torch.ones_like(t), t)).double()    # [B, V], exactly the float32 values
    srt, order = l.sort(-1)
    above = torch.searchsorted(srt, l, right=True)                     # index of the first larger value
    in_k = (k == 0) | (V - above < k)
    q = torch.where(in_k, (l - l.max(-1, keepdim=True).values).exp(), 0.0)
    q = q / q.sum(-1, keepdim=True)
    suffix = torch.cat([q.gather(-1, order).flip(-1).cumsum(-1).flip(-1), torch.zeros(B, 1, dtype=q.dtype)], -1)
    mass_above = suffix.gather(-1, above)                              # mass of strictly larger tokens
    q_max = q.max(-1, keepdim=True).values
    loose = in_k & (mass_above < p_top + SLACK) & (q >= (p_min - SLACK) * q_max)
    strict = in_k & (mass_above < p_top - SLACK) & (q >= (p_min + SLACK) * q_max) & (q > 1e-30)
    argmax = torch.zeros(B, V, dtype=torch.bool).scatter_(1, x.argmax(-1, keepdim=True), True)
    greedy = t == 0
    return torch.where(greedy, argmax, loose), torch.where(greedy, argmax, strict)


def assert_in_support(tokens, loose, logits):
    ok = loose.gather(1, tokens.view(-1, 1)).view(-1)
    if not ok.all():
        r = int((~ok).nonzero()[0])
        raise AssertionError(f"row {r} drew token {int(tokens[r])} outside the kept set "
                             f"{loose[r].nonzero().view(-1).tolist()} (logits {logits[r].tolist()[:16]}...)")


def frequencies(tokens, V):
    return torch.bincount(tokens, minlength=V).double() / tokens.numel()


def tv(p, q):
    return 0.5 * (p.double() - q.double()).abs().sum().item()


def tv_bound(p, n, fail_prob=1e-6):
    """E[TV] <= sum_i sqrt(p_i (1 - p_i) / n) / 2, plus t with exp(-2 n t^2) = fail_prob."""
    p = p.double()
    return 0.5 * (p * (1 - p) / n).sqrt().sum().item() + math.sqrt(math.log(1 / fail_prob) / (2 * n))


# ---------------------------------------------------------------- statistics

# Boundary tokens carry >= 12% of the mass, two of them tie (0.14), so any top-k /
# top-p / min-p set one token off moves the distribution well past tv_bound.
PROBS = torch.tensor([0.25, 0.18, 0.14, 0.14, 0.12, 0.08, 0.04, 0.025, 0.015, 0.005, 0.003, 0.002])
PERM = torch.tensor([7, 2, 10, 0, 5, 11, 3, 8, 1, 6, 9, 4])  # so index order says nothing
STAT_LOGITS = torch.empty(12).index_put_((PERM,), PROBS.log())
# name -> (parameters, the filter that sets the kept set when several are on)
CONFIGS = {
    "temperature": (dict(temperature=0.7), None),
    "top_k_tie": (dict(top_k=3), "top_k"),             # the 3rd value is tied: 4 tokens kept
    "top_k": (dict(top_k=2), "top_k"),
    "top_p_tie": (dict(top_p=0.5), "top_p"),           # cut inside the tie: both kept
    "top_p": (dict(top_p=0.3), "top_p"),
    "min_p": (dict(min_p=0.5), "min_p"),
    "hot_top_p": (dict(temperature=1.5, top_p=0.55), "top_p"),
    "all_top_k": (dict(temperature=2.0, top_k=5, top_p=0.8, min_p=0.3), "top_k"),
    "all_top_p": (dict(temperature=1.3, top_k=6, top_p=0.7, min_p=0.3), "top_p"),
    "all_min_p": (dict(temperature=1.3, top_k=7, top_p=0.9, min_p=0.6), "min_p"),
}


def stat_logits(dtype):
    return STAT_LOGITS.to(dtype).to(DEVICE).expand(N_STAT, -1)


def reference_probs(logits_row, params):
    return reference.sampling_probs(logits_row.view(1, -1).cpu(), **params)[0].double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_frequencies_match_reference(backend, name):
    params = CONFIGS[name][0]
    logits = stat_logits(torch.float32)
    p = reference_probs(logits[0], params)
    tokens = draw(backend, logits, **params)
    assert_in_support(tokens, p.view(1, -1).expand(N_STAT, -1) > 0, logits)
    dist = tv(frequencies(tokens, 12), p)
    assert dist < tv_bound(p, N_STAT), f"{name}: TV {dist:.4f} >= bound {tv_bound(p, N_STAT):.4f}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,name", [(torch.float16, "all_top_k"), (torch.bfloat16, "all_min_p")])
def test_frequencies_low_precision_logits(backend, dtype, name):
    params = CONFIGS[name][0]
    logits = stat_logits(dtype)
    p = reference_probs(logits[0], params)
    dist = tv(frequencies(draw(backend, logits, **params), 12), p)
    assert dist < tv_bound(p, N_STAT), f"{dtype}: TV {dist:.4f} >= bound {tv_bound(p, N_STAT):.4f}"


def _detectable(p, wrong):
    """A sampler drawing from `wrong` fails the TV check against p (w.p. > 1 - 1e-6):
    its frequencies lie within tv_bound(wrong) of `wrong`, so farther than tv_bound(p) from p."""
    return tv(p, wrong) > tv_bound(p, N_STAT) + tv_bound(wrong, N_STAT)


@pytest.mark.parametrize("name", [n for n, (_, binding) in CONFIGS.items() if binding])
def test_bound_detects_off_by_one(name):
    """A kept set with one token too many or too few, or without the binding filter, fails."""
    params, binding = CONFIGS[name]
    p = reference_probs(STAT_LOGITS, params)
    base = reference_probs(STAT_LOGITS, dict(temperature=params.get("temperature", 1.0)))
    kept = p > 0
    wrong_sets = [kept.clone().index_fill_(0, torch.where(kept, -1.0, base).argmax(), True)]
    if kept.sum() > 1:
        wrong_sets.append(kept.clone().index_fill_(0, torch.where(kept, base, 2.0).argmin(), False))
    for wrong_set in wrong_sets:
        wrong = torch.where(wrong_set, base, 0.0)
        assert _detectable(p, wrong / wrong.sum()), name
    if len(params) > 2:
        without = {key: value for key, value in params.items() if key != binding}
        assert _detectable(p, reference_probs(STAT_LOGITS, without)), f"{name} without {binding}"


# ---------------------------------------------------------------- support (property tests)

@st.composite
def grid_logits(draw_, max_rows=3, max_vocab=64):
    """[B, V] logits on a grid with exact ties, -inf entries (never a whole row), any dtype."""
    B = draw_(st.integers(1, max_rows))
    V = draw_(st.integers(1, max_vocab))
    scale = draw_(st.sampled_from([0.25, 1.0, 3.0, 1000.0]))
    dtype = draw_(st.sampled_from(DTYPES))
    ints = draw_(st.lists(st.integers(-12, 12), min_size=B * V, max_size=B * V))
    neg_inf = draw_(st.lists(st.booleans(), min_size=B * V, max_size=B * V))
    x = torch.tensor(ints, dtype=torch.float32).view(B, V) * scale
    x = x.masked_fill(torch.tensor(neg_inf).view(B, V), float("-inf"))
    x[:, 0] = torch.where(x[:, 0] == float("-inf"), 0.0, x[:, 0])  # one finite logit per row
    return x.to(dtype)


@st.composite
def sampling_params(draw_, vocab):
    return dict(
        temperature=draw_(st.sampled_from([0.0, 0.5, 1.0, 1.7])),
        top_k=draw_(st.one_of(st.just(0), st.integers(1, vocab + 2))),
        top_p=draw_(st.one_of(st.just(1.0), st.sampled_from([0.3, 0.5, 0.9]), st.floats(0.01, 1.0))),
        min_p=draw_(st.one_of(st.just(0.0), st.sampled_from([0.1, 0.5, 1.0]), st.floats(0.0, 1.0))),
    )


def _repeat(logits, times):
    return logits.repeat_interleave(times, dim=0).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_never_outside_kept_set(backend, data):
    x = data.draw(grid_logits())
    params = data.draw(sampling_params(x.shape[1]))
    logits = _repeat(x, 32)  # 32 draws per row
    tokens = draw(backend, logits, seed=data.draw(st.integers(0, 2 ** 31)), **params)
    loose, _ = kept_band(logits, **params)
    assert_in_support(tokens, loose, logits)


@given(x=grid_logits(max_rows=4, max_vocab=200), data=st.data())
def test_reference_between_bands(x, data):
    """The reference keeps what it must, nothing else, and renormalizes exactly."""
    params = data.draw(sampling_params(x.shape[1]))
    probs = reference.sampling_probs(x, **params).double()
    loose, strict = kept_band(x, **params)
    support = probs > 0
    assert not (strict & ~support).any(), "reference dropped a token it must keep"
    assert not (support & ~loose).any(), "reference kept a token outside the band"
    assert torch.allclose(probs.sum(-1), torch.ones(x.shape[0], dtype=torch.float64), atol=1e-5)


# ---------------------------------------------------------------- exactness

@st.composite
def rows_with_specials(draw_):
    """Grid logits where some rows hold NaN, +inf or only -inf."""
    x = draw_(grid_logits(max_rows=6)).float()
    for r in range(x.shape[0]):
        kind = draw_(st.sampled_from(["none", "none", "nan", "inf", "all_-inf"]))
        col = draw_(st.integers(0, x.shape[1] - 1))
        if kind == "nan":
            x[r, col] = float("nan")
        elif kind == "inf":
            x[r, col] = float("inf")
        elif kind == "all_-inf":
            x[r] = float("-inf")
    return x.to(draw_(st.sampled_from(DTYPES)))


@pytest.mark.parametrize("backend", BACKENDS)
@given(x=rows_with_specials(), per_row=st.booleans())
def test_temperature_zero_is_argmax(backend, x, per_row):
    """torch.argmax of the logits: first index among ties, a NaN counting as the largest."""
    temperature = torch.zeros(x.shape[0], device=DEVICE) if per_row else 0.0
    tokens = draw(backend, x.to(DEVICE), temperature=temperature, top_k=3, top_p=0.5)
    assert torch.equal(tokens, x.float().argmax(-1))


@pytest.mark.parametrize("backend", KERNELS)
@given(x=grid_logits(max_rows=6), temperature=st.sampled_from([0.5, 1.0, 2.0]), per_row=st.booleans())
def test_top_k_one_is_argmax(backend, x, temperature, per_row):
    """Kernels return the first maximum (the reference samples among tied maxima)."""
    top_k = torch.ones(x.shape[0], dtype=torch.int64, device=DEVICE) if per_row else 1
    tokens = draw(backend, x.to(DEVICE), temperature=temperature, top_k=top_k)
    assert torch.equal(tokens, x.float().argmax(-1))


@pytest.mark.parametrize("backend", KERNELS)
@given(x=rows_with_specials())
def test_rows_without_a_distribution(backend, x):
    """NaN / +inf / all -inf rows (the reference cannot sample them) give an index in range
    and leave the other rows alone."""
    x = x.to(DEVICE)
    tokens = draw(backend, x, top_k=4, top_p=0.8)
    assert ((tokens >= 0) & (tokens < x.shape[1])).all()
    xf = x.float().cpu()
    good = ~(xf.isnan().any(-1) | (xf == float("inf")).any(-1) | (xf == float("-inf")).all(-1))
    loose, _ = kept_band(xf[good], top_k=4, top_p=0.8)
    assert_in_support(tokens[good], loose, xf[good])


# ---------------------------------------------------------------- parameters, seeds, layouts

@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_parameters(backend):
    """Four groups of rows with their own parameters (and own token order) in one call."""
    groups = [dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0),
              dict(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0),
              dict(temperature=0.8, top_k=0, top_p=0.5, min_p=0.0),
              dict(temperature=1.2, top_k=0, top_p=1.0, min_p=0.5)]
    n = N_STAT // len(groups)
    rows = [STAT_LOGITS.roll(g).expand(n, -1) for g in range(len(groups))]
    logits = torch.cat(rows).to(DEVICE)
    params = {key: torch.tensor([g[key] for g in groups]).repeat_interleave(n).to(DEVICE)
              for key in groups[0]}
    tokens = draw(backend, logits, **params)
    loose, _ = kept_band(logits, **params)
    assert_in_support(tokens, loose, logits)
    for g, group in enumerate(groups):
        p = reference_probs(rows[g][0], group)
        dist = tv(frequencies(tokens[g * n:(g + 1) * n], 12), p)
        assert dist < tv_bound(p, n), f"group {group}: TV {dist:.4f} >= bound {tv_bound(p, n):.4f}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_dim_tensor_parameters_act_as_numbers(backend):
    logits = stat_logits(torch.float32)[:256]
    params = dict(temperature=0.9, top_k=5, top_p=0.8, min_p=0.1)
    as_tensors = {key: torch.tensor(value, device=DEVICE) for key, value in params.items()}
    assert torch.equal(draw(backend, logits, seed=3, **params), draw(backend, logits, seed=3, **as_tensors))


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds_reproduce_and_differ(backend):
    logits = torch.zeros(64, 256, device=DEVICE)  # uniform: two seeds agree on all rows with odds 256^-64
    params = dict(top_k=200)
    first = draw(backend, logits, seed=1, **params)
    assert torch.equal(first, draw(backend, logits, seed=1, **params))
    assert not torch.equal(first, draw(backend, logits, seed=2, **params))
    g = gen(1)
    again = ops.sample(logits, generator=g, backend=backend, **params).cpu()
    assert torch.equal(first, again)
    assert not torch.equal(again, ops.sample(logits, generator=g, backend=backend, **params).cpu()), \
        "the generator must advance"
    torch.manual_seed(7)  # the default generator when none is given
    a = ops.sample(logits, backend=backend, **params).cpu()
    torch.manual_seed(7)
    assert torch.equal(a, ops.sample(logits, backend=backend, **params).cpu())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "col_strided"])
def test_layout_does_not_change_tokens(backend, layout):
    torch.manual_seed(0)
    x = (torch.randn(48, 300) * 3).to(DEVICE)
    if layout == "transposed":
        view = x.t().contiguous().t()                     # column-major storage
    else:
        view = torch.zeros(48, 600, device=DEVICE)[:, ::2]  # every other column
        view.copy_(x)
    assert not view.is_contiguous()
    params = dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02)
    assert torch.equal(draw(backend, view, seed=5, **params), draw(backend, x, seed=5, **params))


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_boundaries(backend):
    """Kept tokens on both sides of tile edges (1024: GPU, 16384: interpreter), V not a multiple."""
    V = 16385 + 7
    positions = torch.tensor([0, 1023, 1024, 16383, 16384, V - 1])
    x = torch.full((5, V), float("-inf"))
    x[:, positions] = torch.tensor([1.0, 2.0, 0.5, 2.0, 1.5, 0.0])
    x[1:, 100] = -3.0  # a finite token below the cuts in some rows
    x = x.to(DEVICE)
    params = dict(temperature=torch.tensor([1.0, 1.0, 0.0, 1.0, 0.7]), top_k=torch.tensor([3, 0, 0, 0, 2]),
                  top_p=torch.tensor([1.0, 0.6, 1.0, 1.0, 1.0]), min_p=torch.tensor([0.0, 0.0, 0.0, 0.4, 0.0]))
    params = {key: value.to(DEVICE) for key, value in params.items()}
    tokens = draw(backend, x, **params)
    loose, _ = kept_band(x, **params)
    assert_in_support(tokens, loose, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocab(backend):
    """A 128k vocabulary with per-row settings: greedy, top-k + top-p, top-p + min-p."""
    torch.manual_seed(0)
    x = (torch.randn(3, 131072) * 2.5).to(DEVICE)
    params = dict(temperature=torch.tensor([0.0, 1.0, 0.8]), top_k=torch.tensor([0, 50, 0]),
                  top_p=torch.tensor([1.0, 0.9, 0.95]), min_p=torch.tensor([0.0, 0.0, 0.01]))
    params = {key: value.to(DEVICE) for key, value in params.items()}
    tokens = draw(backend, x, **params)
    assert int(tokens[0]) == int(x[0].argmax())
    loose, _ = kept_band(x, **params)
    assert_in_support(tokens, loose, x)
