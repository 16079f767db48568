"""The CPU decode step recorded as a native plan (runtime/graphs.py, csrc/plan_cpu.cpp).

- Replaying the plan gives bitwise the logits of eager steps, step after step, for
  the Llama family and GPT-2, batch 1 and 3, float32 and bfloat16, on dense and
  quantized weights (one plan per batch size of decode-only engine steps); generate's
  tokens are the same with and without the plan.
- The plan holds native operators only where the model runs native ops (no aten
  operator per layer), and replays aten operators correctly where a step has them:
  indexing with tensor lists (Tensor?[] arguments), conversions that copy or alias,
  in-place updates, Python numbers where a Tensor is expected.
- Operators a replay cannot repeat (random draws, host reads) raise NotCapturable
  before they run, and generate then runs eagerly with a warning and the same tokens.
"""
import logging

import pytest
import torch

import fuselm
from fuselm import graphs, native
from tests.fixtures import save_tiny_gguf, save_tiny_model

pytestmark = pytest.mark.skipif(not native.available("cpu"), reason="needs the native extension")


def _logits_of_each_step(engine, prompts, steps):
    """Run prompts on engine for `steps` tokens each -> the logits every pass sampled from."""
    seen = []
    sample = engine._sample
    engine._sample = lambda logits, reqs: (seen.append(logits.clone()), sample(logits, reqs))[1]
    for p in prompts:
        engine.submit(p, max_new_tokens=steps, ignore_eos=True)
    while engine.has_work():
        engine.step()
    return seen


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("quant", ["dense", "q8_0"])
def test_replay_equals_eager_step_after_step(tmp_path, arch, dtype, quant):
    path = save_tiny_model(arch, tmp_path / "hf")
    if quant != "dense":
        path = save_tiny_gguf(path, tmp_path / "m.gguf", qtype=quant.upper())
    m = fuselm.load(path, dtype=dtype, device="cpu", progress=False)
    prompts = ["hello world", "a longer prompt with more words", "x"]
    for batch in (1, 3):
        recorded = m.engine(max_num_seqs=batch, check=True)
        assert recorded.graphs is not None
        m.use_cpu_graph = False
        eager = m.engine(max_num_seqs=batch, check=True)
        m.use_cpu_graph = True
        got, expected = (_logits_of_each_step(e, prompts[:batch], 6) for e in (recorded, eager))
        assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected)), batch
        assert sorted(recorded.graphs.graphs) == [batch]


