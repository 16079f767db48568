"""The pointwise ops of a transformer block against runtime/reference.py, on every backend that has them:
rope, silu_mul, gelu_tanh, store_kv and (dense) embedding.

- hypothesis draws shapes (odd head counts and widths, one row, leading dims),
  fp32/bf16/fp16, strided inputs (slices of a packed qkv tensor, every other
  column) and magnitudes; tests.checks' per-dtype tolerance applies (these ops
  compute in float32 and round once, as the reference).
- NaN and inf propagate as in the reference.
- store_kv writes exactly the rows of `slots` and nothing else; repeated slots
  are not asked for (the model never writes one slot twice in a call).
- Bad arguments raise ValueError naming the argument.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuselm import ops, reference, rope
from tests.checks import assert_matches, kernel_backends
from tests.conftest import DEVICE

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _randn(shape, dtype, g, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


@pytest.mark.parametrize("backend", kernel_backends("rope"))
@given(B=st.integers(1, 3), S=st.sampled_from([1, 2, 7]), H=st.sampled_from([1, 3, 9]),
       D=st.sampled_from([2, 8, 64, 80]), dtype=st.sampled_from(DTYPES), packed=st.booleans(),
       seed=st.integers(0, 2**16))
def test_rope_matches_reference(backend, B, S, H, D, dtype, packed, seed):
    g = torch.Generator().manual_seed(seed)
    cos, sin = rope.tables(D, 10000.0, None, 64, DEVICE)
    positions = torch.randint(0, 64, (B, S), generator=g).to(DEVICE)
    if packed:  # q of a fused qkv projection: a strided view, heads H*D apart in rows of 3*H*D
        x = _randn((B, S, 3 * H * D), dtype, g)[..., H * D:2 * H * D].view(B, S, H, D)
    else:
        x = _randn((B, S, H, D), dtype, g)
    expected = reference.rope(x.float(), cos, sin, positions)
    assert_matches(ops.rope(x, cos, sin, positions, backend=backend), expected, dtype, "rope")


@pytest.mark.parametrize("op", ["silu_mul", "gelu_tanh"])
@given(rows=st.integers(1, 5), cols=st.sampled_from([2, 6, 34, 1536]), dtype=st.sampled_from(DTYPES),
       strided=st.booleans(), scale=st.sampled_from([1e-2, 1.0, 30.0]), seed=st.integers(0, 2**16))
def test_activations_match_reference(op, rows, cols, dtype, strided, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = _randn((rows, 2 * cols), dtype, g, scale)[:, ::2] if strided else _randn((rows, cols), dtype, g, scale)
    for backend in kernel_backends(op):
        out = getattr(ops, op)(x, backend=backend)
        assert_matches(out, getattr(reference, op)(x.float()), dtype, f"{op} {backend}")


@pytest.mark.parametrize("op", ["silu_mul", "gelu_tanh"])
def test_activations_propagate_nan_and_inf(op):
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.0, 1.0, -88.0, 90.0, 3.0]], device=DEVICE)
    for backend in kernel_backends(op):
        assert_matches(getattr(ops, op)(x, backend=backend), getattr(reference, op)(x), torch.float32, op)


@given(T=st.integers(1, 6), H=st.sampled_from([1, 3]), D=st.sampled_from([4, 64]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_store_kv_writes_only_its_slots(T, H, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    num = 16
    slots = torch.randperm(num, generator=g)[:T].to(DEVICE)
    kv = _randn((T, 2, H, D), dtype, g)  # k and v of a fused projection: strided views
    for backend in kernel_backends("store_kv"):
        caches = [_randn((num, H, D), dtype, g) for _ in range(2)]
        expected = [c.clone() for c in caches]
        reference.store_kv(*expected, kv[:, 0], kv[:, 1], slots)
        assert ops.store_kv(*caches, kv[:, 0], kv[:, 1], slots, backend=backend) is None
        for c, e in zip(caches, expected):
            assert torch.equal(c, e), backend


def test_dense_embedding_is_a_gather():
    g = torch.Generator().manual_seed(0)
    table = _randn((50, 12), torch.bfloat16, g)
    tokens = torch.tensor([[3, 0, 49], [7, 7, 1]], device=DEVICE)
    for backend in ["torch", *kernel_backends("embedding")]:
        assert torch.equal(ops.embedding(tokens, table, backend=backend), table[tokens])
        assert torch.equal(ops.embedding(tokens, table, torch.float32, backend=backend), table[tokens].float())


@pytest.mark.parametrize("call, match", [
    (lambda x, c, p: ops.rope(x, c, c, p[:, :1]), "positions must be int64 of shape"),
    (lambda x, c, p: ops.rope(x, c.double(), c, p), "cos must be float32"),
    (lambda x, c, p: ops.rope(x[..., :3], c, c, p), "D even"),
    (lambda x, c, p: ops.silu_mul(x[..., :3]), r"\[..., 2I\]"),
    (lambda x, c, p: ops.store_kv(x[0], x[0], x[0], x[0].half(), p[0]), "v must be"),
    (lambda x, c, p: ops.store_kv(x[0], x[0], x[0], x[0], p[0].int()), "slots must be int64"),
    (lambda x, c, p: ops.embedding(p.float(), x[0, 0]), "tokens must be an int32 or int64"),
])
def test_bad_arguments_raise(call, match):
    x = torch.randn(2, 3, 4, 8, device=DEVICE)
    cos, _ = rope.tables(8, 10000.0, None, 16, DEVICE)
    positions = torch.zeros(2, 3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        call(x, cos, positions)
