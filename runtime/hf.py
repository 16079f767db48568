"""Drop-in fuselm kernels for Hugging Face transformers models (transformers >= 5).

    import fuselm.hf                       # registers attn_implementation="fuselm"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fuselm")
    fuselm.hf.apply(model, backend="triton")   # or patch a built model: attention + norms
    fuselm.hf.generate(model, ids, do_sample=True, top_p=0.9)   # draws through fuselm.ops.sample
    fuselm.hf.revert(model)

Attention. transformers calls the registered function with query [B, Hq, Sq, D] and
key/value [B, Hkv, Skv, D] after its cache update (Skv = max_cache_len for a
StaticCache, whose tail beyond the real length is zeros). The mask function
registered under the same name does not materialise a mask: it hands every layer a
`_Layout`, the real key length (past + new, from the cache's query offset) and the
per-row left-padding lengths of the 2D padding mask. Prefill then runs
`ops.attention` over the first kv_len keys (bottom-right causal), single-token decode
runs `ops.decode_attention` with seqlens = kv_len, so a static cache is read only up
to its real length. A left-padded batch passes kv_start [B], the padding keys each
row skips, so it still takes one call per layer. Anything the ops cannot express (a
prepared 4D mask, a sliding window shorter than the sequence, right padding, dropout,
autograd, softcap, sinks) runs transformers' sdpa attention with the mask it would
have built, and says so in a warning: nothing falls back silently.

Norms. `apply` binds new forwards onto the RMSNorm / LayerNorm instances (as
Liger-Kernel does) that call fuselm.ops.rms_norm / layer_norm; `revert` removes them.

Sampling. transformers' sampler draws with torch.multinomial(softmax(scores)).
`FuselmSampler`, a LogitsProcessor, draws the token with fuselm.ops.sample and
returns 0 at that token and -inf elsewhere, so multinomial must return exactly the
fuselm draw. `generate` switches transformers' own temperature/top-k/top-p/min-p
warpers off and hands their values to the sampler instead.

Host syncs: one per forward to read the padding mask (as transformers' own sdpa and
flash-attention mask code does) and, for a StaticCache, its length.
"""
import inspect
import logging
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from . import ops

try:
    from transformers import AttentionInterface, LogitsProcessor, LogitsProcessorList
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask
except ImportError as e:  # pragma: no cover - depends on the installed transformers
    raise ImportError(f"fuselm.hf needs transformers >= 5.0 with masking_utils and AttentionInterface: {e}") from e
if "q_length" not in inspect.signature(sdpa_mask).parameters:  # older masks take cache_position instead
    import transformers
    raise ImportError(f"fuselm.hf needs transformers >= 5.0 (mask functions that take q_length); "
                      f"found {transformers.__version__}")

log = logging.getLogger("fuselm")

NAME = "fuselm"
# model_type -> (norm classes replaced, attention classes routed to fuselm)
SUPPORTED = {
    "llama": (("LlamaRMSNorm",), ("LlamaAttention",)),
    "mistral": (("MistralRMSNorm",), ("MistralAttention",)),
    "qwen2": (("Qwen2RMSNorm",), ("Qwen2Attention",)),
    "gpt2": (("LayerNorm",), ("GPT2Attention",)),
}

_said = set()


def _say_once(level, msg):
    if msg not in _said:
        _said.add(msg)
        log.log(level, "fuselm.hf: %s", msg)


# ---------------------------------------------------------------- mask

@dataclass
class _Layout:
    """What the fuselm mask function hands every attention layer of one forward."""
    kv_len: int                # real keys: cached + new (a StaticCache holds more, zeros)
    kv_start: torch.Tensor = None  # [B] int32 left-padding lengths, None when no row is padded
    reason: str = None         # why fuselm's ops cannot express this mask (then sdpa runs)
    sdpa_args: dict = field(default_factory=dict, repr=False)
    _sdpa: tuple = field(default=None, repr=False)
    # generate() prebuilds the mask for static caches and hands it back to create_causal_mask,
    # which passes 4D masks through untouched and reads .ndim to tell them from 2D ones
    ndim = 4

    def sdpa_mask(self):
        """The mask transformers' sdpa path would have received, built on first use."""
        if self._sdpa is None:
            self._sdpa = (sdpa_mask(**self.sdpa_args),)
        return self._sdpa[0]


