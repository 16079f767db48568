"""Model configs: one frozen ModelConfig, read from a Hugging Face config.json or GGUF metadata.

Two families are supported:
  "llama": Llama 2/3, SmolLM2, Mistral, Qwen2 (RMSNorm, RoPE, GQA, gated SiLU MLP)
  "gpt2":  GPT-2 (LayerNorm, learned positions, MHA, GELU MLP, Conv1D weights)

Missing optional keys take the defaults transformers' config classes use, so a
config.json means the same thing here as in transformers. Rope scaling is
normalized from transformers 4.x ("rope_theta" + "rope_scaling") and 5.x
("rope_parameters") to `rope_theta` plus `rope_scaling` (None for plain RoPE).
"""
from dataclasses import dataclass

# config.json model_type -> our family
HF_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2"}
# GGUF general.architecture -> our family
GGUF_FAMILIES = {"llama": "llama", "qwen2": "llama", "gpt2": "gpt2"}
# transformers' defaults for keys a config.json may omit (LlamaConfig, MistralConfig, Qwen2Config)
_MAX_POSITIONS_DEFAULT = {"llama": 2048, "mistral": 131072, "qwen2": 32768}
# GGUF general.file_type -> the dtype of an unquantized file (quantized files have none)
_GGUF_FILE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}


@dataclass(frozen=True)
class ModelConfig:
    arch: str                 # "llama" or "gpt2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str           # "silu" (llama family) or gpt2's activation_function, e.g. "gelu_new"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # {"rope_type": "linear" | "llama3" | "yarn" | ..., params} or None
    attention_bias: bool = False       # q/k/v biases (Qwen2, GPT-2)
    o_bias: bool = False               # attention output projection bias
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()          # every id that ends generation
    pad_token_id: int | None = None
    torch_dtype: str | None = None     # the checkpoint's dtype name, e.g. "bfloat16"
    sliding_window: int | None = None  # Mistral's attention window, when shorter than the context

    def __post_init__(self):
        _validate(self)

    @property
    def context(self):
        """The longest sequence fuselm runs: the position limit, or a shorter sliding window. No attention
        path implements the window yet; within it causal attention is exactly the windowed one, so
        sequences stop at the window instead of attending wrongly past it."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

    def context_note(self):
        """Why the context is shorter than the position limit, for messages ("" when it is not)."""
        if self.context == self.max_position_embeddings:
            return ""
        return (f": sequences stop at the {self.sliding_window}-token sliding window, which no attention path "
                f"implements yet (positions go to {self.max_position_embeddings})")


def _validate(c):
    where = f"{c.arch} config"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "max_position_embeddings"):
        value = getattr(c, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    if c.num_heads % c.num_kv_heads:
        raise ValueError(f"{where}: num_heads ({c.num_heads}) must be a multiple of num_kv_heads ({c.num_kv_heads})")
    if c.arch == "llama" and c.head_dim % 2:
        raise ValueError(f"{where}: head_dim ({c.head_dim}) must be even for rotary embeddings")
    if c.arch == "gpt2" and c.num_heads * c.head_dim != c.hidden_size:
        raise ValueError(f"{where}: hidden_size ({c.hidden_size}) must equal num_heads ({c.num_heads}) "
                         f"x head_dim ({c.head_dim})")
    if not c.norm_eps > 0:
        raise ValueError(f"{where}: norm_eps must be positive, got {c.norm_eps!r}")
    if not c.rope_theta > 0:
        raise ValueError(f"{where}: rope_theta must be positive, got {c.rope_theta!r}")
    if c.bos_token_id is not None and not 0 <= c.bos_token_id < c.vocab_size:
        raise ValueError(f"{where}: bos_token_id {c.bos_token_id} is outside the vocabulary [0, {c.vocab_size})")
    bad = [i for i in c.eos_token_ids if not 0 <= i < c.vocab_size]
    if bad:
        raise ValueError(f"{where}: eos token ids {bad} are outside the vocabulary [0, {c.vocab_size})")


# ------------------------------------------------------------------ Hugging Face config.json


def _ids(value):
    """An id field that may be None, an int or a list of ints -> list of ints."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _unique(ids):
    return tuple(dict.fromkeys(ids))


