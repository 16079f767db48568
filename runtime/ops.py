"""One dispatch point per op: checks the arguments once, picks the backend, calls it.

Backends:
  "torch"  - runtime/reference.py, plain PyTorch (always available)
  "triton" - fuselm.kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)
  "native" - the C++/CUDA extension built from csrc/ (fuselm.native)

Every op takes `backend=`; without it the process default applies
(`set_backend`, or the FUSELM_BACKEND environment variable), and "auto" picks
per device from `_AUTO`. The backend that actually runs is logged once per
(op, backend, device), so nothing falls back to a slower path silently.
Checks that would need a host sync (values inside CUDA tensors) are skipped
so the decode step stays capturable in a CUDA graph.
"""
import functools
import importlib
import logging
import os

import torch

from . import reference
from .quant import QuantizedStack, QuantizedTensor

log = logging.getLogger("fuselm")

BACKENDS = ("torch", "triton", "native")
# Which module implements each op, per backend (torch is runtime/reference.py).
_MODULES = {
    "triton": {
        "linear": "fuselm.kernels.quant",  # GGUF-quantized weights; dense ones stay torch's (see linear)
        "rms_norm": "fuselm.kernels.norm",
        "layer_norm": "fuselm.kernels.norm",
        "attention": "fuselm.kernels.attention",
        "decode_attention": "fuselm.kernels.decode",
        "paged_attention": "fuselm.kernels.attention",
        "paged_decode_attention": "fuselm.kernels.decode",
        "sample": "fuselm.kernels.sampling",
    },
    "native": {
        "linear": "fuselm.native",
        "embedding": "fuselm.native",
        "rope": "fuselm.native",
        "silu_mul": "fuselm.native",
        "gelu_tanh": "fuselm.native",
        "store_kv": "fuselm.native",
        "rms_norm": "fuselm.native",
        "layer_norm": "fuselm.native",
        "attention": "fuselm.native",
        "decode_attention": "fuselm.native",
        "paged_attention": "fuselm.native",
        "paged_decode_attention": "fuselm.native",
        "sample": "fuselm.native",
    },
}
# The ops a backend implements for CPU tensors only.
_CPU_ONLY = {"native": ("linear", "embedding", "rope", "silu_mul", "gelu_tanh", "store_kv", "attention",
                        "decode_attention", "paged_attention", "paged_decode_attention")}
# The ops of the model's blocks that have no kernel but native's CPU one (elementwise, memory-bound:
# on GPUs torch runs them; on CPUs native exists so a decode step is all native operators).
POINTWISE = ("embedding", "rope", "silu_mul", "gelu_tanh", "store_kv")
ATTENTION = ("attention", "decode_attention", "paged_attention", "paged_decode_attention")
# "auto": the backend each op uses on each device type. CPU: Triton only runs there under its
# interpreter (~1000x slower); native measured faster than torch for every op but dense matmuls
# (bench/native_cpu.py: decode attention 9-50x and prefill attention 1.4-2.9x the reference) and is
# used where it can be built, torch otherwise (with a warning). Dense matmuls: whichever of the
# native GEMV and F.linear measured faster for the shape on this machine (runtime/tuning.py);
# quantized ones: native.
# CUDA: Triton, pending GPU measurements (bench/*.py) to choose between triton and native; linear
# there is Triton's for quantized weights and cuBLAS (torch) for dense ones.
_AUTO = {
    "cpu": dict.fromkeys(("linear", "rms_norm", "layer_norm", *ATTENTION, "sample", *POINTWISE), "native"),
    "cuda": {**dict.fromkeys(POINTWISE, "torch"),
             **dict.fromkeys(("linear", "rms_norm", "layer_norm", *ATTENTION, "sample"), "triton")},
}

_default = None  # None -> read FUSELM_BACKEND on first use
_logged = set()


def check_backend_name(name):
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of 'auto', {', '.join(map(repr, BACKENDS))}")
    return name


def set_backend(name):
    """Set the process-wide default backend: "auto", "torch", "triton" or "native"."""
    global _default
    _default = check_backend_name(name)