def _aten_entries(model):
    engine = model.engine(max_num_seqs=1)
    engine.submit("hello world", max_new_tokens=3).result()
    plan = engine.graphs.graphs[1].plan
    return sorted(e for e in map(plan.entry, range(plan.size())) if not e.startswith("fuselm::"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_operator_of_a_layer_is_native(tmp_path, arch):
    """The step's own bookkeeping (GPT-2's position add, the logits' views) may be aten operators;
    a layer's are all native: doubling the layers adds no aten entry. (Backend native: on auto a
    dense matmul may measure faster on torch, tiny ones especially.)"""
    layers = "n_layer" if arch == "gpt2" else "num_hidden_layers"
    entries = [_aten_entries(fuselm.load(save_tiny_model(arch, tmp_path / str(n), **{layers: n}), dtype="float32",
                                         device="cpu", backend="native", progress=False)) for n in (2, 4)]
    assert entries[0] == entries[1] and len(entries[0]) <= 8, entries


def test_generate_gives_the_same_tokens_with_and_without_the_plan(tmp_path):
    m = fuselm.load(save_tiny_model("llama", tmp_path), dtype="float32", device="cpu", progress=False)
    assert m.use_cpu_graph
    prompts = ["hello world", "a longer prompt with more words"]
    recorded = m.generate(prompts, max_new_tokens=12)
    m.use_cpu_graph = False
    assert m.generate(prompts, max_new_tokens=12) == recorded


def test_aten_operators_replay_with_their_arguments():
    native.build()
    table = torch.randn(12, 4)
    positions = torch.tensor([1, 5], dtype=torch.int32)
    buf = torch.zeros(12, 4)
    out = {}

    def step():
        idx = positions.long()                 # a conversion that copies
        same = idx.long()                      # ... and one that aliases (nothing to replay)
        rows = table[same] * 2.0               # index with a Tensor?[] list; a number where a Tensor is expected
        buf[idx] = rows                        # index_put_
        positions.add_(1)                      # in place
        out["y"] = rows.sum(0) + buf.mean()
        return out["y"]

    plan = torch.classes.fuselm.Plan()
    with graphs._Recorder(plan):
        y = step()
    for _ in range(3):
        expected_buf = buf.clone()
        expected_buf[positions.long()] = table[positions.long()] * 2.0
        expected = (table[positions.long()] * 2.0).sum(0) + expected_buf.mean()
        plan.run()
        assert torch.equal(y, expected) and torch.equal(buf, expected_buf)
    assert [plan.entry(i) for i in range(plan.size())] == [
        "aten::_to_copy", "aten::index.Tensor", "aten::mul.Tensor", "aten::index_put_", "aten::add_.Tensor",
        "aten::sum.dim_IntList", "aten::mean", "aten::add.Tensor"]


@pytest.mark.parametrize("bad", [lambda x: x.uniform_(), lambda x: x.mul_(float(x.sum())),
                                 lambda x: torch._foreach_mul([x], 2.0)])
def test_operators_a_replay_cannot_repeat_are_refused_before_they_run(bad):
    """A random draw, a host read, and an operator returning a list (the plan copies tensors only)."""
    native.build()
    x = torch.ones(3)
    with pytest.raises(graphs.NotCapturable):
        with graphs._Recorder(torch.classes.fuselm.Plan()):
            bad(x)
    assert torch.equal(x, torch.ones(3))


def test_generate_runs_eagerly_when_the_step_cannot_be_recorded(tmp_path, monkeypatch, caplog):
    m = fuselm.load(save_tiny_model("llama", tmp_path), dtype="float32", device="cpu", progress=False)
    prompts = ["hello world", "a longer prompt"]
    expected = m.generate(prompts, max_new_tokens=10)
    lm_head = type(m.net)._lm_head

    def lm_head_with_a_host_read(self, h):
        float(h.sum())  # a host sync, not capturable, after the step's cache writes
        return lm_head(self, h)

    monkeypatch.setattr(type(m.net), "_lm_head", lm_head_with_a_host_read)
    m._engine = None  # a new engine records its plans anew
    with caplog.at_level(logging.WARNING, logger="fuselm"):
        assert m.generate(prompts, max_new_tokens=10) == expected
    assert "runs eagerly" in caplog.text


def test_out_forms_equal_the_functional_ops_and_check_their_out():
    """The plan calls fuselm's out= forms with the tensors a recorded call returned: bitwise the
    functional op's result, and a wrong out is refused with the op's name."""
    from fuselm import quant, rope
    native.build()
    f = torch.ops.fuselm
    x, r, w = torch.randn(2, 3, 64).bfloat16(), torch.randn(2, 3, 64).bfloat16(), torch.randn(64)
    cos, sin = rope.tables(16, 10000.0, None, 8, "cpu")
    qt = quant.quantize(torch.randn(40, 64), "Q4_1").pack()
    k, v, lens = torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16), torch.tensor([9, 4], dtype=torch.int32)
    cases = [
        (f.rms_norm.default, f.rms_norm.out, (x, w, 1e-5)),
        (f.rms_norm.residual, f.rms_norm.residual_out, (x, r, w, 1e-5)),
        (f.layer_norm.default, f.layer_norm.out, (x, w, None, 1e-5)),
        (f.layer_norm.residual, f.layer_norm.residual_out, (x, r, w, w, 1e-5)),
        (f.silu_mul.default, f.silu_mul.out, (x,)),
        (f.gelu_tanh.default, f.gelu_tanh.out, (x,)),
        (f.rope.default, f.rope.out, (x.view(2, 3, 4, 16), cos, sin, torch.tensor([[0, 3, 7], [1, 1, 2]]))),
        (f.qlinear.default, f.qlinear.out, (x, qt.tiles, qt.fmt.code, 40, None, torch.float32)),
        (f.decode_attention.default, f.decode_attention.out, (torch.randn(2, 4, 16), k, v, lens, None, None)),
    ]
    for functional, out_form, args in cases:
        expected = functional(*args)
        expected = expected if isinstance(expected, tuple) else (expected,)
        outs = [torch.empty_like(e) for e in expected]
        out_form(*args, **dict(zip(("out", "out_h"), outs)))
        assert all(torch.equal(o, e) for o, e in zip(outs, expected)), functional
        wrong = [torch.empty(1, dtype=e.dtype) for e in expected]
        with pytest.raises(RuntimeError, match=r"fuselm::\w+: out"):
            out_form(*args, **dict(zip(("out", "out_h"), wrong)))