def _is_plain_causal(args):
    """Whether the mask function (sliding window, chunks, packing...) sees exactly what causal sees here."""
    probe = {**args, "attention_mask": None, "allow_is_causal_skip": False}
    got = sdpa_mask(**probe)
    want = sdpa_mask(**{**probe, "mask_function": causal_mask_function, "use_vmap": False})
    return torch.equal(got.expand_as(want), want)


def _left_padding(attention_mask, kv_len):
    """(per-row start or None, reason): the 2D mask as left padding of the first kv_len keys."""
    if attention_mask.dim() != 2 or attention_mask.shape[-1] < kv_len:
        return None, f"the padding mask {tuple(attention_mask.shape)} does not cover the {kv_len} keys"
    m = attention_mask[:, :kv_len].bool()                                        # [B, kv_len]
    start = kv_len - m.sum(-1)                                                   # [B] zeros counted
    left = torch.arange(kv_len, device=m.device).view(1, kv_len) >= start.view(-1, 1)
    is_left, padded = torch.stack([(left == m).all(), start.any()]).tolist()  # one host sync for both
    if not is_left:
        return None, "the padding mask is not left padding (right padding or holes)"
    return (start.to(torch.int32) if padded else None), None


def fuselm_mask(batch_size, kv_length, kv_offset=0, mask_function=causal_mask_function,
                attention_mask=None, **kwargs):
    """transformers' mask interface for "fuselm": returns a `_Layout` instead of a 4D mask."""
    if isinstance(attention_mask, _Layout):  # prebuilt by generate() for this very step
        return attention_mask
    args = dict(batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset,
                mask_function=mask_function, attention_mask=attention_mask, **kwargs)
    q_offset = kwargs.get("q_offset")  # a StaticCache's is a 0-d tensor: reading it syncs once per forward
    kv_len = (0 if q_offset is None else int(q_offset)) + kwargs["q_length"]
    kv_start, reason = None, None
    if kv_offset != 0:
        reason = "the cache dropped its oldest keys (sliding window)"
    elif mask_function is not causal_mask_function and not _is_plain_causal(args):
        reason = "the mask is not plain causal here (sliding window shorter than the sequence, chunks or packing)"
    elif attention_mask is not None:
        kv_start, reason = _left_padding(attention_mask, kv_len)
    return _Layout(kv_len, kv_start, reason, args)


# ---------------------------------------------------------------- attention

def _why_not(module, query, key, value, attention_mask, dropout, kwargs):
    """Why fuselm's ops cannot run this call exactly, or None."""
    if isinstance(attention_mask, torch.Tensor):
        return "a prepared 4D attention mask was passed"
    if isinstance(attention_mask, _Layout):
        if attention_mask.reason:
            return attention_mask.reason
        if key.shape[2] < attention_mask.kv_len:
            return f"the cache holds {key.shape[2]} keys but the mask describes {attention_mask.kv_len}"
    if dropout > 0:
        return "attention dropout is active (training)"
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return "autograd is recording and fuselm kernels are inference-only (use torch.no_grad())"
    if not kwargs.get("is_causal", getattr(module, "is_causal", True)):
        return "the attention is not causal"
    for name in ("softcap", "s_aux", "sinks", "position_bias"):
        if kwargs.get(name) is not None:
            return f"the model passes {name}, which fuselm's attention does not implement"
    if kwargs.get("output_attentions"):
        return "output_attentions=True needs the attention weights"
    if not query.shape[-1] == key.shape[-1] == value.shape[-1]:
        return "query, key and value head dims differ"
    return None