def _pad(value, vocab_size):
    # some old conversions write pad_token_id -1 for "none"; padding is never read from the model
    return value if value is not None and 0 <= value < vocab_size else None


def _rope(d):
    """(rope_theta, rope_scaling) from a 4.x or 5.x config dict."""
    params = dict(d.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
    if not params:
        params = dict(d.get("rope_scaling") or {})
    kind = params.pop("rope_type", None) or params.pop("type", None)
    params.pop("type", None)  # 4.x configs sometimes carry both spellings
    if kind in (None, "default"):
        return float(theta), None
    return float(theta), {"rope_type": kind, **params}


def from_hf(config_dict: dict, generation_config: dict | None = None, path="config.json") -> ModelConfig:
    """A ModelConfig from a parsed config.json (and generation_config.json when present).

    `path` only names the file in error messages.
    """
    d = config_dict
    model_type = d.get("model_type")
    if model_type not in HF_FAMILIES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(sorted(HF_FAMILIES))}")

    def need(key):
        if d.get(key) is None:
            raise ValueError(f"{path}: required key {key!r} is missing (model_type {model_type})")
        return d[key]

    vocab = need("vocab_size")
    eos = _ids(d.get("eos_token_id")) + _ids((generation_config or {}).get("eos_token_id"))
    common = dict(vocab_size=vocab, bos_token_id=d.get("bos_token_id"), eos_token_ids=_unique(eos),
                  pad_token_id=_pad(d.get("pad_token_id"), vocab),
                  torch_dtype=d.get("torch_dtype") or d.get("dtype"))  # transformers 5 writes "dtype"
    if model_type == "gpt2":
        return _gpt2_from_hf(d, need, path, common)

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    if d.get("head_dim") is None and hidden % heads:
        raise ValueError(f"{path}: hidden_size ({hidden}) is not divisible by num_attention_heads ({heads})")
    theta, scaling = _rope(d)
    window = d.get("sliding_window")
    if model_type == "qwen2" and d.get("use_sliding_window"):
        raise ValueError(f"{path}: Qwen2 sliding-window attention (use_sliding_window=true) is not supported")
    max_positions = d.get("max_position_embeddings") or _MAX_POSITIONS_DEFAULT[model_type]
    attention_bias = model_type == "qwen2" or bool(d.get("attention_bias", False))
    return ModelConfig(
        arch="llama", hidden_size=hidden, intermediate_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"), num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or hidden // heads, max_position_embeddings=max_positions,
        norm_eps=float(d.get("rms_norm_eps", 1e-6)), hidden_act=d.get("hidden_act", "silu"),
        rope_theta=theta, rope_scaling=scaling, attention_bias=attention_bias,
        # Llama's attention_bias covers o_proj too; Qwen2 has q/k/v biases only
        o_bias=model_type == "llama" and attention_bias, mlp_bias=bool(d.get("mlp_bias", False)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        sliding_window=window if model_type == "mistral" and window and window < max_positions else None,
        **common)


def _gpt2_from_hf(d, need, path, common):
    hidden, heads = need("n_embd"), need("n_head")
    if hidden % heads:
        raise ValueError(f"{path}: n_embd ({hidden}) is not divisible by n_head ({heads})")
    if d.get("scale_attn_by_inverse_layer_idx") or d.get("scale_attn_weights") is False:
        raise ValueError(f"{path}: GPT-2 attention scaling variants (scale_attn_by_inverse_layer_idx, "
                         "scale_attn_weights=false) are not supported")
    return ModelConfig(
        arch="gpt2", hidden_size=hidden, intermediate_size=d.get("n_inner") or 4 * hidden,
        num_layers=need("n_layer"), num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        max_position_embeddings=need("n_positions"), norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
        hidden_act=d.get("activation_function", "gelu_new"), attention_bias=True, o_bias=True, mlp_bias=True,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)), **common)


# ------------------------------------------------------------------ GGUF metadata