def get_backend():
    global _default
    if _default is None:
        _default = check_backend_name(os.environ.get("FUSELM_BACKEND", "auto"))
    return _default


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve(op, backend, device):
    """The backend name `op` runs with on `device` (a torch.device)."""
    name = check_backend_name(backend or get_backend())
    if name == "auto":
        name = _AUTO.get(device.type, _AUTO["cpu"])[op]
        if name == "native" and not _native_available(device):
            name = "torch"
            _log_once((op, "native-missing", device.type), logging.WARNING,
                      "fuselm: %s: the native extension cannot be built here (no compiler or ninja); "
                      "auto uses the slower 'torch' backend", op)
    return name


def _native_available(device):
    from . import native
    return native.available(device)


def _log_once(key, level, msg, *args):
    if key not in _logged:
        _logged.add(key)
        log.log(level, msg, *args)


def backends_with(op, device_type):
    """The backends that implement `op` on a device type ("cpu" or "cuda"), whether or not they can
    run on this machine (a compiler, a GPU)."""
    return [b for b in BACKENDS if b == "torch" or (
        op in _MODULES[b] and (device_type == "cpu" or op not in _CPU_ONLY.get(b, ())))]


def implementation(op, backend, device):
    """The function implementing `op` with `backend` on `device`; clear errors otherwise."""
    name = resolve(op, backend, device)
    if name == "torch":
        fn = getattr(reference, op)
    else:
        have = backends_with(op, device.type)
        if name not in have:
            raise ValueError(f"backend {name!r} has no {op} on {device.type}; available for {op}: {', '.join(have)}")
        module = _MODULES[name][op]
        if name == "triton" and device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"backend 'triton' needs CUDA tensors (got {device.type}); "
                "set TRITON_INTERPRET=1 before importing triton to run its kernels on the CPU"
            )
        try:
            fn = getattr(importlib.import_module(module), op)
        except ImportError as e:
            raise RuntimeError(f"backend {name!r} is not available for {op}: {e}") from e
    _log_once((op, name, device.type), logging.INFO, "fuselm: %s runs on backend %r (%s)", op, name, device.type)
    return fn


# ---------------------------------------------------------------- checks

def _check(cond, msg):
    if not cond:
        raise ValueError(msg)


def _check_float(name, t):
    _check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check(t.dtype in (torch.float32, torch.float16, torch.bfloat16),
           f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_same(name, t, ref_name, ref, shape=True):
    _check_float(name, t)
    _check(t.device == ref.device, f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if shape:
        _check(t.shape == ref.shape, f"{name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}")
        _check(t.dtype == ref.dtype, f"{name} is {t.dtype} but {ref_name} is {ref.dtype}")


def _check_norm_args(x, weight, bias, eps, residual):
    _check_float("x", x)
    _check(x.dim() >= 1 and x.shape[-1] > 0, f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _check_same(name, p, "x", x, shape=False)
            _check(p.shape == (x.shape[-1],), f"{name} must have shape ({x.shape[-1]},), got {tuple(p.shape)}")
    _check(float(eps) > 0, f"eps must be > 0, got {eps}")
    if residual is not None:
        _check_same("residual", residual, "x", x)


# ---------------------------------------------------------------- ops

@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16():
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX): then bf16 halves the
    bytes each decode step reads at no cost in speed."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _check_weight(x, weight, bias):
    """A dense weight [N, K] of x's dtype and device, or a QuantizedTensor [N, K]; bias [N]."""
    if isinstance(weight, (QuantizedTensor, QuantizedStack)):
        N, K = weight.shape
        _check(K == x.shape[-1], f"x must end in K = {K} (weight {weight.name} is quantized [{N}, {K}]), "
                                 f"got shape {tuple(x.shape)}")
        _check(weight.device == x.device, f"weight is on {weight.device} but x is on {x.device}")
    else:
        _check_same("weight", weight, "x", x, shape=False)
        _check(weight.dim() == 2 and weight.shape[1] == x.shape[-1] and weight.dtype == x.dtype,
               f"weight must be [N, {x.shape[-1]}] {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
        N = weight.shape[0]
    if bias is not None:
        _check_same("bias", bias, "x", x, shape=False)
        _check(bias.shape == (N,), f"bias must have shape ({N},), got {tuple(bias.shape)}")


def linear(x, weight, bias=None, out_dtype=None, backend=None):
    """x @ weight.T (+ bias): x [..., K], weight [N, K] dense or a fuselm.quant.QuantizedTensor,
    bias [N] -> [..., N] in out_dtype (default x's)."""
    _check_float("x", x)
    _check_weight(x, weight, bias)
    _check(out_dtype in (None, torch.float32, torch.float16, torch.bfloat16),
           f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if isinstance(weight, QuantizedStack):
        n = [p.shape[0] for p in weight.parts]
        biases = [None] * len(n) if bias is None else bias.split(n)
        return torch.cat([linear(x, p, b, out_dtype, backend) for p, b in zip(weight.parts, biases)], dim=-1)
    dense = not isinstance(weight, QuantizedTensor)
    name = resolve("linear", backend, x.device)
    if dense and name == "triton":
        # Triton's kernels multiply quantized weights; a dense matmul is cuBLAS's (or oneDNN's) GEMM
        _log_once(("linear", "triton-dense", x.device.type), logging.INFO,
                  "fuselm: linear of dense weights runs on backend 'torch' (%s): backend 'triton' multiplies "
                  "GGUF-quantized weights", x.device.type)
        backend = "torch"
    elif dense and name == "native" and check_backend_name(backend or get_backend()) == "auto":
        from . import tuning
        backend = tuning.linear_backend(x, weight)  # dense: whichever measured faster for this shape
    return implementation("linear", backend, x.device)(x, weight, bias, out_dtype)


def embedding(tokens, table, dtype=None, backend=None):
    """Rows `tokens` (integer tensor) of table [V, H] (dense or quantized) -> [*tokens.shape, H] in
    dtype (default the table's; float32 for a quantized one)."""
    _check(isinstance(tokens, torch.Tensor) and tokens.dtype in (torch.int32, torch.int64),
           f"tokens must be an int32 or int64 tensor, got {getattr(tokens, 'dtype', type(tokens).__name__)}")
    if not isinstance(table, QuantizedTensor):
        _check_float("table", table)
        _check(table.dim() == 2, f"table must be [V, H], got shape {tuple(table.shape)}")
    _check(table.device == tokens.device, f"table is on {table.device} but tokens are on {tokens.device}")
    return implementation("embedding", backend, tokens.device)(tokens, table, dtype)


def rope(x, cos, sin, positions, backend=None):
    """Rotary embedding ("rotate half") of x [..., H, D] at positions [...] (int64), with cos/sin
    tables [P, D/2] float32 (fuselm.rope.tables) -> x's shape and dtype."""
    _check_float("x", x)
    _check(x.dim() >= 3 and x.shape[-1] % 2 == 0, f"x must be [..., H, D] with D even, got shape {tuple(x.shape)}")
    _check(isinstance(positions, torch.Tensor) and positions.dtype == torch.int64
           and positions.shape == x.shape[:-2], f"positions must be int64 of shape {tuple(x.shape[:-2])}, got "
                                                f"{getattr(positions, 'dtype', None)} {tuple(getattr(positions, 'shape', ()))}")
    for name, t in (("cos", cos), ("sin", sin)):
        _check(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 2
               and t.shape[1] == x.shape[-1] // 2, f"{name} must be float32 [P, {x.shape[-1] // 2}]")
    return implementation("rope", backend, x.device)(x, cos, sin, positions)


def silu_mul(x, backend=None):
    """silu(x[..., :I]) * x[..., I:] for x [..., 2I] (the gated MLP) -> [..., I]."""
    _check_float("x", x)
    _check(x.dim() >= 1 and x.shape[-1] % 2 == 0, f"x must be [..., 2I], got shape {tuple(x.shape)}")
    return implementation("silu_mul", backend, x.device)(x)


def gelu_tanh(x, backend=None):
    """GELU with the tanh approximation (GPT-2's MLP)."""
    _check_float("x", x)
    return implementation("gelu_tanh", backend, x.device)(x)


def store_kv(k_cache, v_cache, k, v, slots, backend=None):
    """Write k/v [T, H, D] into rows `slots` [T] (int64) of k_cache/v_cache [num_slots, H, D] (in place)."""
    for name, c, t in (("k", k_cache, k), ("v", v_cache, v)):
        _check_float(name, t)
        _check_same(f"{name}_cache", c, name, t, shape=False)
        _check(c.dim() == 3 and t.dim() == 3 and t.shape[1:] == c.shape[1:] and c.dtype == t.dtype,
               f"{name} must be [T, H, D] matching {name}_cache [num_slots, H, D] in dtype, got "
               f"{tuple(t.shape)} {t.dtype} and {tuple(c.shape)} {c.dtype}")
    _check_rows("slots", slots, k.shape[0], k.device)
    _check(slots.dtype == torch.int64, f"slots must be int64, got {slots.dtype}")
    return implementation("store_kv", backend, k.device)(k_cache, v_cache, k, v, slots)


def rms_norm(x, weight, eps=1e-6, residual=None, backend=None):
    """RMSNorm over the last dim; with `residual` returns (y, x + residual)."""
    _check_norm_args(x, weight, None, eps, residual)
    return implementation("rms_norm", backend, x.device)(x, weight, eps=eps, residual=residual)


def layer_norm(x, weight, bias, eps=1e-5, residual=None, backend=None):
    """LayerNorm over the last dim (bias may be None); with `residual` returns (y, x + residual)."""
    _check_norm_args(x, weight, bias, eps, residual)
    return implementation("layer_norm", backend, x.device)(x, weight, bias, eps=eps, residual=residual)


def _check_heads(q_heads, kv_heads):
    _check(kv_heads > 0 and q_heads % kv_heads == 0,
           f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})")


_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _check_rows(name, t, rows, device):
    """One integer per batch row (seqlens, kv_start); the values are the caller's contract (no host sync)."""
    got = (f"a {type(t).__name__}" if not isinstance(t, torch.Tensor)
           else f"{t.dtype} of shape {tuple(t.shape)} on {t.device}")
    _check(isinstance(t, torch.Tensor) and t.shape == (rows,) and t.dtype in _INT_DTYPES and t.device == device,
           f"{name} must be an integer tensor of shape ({rows},) on {device}, got {got}")


def _check_qkv(q, q_layout, k, v, k_name, v_name, kv_layout, paged=False):
    """q and its keys/values: one device and dtype, shared batch (unless paged: pools of blocks shared by
    every row) and head dim, a valid GQA head ratio."""
    _check_float("q", q)
    _check(q.dim() == q_layout.count(",") + 1, f"q must be {q_layout}, got shape {tuple(q.shape)}")
    _check_same(k_name, k, "q", q, shape=False)
    _check(k.dim() == 4, f"{k_name} must be {kv_layout}, got shape {tuple(k.shape)}")
    _check_same(v_name, v, k_name, k)
    _check(k.dtype == q.dtype, f"{k_name} is {k.dtype} but q is {q.dtype}")
    _check((paged or k.shape[0] == q.shape[0]) and k.shape[3] == q.shape[-1],
           f"{k_name} {tuple(k.shape)} must share batch and head dim with q {tuple(q.shape)}")
    _check_heads(q.shape[-2], k.shape[2])


def attention(q, k, v, causal=True, scale=None, kv_start=None, backend=None):
    """Prefill attention. q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> [B, Sq, Hq, D].

    Causal masking is bottom-right aligned (queries follow a cached prefix).
    kv_start [B] int (optional, default 0; left padding): row b ignores its first kv_start[b] keys.
    """
    _check_qkv(q, "[B, S, H, D]", k, v, "k", "v", "[B, S, H, D]")
    if kv_start is not None:
        _check_rows("kv_start", kv_start, q.shape[0], q.device)
    return implementation("attention", backend, q.device)(q, k, v, causal=causal, scale=scale, kv_start=kv_start)


def decode_attention(q, k_cache, v_cache, seqlens, scale=None, kv_start=None, backend=None):
    """Decode attention: q [B, Hq, D] over caches [B, Smax, Hkv, D], keys [kv_start[b], seqlens[b]) -> [B, Hq, D].

    kv_start [B] int is optional (default 0; left padding). kv_start[b] <= seqlens[b] <= Smax is
    the caller's contract (checking it would need a host sync).
    """
    _check_qkv(q, "[B, H, D]", k_cache, v_cache, "k_cache", "v_cache", "[B, Smax, H, D]")
    _check_rows("seqlens", seqlens, q.shape[0], q.device)
    if kv_start is not None:
        _check_rows("kv_start", kv_start, q.shape[0], q.device)
    return implementation("decode_attention", backend, q.device)(q, k_cache, v_cache, seqlens, scale=scale,
                                                                 kv_start=kv_start)


def _check_pages(q, k_pool, v_pool, block_tables, seqlens):
    """A paged cache: pools [num_blocks, block_size, Hkv, D] shared by every row, block_tables [B, M]
    int32 of block ids, seqlens [B] int. Values (ids < num_blocks, seqlens <= M * block_size) are
    the caller's contract: checking them would need a host sync."""
    _check_qkv(q, "[B, S, H, D]" if q.dim() == 4 else "[B, H, D]", k_pool, v_pool, "k_pool", "v_pool",
               "[num_blocks, block_size, H, D]", paged=True)
    B = q.shape[0]
    _check(isinstance(block_tables, torch.Tensor) and block_tables.dim() == 2 and block_tables.shape[0] == B
           and block_tables.dtype == torch.int32 and block_tables.device == q.device,
           f"block_tables must be an int32 tensor [B={B}, max_blocks] on {q.device}, got "
           + (f"{block_tables.dtype} of shape {tuple(block_tables.shape)} on {block_tables.device}"
              if isinstance(block_tables, torch.Tensor) else f"a {type(block_tables).__name__}"))
    _check_rows("seqlens", seqlens, B, q.device)


def paged_decode_attention(q, k_pool, v_pool, block_tables, seqlens, scale=None, backend=None):
    """Decode attention over a paged cache: q [B, Hq, D]; row b's keys are positions [0, seqlens[b]),
    position j at pool[block_tables[b, j // block_size], j % block_size] -> [B, Hq, D]."""
    _check(q.dim() == 3, f"q must be [B, H, D], got shape {tuple(q.shape)}")
    _check_pages(q, k_pool, v_pool, block_tables, seqlens)
    return implementation("paged_decode_attention", backend, q.device)(q, k_pool, v_pool, block_tables, seqlens,
                                                                       scale=scale)


def paged_attention(q, k_pool, v_pool, block_tables, seqlens, causal=True, scale=None, backend=None):
    """Prefill attention after a cached prefix: q [B, Sq, Hq, D] are the last Sq of row b's seqlens[b]
    tokens, whose keys (the prefix and these queries' own, already stored) are read through block_tables
    as in paged_decode_attention; causal is bottom-right aligned per row -> [B, Sq, Hq, D]."""
    _check(q.dim() == 4, f"q must be [B, S, H, D], got shape {tuple(q.shape)}")
    _check_pages(q, k_pool, v_pool, block_tables, seqlens)
    return implementation("paged_attention", backend, q.device)(q, k_pool, v_pool, block_tables, seqlens,
                                                                causal=causal, scale=scale)


def _check_param(name, value, rows, device, ok, what):
    """A sampling parameter: a number or a [rows] tensor; values checked where that needs no sync."""
    if isinstance(value, torch.Tensor):
        _check(value.shape in ((), (rows,)), f"{name} must be a number or a tensor of shape ({rows},), "
                                             f"got shape {tuple(value.shape)}")
        _check(value.device == device, f"{name} is on {value.device} but logits are on {device}")
        if value.device.type == "cpu":
            _check(bool(ok(value).all()), f"{name} must be {what}")
    else:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool),
               f"{name} must be a number or a tensor, got {type(value).__name__}")
        _check(bool(ok(torch.tensor(value))), f"{name} must be {what}, got {value}")


def check_sampling_params(temperature, top_k, top_p, min_p, rows=1, device=torch.device("cpu")):
    _check_param("temperature", temperature, rows, device, lambda t: t >= 0, ">= 0")
    _check_param("top_k", top_k, rows, device, lambda t: (t >= 0) & (t == t.round()), "an integer >= 0 (0 = off)")
    _check_param("top_p", top_p, rows, device, lambda t: (t > 0) & (t <= 1), "in (0, 1]")
    _check_param("min_p", min_p, rows, device, lambda t: (t >= 0) & (t <= 1), "in [0, 1]")


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generator=None, backend=None):
    """One token per row of logits [B, V] -> [B] int64; temperature 0 is argmax."""
    _check_float("logits", logits)
    _check(logits.dim() == 2 and logits.shape[1] > 0, f"logits must be [B, V], got shape {tuple(logits.shape)}")
    check_sampling_params(temperature, top_k, top_p, min_p, logits.shape[0], logits.device)
    fn = implementation("sample", backend, logits.device)
    return fn(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator)