def fuselm_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface for "fuselm".

    query [B, Hq, Sq, D], key/value [B, Hkv, Skv, D] -> ([B, Sq, Hq, D], None).
    """
    reason = _why_not(module, query, key, value, attention_mask, dropout, kwargs)
    if reason:
        _say_once(logging.WARNING, f"{reason}; running transformers' sdpa attention for these calls")
        mask = attention_mask.sdpa_mask() if isinstance(attention_mask, _Layout) else attention_mask
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    backend = getattr(module, "_fuselm_backend", None)
    layout = attention_mask if attention_mask is not None else _Layout(key.shape[2])
    kv_len = layout.kv_len
    B, _, Sq, _ = query.shape
    q = query.transpose(1, 2)                                    # [B, Sq, Hq, D]
    k, v = key.transpose(1, 2), value.transpose(1, 2)            # [B, Skv, Hkv, D]
    kv_start = layout.kv_start                                   # [B] or None
    if kv_start is not None:  # layers may sit on other devices than the mask (device_map)
        kv_start = kv_start.to(query.device)
    if Sq == 1:
        _say_once(logging.INFO, "decode steps run fuselm.ops.decode_attention")
        seqlens = torch.full((B,), kv_len, dtype=torch.int32, device=query.device)
        out = ops.decode_attention(q[:, 0], k, v, seqlens, scale=scaling, kv_start=kv_start,
                                   backend=backend).unsqueeze(1)
    else:
        _say_once(logging.INFO, "prefill runs fuselm.ops.attention")
        out = ops.attention(q, k[:, :kv_len], v[:, :kv_len], causal=True, scale=scaling, kv_start=kv_start,
                            backend=backend)
    return out, None


AttentionInterface.register(NAME, fuselm_attention)
AttentionMaskInterface.register(NAME, fuselm_mask)


# ---------------------------------------------------------------- apply / revert

@dataclass
class _Patch:
    attn_implementation: str
    forwards: list     # (norm or linear module, its instance-level forward before patching, or None)
    attention: list    # attention modules given a _fuselm_backend


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _inference_forward(original, fused):
    """A forward for one module instance: fused(self, x), or the original one where fuselm's kernels do
    not apply: autograd recording through the input or the module's own weights (the kernels have no
    backward; LoRA and linear probes train weights on inputs that need no grad), or an input the
    kernels do not take (float64, or another dtype than a linear's weight). Takes the input by
    position or by the module's own keyword (`hidden_states`, `input`)."""
    def forward(self, *args, **kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters(False))):
            _say_once(logging.WARNING, "autograd is recording and fuselm kernels are inference-only "
                                       "(use torch.no_grad()); norms and linears run their transformers forward")
            return original(*args, **kwargs)
        if x.dtype not in _KERNEL_DTYPES or (isinstance(self, nn.Linear) and x.dtype != self.weight.dtype):
            return original(*args, **kwargs)
        return fused(self, x)
    return forward


def _norm_op(kind, backend):
    if kind == "rms":
        return lambda self, x: ops.rms_norm(x, self.weight, eps=self.variance_epsilon, backend=backend)
    return lambda self, x: ops.layer_norm(x, self.weight, self.bias, eps=self.eps, backend=backend)


def _norm_kind(module, names):
    """"rms", "layer" or None (left alone) for one module."""
    name = type(module).__name__
    if name not in names:
        return None
    if isinstance(module, nn.LayerNorm):
        return "layer" if module.weight is not None and len(module.normalized_shape) == 1 else None
    return "rms" if hasattr(module, "variance_epsilon") and isinstance(module.weight, nn.Parameter) else None