def gguf_value(reader, key, default=None):
    """One metadata value (scalar, string or list), or `default`; `reader` is a fuselm GGUFFile or a
    gguf.GGUFReader."""
    if hasattr(reader, "metadata"):
        return reader.metadata.get(key, default)
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_path(reader):
    """The file a GGUFFile / gguf.GGUFReader reads, for error messages."""
    return getattr(reader, "path", None) or getattr(getattr(reader, "data", None), "filename", None) or "GGUF file"


def from_gguf(reader) -> ModelConfig:
    """A ModelConfig from GGUF metadata (general.architecture llama, qwen2 or gpt2); `reader` is a
    fuselm GGUFFile or a gguf.GGUFReader."""
    path = gguf_path(reader)
    arch = gguf_value(reader, "general.architecture")
    if arch not in GGUF_FAMILIES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(sorted(GGUF_FAMILIES))}")

    def get(key, default=None, required=False):
        value = gguf_value(reader, f"{arch}.{key}", default)
        if required and value is None:
            raise ValueError(f"{path}: required metadata key {arch}.{key!r} is missing")
        return value

    if get("expert_count", 0):
        raise ValueError(f"{path}: mixture-of-experts GGUF models are not supported")
    tensors = {t.name: t for t in reader.tensors}
    hidden, heads = get("embedding_length", required=True), get("attention.head_count", required=True)
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise ValueError(f"{path}: per-layer attention.head_count_kv is not supported")
    tokens = gguf_value(reader, "tokenizer.ggml.tokens")
    embedding = tensors.get("token_embd.weight")
    vocab = get("vocab_size") or (int(embedding.shape[1]) if embedding is not None else None) or \
        (len(tokens) if tokens else None)
    if vocab is None:
        raise ValueError(f"{path}: no {arch}.vocab_size, token_embd.weight or tokenizer.ggml.tokens to size "
                         "the vocabulary")
    eos = [gguf_value(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=get("feed_forward_length", required=True),
        num_layers=get("block_count", required=True), num_heads=heads, num_kv_heads=kv_heads,
        max_position_embeddings=get("context_length", required=True),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=gguf_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=_unique(i for i in eos if i is not None),
        pad_token_id=_pad(gguf_value(reader, "tokenizer.ggml.padding_token_id"), vocab),
        torch_dtype=_GGUF_FILE_DTYPES.get(gguf_value(reader, "general.file_type")))
    if arch == "gpt2":
        return ModelConfig(arch="gpt2", head_dim=hidden // heads,
                           norm_eps=float(get("attention.layer_norm_epsilon", 1e-5)), hidden_act="gelu_new",
                           attention_bias=True, o_bias=True, mlp_bias=True, **common)

    head_dim = get("attention.key_length") or hidden // heads
    rotary = get("rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise ValueError(f"{path}: partial rotary embeddings (rope.dimension_count {rotary} < head_dim "
                         f"{head_dim}) are not supported")
    return ModelConfig(
        arch="llama", head_dim=head_dim, norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        hidden_act="silu", rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_gguf_rope_scaling(get, tensors),
        # biases are not described by metadata; their tensors say whether they exist
        attention_bias="blk.0.attn_q.bias" in tensors, o_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors, **common)


def _gguf_rope_scaling(get, tensors):
    """rope_scaling from {arch}.rope.scaling.* metadata, or from a rope_freqs tensor.

    llama.cpp stores Llama 3.1-style scaling as per-frequency divisors (the rope_freqs tensor)
    instead of its parameters, so it becomes {"rope_type": "freq_factors", "factors": [...]}:
    inv_freq[i] = theta ** (-2i / head_dim) / factors[i].
    """
    if "rope_freqs.weight" in tensors:
        from gguf.quants import dequantize
        t = tensors["rope_freqs.weight"]
        return {"rope_type": "freq_factors", "factors": [float(x) for x in dequantize(t.data, t.tensor_type).ravel()]}
    kind = get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "factor": float(get("rope.scaling.factor", 1.0))}
    original = get("rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling
