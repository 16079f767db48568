"""Tolerances shared by the kernel tests (DESIGN.md: per dtype, NaN never passes).

A kernel result is compared with the float32 reference computed from the same
low-precision inputs. fp32 must agree to ~1e-5. For fp16/bf16 the bound is
twice the error that the same reference makes when its output is rounded to
that dtype (the unavoidable rounding), plus a small floor.
"""
import torch

FP32_TOL = 1e-5
# floor on the allowed error for fp16/bf16, relative to the magnitude of the output
LOWP_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_matches(out, expected, dtype, what="", atol=None):
    """out: the kernel's result; expected: the float32 reference (same inputs)."""
    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    out, expected = out.float().cpu(), expected.float().cpu()
    nan_out, nan_ref = out.isnan(), expected.isnan()
    assert torch.equal(nan_out, nan_ref), f"{what}: NaN at {(nan_out ^ nan_ref).nonzero()[:5].tolist()}"
    inf_ref = expected.isinf()
    assert torch.equal(out[inf_ref], expected[inf_ref]), f"{what}: inf mismatch"
    finite = ~(nan_ref | inf_ref)
    o, e = out[finite], expected[finite]
    if o.numel() == 0:
        return
    scale = e.abs().max().clamp(min=1.0)
    if dtype == torch.float32:
        bound = atol if atol is not None else FP32_TOL * scale
        err = (o - e).abs().max()
    else:
        rounding = (e.to(dtype).float() - e).abs().max()
        bound = 2 * rounding + (atol if atol is not None else LOWP_FLOOR[dtype] * scale)
        err = (o - e).abs().max()
    assert err <= bound, f"{what}: max abs error {err:.3g} > bound {bound:.3g} ({dtype})"


def kernel_backends(op):
    """The non-torch backends that implement `op` on the test device: each must pass its tests."""
    from fuselm import ops
    from tests.conftest import DEVICE
    return [b for b in ops.backends_with(op, DEVICE.type) if b != "torch"]