def _set_attn_implementation(model, name):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def apply(model, backend=None):
    """Route `model`'s attention and norms through fuselm kernels, in place; returns the model. On the
    CPU, where the linear backend resolves to native, its nn.Linear layers run fuselm's GEMV too.

    backend: "triton", "native", "torch", "auto" or None (fuselm's default). Supported model
    types: llama (SmolLM2), mistral, qwen2, gpt2; others raise ValueError untouched.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"fuselm.hf.apply supports model types {', '.join(sorted(SUPPORTED))}; "
                         f"got {model_type!r} ({type(model).__name__}); the model was left untouched")
    norm_names, attention_names = SUPPORTED[model_type]
    device = next(model.parameters()).device
    for op in ("attention", "decode_attention", "layer_norm" if model_type == "gpt2" else "rms_norm"):
        ops.implementation(op, backend, device)  # an unknown or unavailable backend raises here, not mid-forward
    if getattr(model, "_fuselm_patch", None) is not None:
        revert(model)
    modules = list(model.named_modules())
    norms = [(n, m, _norm_kind(m, norm_names)) for n, m in modules]
    attention = [m for _, m in modules if type(m).__name__ in attention_names]
    if not attention:
        raise ValueError(f"found no {'/'.join(attention_names)} module in {type(model).__name__}; "
                         "the model was left untouched")

    # matmuls: only where they would run native's CPU GEMV (decode-sized rows); elsewhere torch's own
    # nn.Linear already is the fastest path fuselm has
    fused = {m: _norm_op(kind, backend) for _, m, kind in norms if kind is not None}
    if ops.resolve("linear", backend, device) == "native":
        fused.update({m: lambda self, x: ops.linear(x, self.weight, self.bias, backend=backend)
                      for _, m in modules if type(m) is nn.Linear})
    patch = _Patch(model.config._attn_implementation, [], attention)
    _set_attn_implementation(model, NAME)
    for m in attention:
        m._fuselm_backend = backend
    for m, op in fused.items():
        patch.forwards.append((m, m.__dict__.get("forward")))
        m.forward = types.MethodType(_inference_forward(m.forward, op), m)
    replaced = _count(type(m).__name__ for m in fused)
    left = _count(type(m).__name__ for _, m, kind in norms if kind is None and "norm" in type(m).__name__.lower())
    model._fuselm_patch = patch
    log.info("fuselm.hf: %s: attention -> %r (%d %s), norms and linears replaced: %s; left alone: %s; backend %s",
             type(model).__name__, NAME, len(attention), "/".join(attention_names), replaced or "none",
             left or "none", backend or "default")
    return model


def _count(names):
    """'A x2, B x1' for the names in first-seen order."""
    counts = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return ", ".join(f"{n} x{c}" for n, c in counts.items())


def revert(model):
    """Undo `apply` exactly: attention implementation, norm and linear forwards, attention tags. Returns the model."""
    patch = getattr(model, "_fuselm_patch", None)
    if patch is None:
        raise ValueError(f"{type(model).__name__} was not patched by fuselm.hf.apply")
    for m, forward in patch.forwards:
        if forward is None:
            del m.forward
        else:
            m.forward = forward
    for m in patch.attention:
        del m._fuselm_backend
    _set_attn_implementation(model, patch.attn_implementation)
    del model._fuselm_patch
    log.info("fuselm.hf: %s reverted to attn_implementation=%r and its own norms and linears",
             type(model).__name__, patch.attn_implementation)
    return model


# ---------------------------------------------------------------- sampling

class FuselmSampler(LogitsProcessor):
    """Draws the next token with fuselm.ops.sample; returns scores that make transformers pick exactly it.

    Use it last, with transformers' own warpers off (temperature=1, top_k=0, top_p=1, min_p=None):
    `generate` below does both.
    """

    def __init__(self, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generator=None, backend=None):
        ops.check_sampling_params(temperature, top_k, top_p, min_p)
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        self.generator, self.backend = generator, backend

    def __call__(self, input_ids, scores):
        tokens = ops.sample(scores, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                            min_p=self.min_p, generator=self.generator, backend=self.backend)  # [B]
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens.view(-1, 1), 0.0)


# transformers warpers fuselm does not implement: generate refuses them rather than ignore them
_UNSUPPORTED_WARPERS = {"typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None}


def generate(model, inputs=None, *, temperature=None, top_k=None, top_p=None, min_p=None,
             generator=None, backend=None, **kwargs):
    """model.generate with sampling drawn by fuselm.ops.sample.

    temperature / top_k / top_p / min_p default to the model's generation config, as in
    transformers (top_k 50 unless the config says otherwise); temperature 0 is greedy.
    generator: a torch.Generator for reproducible draws. Other kwargs go to model.generate.
    """
    if kwargs.get("do_sample") is False:
        raise ValueError("fuselm.hf.generate samples; for greedy decoding call model.generate(do_sample=False)")
    config = kwargs.get("generation_config") or model.generation_config
    if (kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1) > 1:
        raise ValueError("fuselm.hf.generate samples one beam; num_beams > 1 is not supported")
    for name, off in _UNSUPPORTED_WARPERS.items():
        value = kwargs.get(name, getattr(config, name, off))
        if value is not None and value != off:
            raise ValueError(f"fuselm's sampler does not implement {name}={value}")

    def pick(value, name, off):
        value = getattr(config, name, None) if value is None else value
        return off if value is None else value

    sampler = FuselmSampler(pick(temperature, "temperature", 1.0), pick(top_k, "top_k", 0),
                            pick(top_p, "top_p", 1.0), pick(min_p, "min_p", 0.0), generator=generator, backend=backend)
    processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
    processors.append(sampler)
    kwargs.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_p=None, logits_processor=processors)
    return model.generate(inputs, **kwargs)
