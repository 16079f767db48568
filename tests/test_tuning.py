"""auto's measured choice for dense CPU matmuls (runtime/tuning.py).

- The faster implementation wins: made artificially slow, native loses to torch
  and torch to native; the choice is measured once per (dtype, N, K, row bucket).
- ops.linear on backend auto runs the chosen implementation; past 32 rows, and for
  quantized weights, no measurement happens.
- A measurement inside a recorded decode step is not recorded.
"""
import time

import pytest
import torch
import torch.nn.functional as F

from fuselm import graphs, native, ops, quant, tuning

pytestmark = pytest.mark.skipif(not native.available("cpu"), reason="needs the native extension")


@pytest.fixture
def fresh(monkeypatch):
    native.build()
    monkeypatch.setattr(tuning, "_choices", {})
    monkeypatch.setattr(tuning, "_STREAM_BYTES", 1 << 16)  # a few copies: these tests check the choosing
    monkeypatch.setattr(tuning, "_ROUNDS", 3)


def _slowed(fn):
    def slow(*args, **kwargs):
        time.sleep(2e-4)
        return fn(*args, **kwargs)
    return slow


@pytest.mark.parametrize("slow", ["native", "torch"])
def test_the_faster_implementation_is_chosen_once_per_shape(fresh, monkeypatch, slow):
    if slow == "native":
        monkeypatch.setattr(native, "linear", _slowed(native.linear))
    else:
        monkeypatch.setattr(tuning.F, "linear", _slowed(F.linear))
    w = torch.randn(24, 40)
    other = "torch" if slow == "native" else "native"
    assert tuning.linear_backend(torch.randn(1, 40), w) == other
    assert tuning.linear_backend(torch.randn(3, 40), w) == other            # bucket 4, measured
    assert set(tuning._choices) == {(torch.float32, 24, 40, 1), (torch.float32, 24, 40, 4)}
    assert tuning.linear_backend(torch.randn(2, 1, 40), w) == other         # bucket 4 again: cached
    assert len(tuning._choices) == 2


def test_ops_linear_runs_the_choice(fresh, monkeypatch):
    calls = []
    monkeypatch.setattr(tuning, "linear_backend", lambda x, w: calls.append(x.shape) or "torch")
    monkeypatch.setattr(native, "linear", lambda *a: pytest.fail("native ran although torch was chosen"))
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    assert torch.allclose(ops.linear(x, w), F.linear(x, w))
    assert calls == [(2, 16)]
    ops.linear(x, w, backend="torch")                                       # a forced backend: no choice
    assert calls == [(2, 16)]


def test_no_measurement_past_32_rows_or_for_quantized_weights(fresh):
    assert tuning.linear_backend(torch.randn(33, 40), torch.randn(8, 40)) == "torch"
    qt = quant.quantize(torch.randn(8, 64), "Q8_0").pack()
    ops.linear(torch.randn(1, 64), qt)
    assert tuning._choices == {}


def test_a_measurement_inside_a_recorded_step_is_not_recorded(fresh):
    x, w = torch.randn(1, 32), torch.randn(16, 32)
    plan = torch.classes.fuselm.Plan()
    with graphs._Recorder(plan):
        y = ops.linear(x, w)
    assert len(tuning._choices) == 1
    assert 1 <= plan.size() <= 2, [plan.entry(i) for i in range(plan.size())]   # the matmul, nothing measured
    x.copy_(torch.randn(1, 32))
    plan.run()
    assert torch.allclose(y, F.linear(x, w))
