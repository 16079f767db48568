"""The "native" backend: C++/CUDA kernels from csrc/ behind torch.ops.fuselm.*.

    from fuselm import native
    y = native.rms_norm(x, weight)                 # same semantics as fuselm.reference
    tokens = native.sample(logits, temperature=0.8, top_p=0.9)
    y = native.linear(x, weight)                   # CPU only: x @ weight.T for decode
    o = native.attention(q, k, v, causal=True)     # CPU only: prefill attention (GQA, kv_start)
    o = native.decode_attention(q, k_cache, v_cache, seqlens)   # CPU only: reads only the visible cache
    o = native.paged_decode_attention(q, k_pool, v_pool, block_tables, seqlens)   # CPU only: through block tables

The extension is compiled just in time with torch.utils.cpp_extension (ninja)
on first use of an op, or ahead of time with `build()` / `make native`, and
cached under $FUSELM_BUILD_DIR, else torch's extensions directory. CUDA sources
are added (sm_80 and sm_90a) when torch has CUDA and nvcc is found. Importing
this module compiles nothing; without a compiler or ninja the ops raise a
RuntimeError that says what is missing.

The ops are registered with TORCH_LIBRARY as torch.ops.fuselm.rms_norm,
layer_norm (overloads `.residual` return (y, h)), sample, and the CPU-only linear,
attention, decode_attention, paged_attention and paged_decode_attention (on GPUs those run
on backend 'torch' or 'triton'); the ops a CPU decode step runs also have out= forms
(`decode_attention.out`, `paged_decode_attention.out`, ...) that the replayed plan calls;
their fake (shape) functions below let torch.compile trace them. None of the CUDA
ops syncs with the host, so they can be captured in a CUDA graph.
"""
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from .quant import QuantizedStack, QuantizedTensor

NAME = "fuselm_native"
# One place for what gets compiled and how.
CPU_SOURCES = ("library.cpp", "cpu_vec.cpp", "norm_cpu.cpp", "sampling_cpu.cpp", "linear_cpu.cpp",
               "quant_cpu.cpp", "attention_cpu.cpp", "pointwise_cpu.cpp", "cache_cpu.cpp", "plan_cpu.cpp")
CUDA_SOURCES = ("norm_cuda.cu", "sampling_cuda.cu")
# -fopenmp: at::parallel_for is a header template whose `#pragma omp parallel` does nothing without it
# (every native op ran on one thread until it was added); it links the libgomp torch already loaded.
# A compiler without OpenMP (Apple clang) builds with -fopenmp-simd instead: one thread, and a warning.
CFLAGS = ["-O3"]
OPENMP = (["-fopenmp"], ["-fopenmp"])
NO_OPENMP = (["-fopenmp-simd"], [])
CUDA_FLAGS = [
    "-O3",
    "-gencode=arch=compute_80,code=[sm_80,compute_80]",  # A100 (+ PTX for later GPUs)
    "-gencode=arch=compute_90a,code=sm_90a",              # H100 / H200
]

_lock = threading.Lock()
_built = None  # path of the loaded library once built
_built_cuda = False  # whether it holds the CUDA kernels


def source_dir():
    """The directory holding the C++/CUDA sources (the fuselm.csrc package)."""
    from fuselm import csrc
    return Path(csrc.__file__).resolve().parent


def _with_cuda():
    from torch.utils import cpp_extension
    return torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or Path(cpp_extension.CUDA_HOME, "bin", "nvcc").exists())


def available(device="cpu"):
    """Whether the ops can run on `device` without failing: the library is loaded, a build
    of these sources is cached, or ninja and a C++ compiler (and nvcc for CUDA) can build
    it. Compiles nothing; meant for choosing a default backend."""
    needs_cuda = torch.device(device).type == "cuda"
    if _built is not None:
        return _built_cuda or not needs_cuda
    try:
        cuda = _with_cuda()
        if needs_cuda and not cuda:
            return False
        lib = _library_path(cuda)
        if _up_to_date(lib):
            return True
        _check_toolchain()
    except (RuntimeError, OSError):
        return False
    return True


def _check_toolchain():
    """Raise a RuntimeError naming what is missing to compile the extension."""
    from torch.utils import cpp_extension
    missing = []
    if not cpp_extension.is_ninja_available():
        missing.append("ninja (pip install ninja)")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ({cxx!r} from $CXX is not on PATH)" if "CXX" in os.environ
                       else "a C++ compiler (c++ is not on PATH; install g++ or set $CXX)")
    if missing:
        raise RuntimeError("the fuselm native backend needs to compile its C++ extension, but "
                           + " and ".join(missing) + " is missing; use backend='torch' or 'triton' instead")


def _build_dir(name):
    root = os.environ.get("FUSELM_BUILD_DIR")
    if root:
        path = os.path.join(root, name)
    else:
        from torch.utils import cpp_extension
        path = cpp_extension._get_build_directory(name, verbose=False)
    os.makedirs(path, exist_ok=True)
    return path


def _library_path(cuda):
    """Where the library of this torch version (and CUDA or not) is built; one folder each."""
    tag = "".join(c if c.isalnum() else "_" for c in torch.__version__)
    name = f"{NAME}_{'cuda' if cuda else 'cpu'}_torch{tag}"
    return Path(_build_dir(name)) / f"{name}.so"


def _up_to_date(lib):
    """Whether the library exists and is newer than every source and this file (its flags)."""
    inputs = [p for p in source_dir().iterdir() if p.suffix in (".cpp", ".cu", ".h", ".cuh")] + [Path(__file__)]
    return lib.exists() and lib.stat().st_mtime >= max(p.stat().st_mtime for p in inputs)


def build(verbose=False):
    """Compile (once; cached) and load the extension; returns the library path.

    A cached library that is newer than the sources is loaded directly, without
    a compiler. The cache is per torch version, so an upgrade rebuilds.
    """
    global _built, _built_cuda
    with _lock:
        if _built is not None:
            return _built
        cuda = _with_cuda()
        lib = _library_path(cuda)
        if _up_to_date(lib):
            torch.ops.load_library(str(lib))
        else:
            _compile(lib.stem, str(lib.parent), cuda, verbose)
        _register_fakes()
        _built, _built_cuda = str(lib), cuda
        return _built


def _compile(name, build_dir, cuda, verbose):
    _check_toolchain()
    from torch.utils import cpp_extension
    src = source_dir()
    sources = [str(src / f) for f in CPU_SOURCES + (CUDA_SOURCES if cuda else ())]
    print("building fuselm native extension (first use, ~1 min)...", flush=True)
    cflags, ldflags = OPENMP if _compiles_with_openmp() else NO_OPENMP
    if cflags != OPENMP[0]:
        logging.getLogger("fuselm").warning("fuselm: the C++ compiler has no OpenMP (-fopenmp): the native ops "
                                            "will run on one thread")
    try:
        cpp_extension.load(
            name=name, sources=sources, extra_cflags=CFLAGS + cflags, extra_ldflags=ldflags,
            extra_cuda_cflags=CUDA_FLAGS if cuda else None,
            extra_include_paths=[str(src)], build_directory=build_dir, with_cuda=cuda, is_python_module=False,
            verbose=verbose)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"building the fuselm native extension in {build_dir} failed: {e}") from e


def _compiles_with_openmp():
    """Whether $CXX (else c++) compiles and links an OpenMP program."""
    import tempfile
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "probe.cpp")
        source.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        result = subprocess.run([cxx, "-fopenmp", str(source), "-o", str(Path(tmp, "probe"))],
                                capture_output=True)
    return result.returncode == 0


def _register_fakes():
    """Shape functions for torch.compile / FakeTensor: outputs are fresh contiguous tensors."""
    def same_shape(x, *args):
        return x.new_empty(x.shape)

    def norm_residual(x, *args):
        return x.new_empty(x.shape), x.new_empty(x.shape)

    def sample(logits, *args):
        return logits.new_empty(logits.shape[:1], dtype=torch.int64)

    def linear(x, weight, bias=None, out_dtype=None):
        return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype or x.dtype)

    def qlinear(x, tiles, fmt, n, bias=None, out_dtype=None):
        return x.new_empty((*x.shape[:-1], n), dtype=out_dtype or x.dtype)

    def qembedding(tokens, tiles, fmt, n, k, dtype):
        return tiles.new_empty((*tokens.shape, k), dtype=dtype)

    def attention(q, *args):
        return q.new_empty(q.shape)

    def silu_mul(x):
        return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))

    def store_kv(k_cache, v_cache, k, v, slots):
        return None

    for op, fn in (("rope", same_shape), ("silu_mul", silu_mul), ("gelu_tanh", same_shape), ("store_kv", store_kv),
                   ("rms_norm", same_shape), ("rms_norm.residual", norm_residual), ("layer_norm", same_shape),
                   ("layer_norm.residual", norm_residual), ("sample", sample), ("linear", linear),
                   ("attention", attention), ("decode_attention", attention), ("paged_attention", attention),
                   ("paged_decode_attention", attention), ("qlinear", qlinear),
                   ("qembedding", qembedding)):
        torch.library.register_fake(f"fuselm::{op}", fn)


def _ops(device):
    if _built is None:
        build()
    if device.type == "cuda" and not _built_cuda:
        raise RuntimeError("the fuselm native extension was built without CUDA kernels (no nvcc, or no GPU "
                           "visible, at build time); install the CUDA toolkit and remove the cached build in "
                           f"{os.path.dirname(_built)}, or use backend='triton'")
    return torch.ops.fuselm


def rms_norm(x, weight, eps=1e-6, residual=None):
    """RMSNorm over the last dim; with `residual` returns (y, x + residual)."""
    ops = _ops(x.device)
    if residual is None:
        return ops.rms_norm(x, weight, eps)
    return ops.rms_norm.residual(x, residual, weight, eps)


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    """LayerNorm over the last dim (bias may be None); with `residual` returns (y, x + residual)."""
    ops = _ops(x.device)
    if residual is None:
        return ops.layer_norm(x, weight, bias, eps)
    return ops.layer_norm.residual(x, residual, weight, bias, eps)


def _param(value, dtype, device):
    """A sampling parameter as a () or [B] tensor on `device`; numbers become a fill, not a copy."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype)
    return torch.full((), value, dtype=dtype, device=device)


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generator=None):
    """One token per row of logits [B, V] -> [B] int64 (see fuselm.reference.sampling_probs).

    The seed is drawn from `generator` (or the default generator of the logits'
    device) as a tensor, so CUDA needs no host sync; the same generator state
    gives the same tokens.
    """
    device = logits.device
    ops = _ops(device)
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (), generator=generator, device=gen_device, dtype=torch.int64).to(device)
    return ops.sample(logits, _param(temperature, torch.float32, device), _param(top_k, torch.int64, device),
                      _param(top_p, torch.float32, device), _param(min_p, torch.float32, device), seed)


def linear(x, weight, bias=None, out_dtype=None):
    """x @ weight.T (+ bias) on the CPU -> [..., N] in out_dtype (default x's), accumulated in float32.

    Dense weight [N, K] (float32, bfloat16 or float16, x's dtype): streams the weight once per call
    for up to 32 rows of x (decode); more rows go to torch's GEMM. A fuselm.quant.QuantizedTensor
    packed for the native kernels (GGUF block formats): x quantized to int8 blocks once per call,
    integer dot products (csrc/quant_cpu.cpp); from 64 rows on (prefill) AVX-512 machines dequantize
    the weight chunk by chunk for torch's bf16 GEMM instead. Either way a row's result does not
    depend on the other rows up to 32 (dense) or 63 (quantized) rows (batch invariant)."""
    if isinstance(weight, QuantizedStack):
        raise ValueError(f"tensor {weight.name} holds parts in several formats; fuselm.ops.linear runs them")
    if isinstance(weight, QuantizedTensor):
        tiles = weight.require("tiles")
        _check_cpu("linear", "backend='torch'", x=x, tiles=tiles, bias=bias)
        return _ops(x.device).qlinear(x, tiles, weight.fmt.code, weight.shape[0], bias, out_dtype)
    _check_cpu("linear", "backend='torch' (F.linear)", x=x, weight=weight, bias=bias)
    return _ops(x.device).linear(x, weight, bias, out_dtype)


def embedding(tokens, table, dtype=None):
    """Rows `tokens` of table [V, H] -> [*tokens.shape, H] on the CPU. Quantized tables (packed) are
    dequantized row by row exactly as fuselm.reference.dequantize does; dense ones are gathered."""
    if isinstance(table, QuantizedTensor):
        tiles = table.require("tiles")
        _check_cpu("embedding", "backend='torch'", tokens=tokens, tiles=tiles)
        return _ops(tokens.device).qembedding(tokens, tiles, table.fmt.code, table.shape[0], table.shape[1],
                                              dtype or torch.float32)
    from . import reference
    return reference.embedding(tokens, table, dtype)


def rope(x, cos, sin, positions):
    """Rotary embedding of x [..., H, D] at positions [...] on the CPU (see fuselm.reference.rope)."""
    return _ops(x.device).rope(x, cos, sin, positions)


def silu_mul(x):
    """silu(x[..., :I]) * x[..., I:] on the CPU."""
    return _ops(x.device).silu_mul(x)


def gelu_tanh(x):
    """GELU (tanh approximation) on the CPU."""
    return _ops(x.device).gelu_tanh(x)


def store_kv(k_cache, v_cache, k, v, slots):
    """k_cache[slots] = k, v_cache[slots] = v on the CPU (caches [num_slots, H, D], k/v [T, H, D])."""
    _ops(k.device).store_kv(k_cache, v_cache, k, v, slots)


def attention(q, k, v, causal=True, scale=None, kv_start=None):
    """softmax(q k^T * scale) v on the CPU, as fuselm.reference.attention: q [B, Sq, Hq, D], k/v
    [B, Sk, Hkv, D] (Hq a multiple of Hkv), one of float32, bfloat16, float16 -> [B, Sq, Hq, D],
    accumulated in float32. Causal masking is bottom-right aligned; kv_start [B] (int32/int64)
    hides each row's first keys, which are never read. A row's result does not depend on the
    other rows (batch invariant)."""
    _check_cpu("attention", "backend='triton'", q=q, k=k, v=v, kv_start=kv_start)
    return _ops(q.device).attention(q, k, v, causal, scale, kv_start)


def decode_attention(q, k_cache, v_cache, seqlens, scale=None, kv_start=None):
    """One query per row on the CPU, as fuselm.reference.decode_attention: q [B, Hq, D] over caches
    [B, Smax, Hkv, D], keys [kv_start[b], seqlens[b]) -> [B, Hq, D]. Reads only those keys (cost
    proportional to the real lengths, not Smax); a row that sees no key is zeros. Batch invariant."""
    _check_cpu("decode_attention", "backend='triton'", q=q, k_cache=k_cache, v_cache=v_cache, seqlens=seqlens,
               kv_start=kv_start)
    return _ops(q.device).decode_attention(q, k_cache, v_cache, seqlens, scale, kv_start)


def paged_decode_attention(q, k_pool, v_pool, block_tables, seqlens, scale=None):
    """decode_attention over a paged cache on the CPU, as fuselm.reference.paged_decode_attention: q [B, Hq,
    D], pools [num_blocks, block_size, Hkv, D], block_tables [B, M] int32, seqlens [B] -> [B, Hq, D]; row
    b's key j is pool[block_tables[b, j // block_size], j % block_size] for j < seqlens[b]. Reads only
    those keys and their table entries (the others may hold anything); every block id a row reads must
    be one of the pool's (a clear error otherwise). Bitwise decode_attention on the gathered cache, so
    batch invariant."""
    _check_cpu("paged_decode_attention", "backend='triton'", q=q, k_pool=k_pool, v_pool=v_pool,
               block_tables=block_tables, seqlens=seqlens)
    return _ops(q.device).paged_decode_attention(q, k_pool, v_pool, block_tables, seqlens, scale)


def paged_attention(q, k_pool, v_pool, block_tables, seqlens, causal=True, scale=None):
    """Prefill attention after a cached prefix on the CPU, as fuselm.reference.paged_attention: q [B, Sq, Hq,
    D] are the last Sq of row b's seqlens[b] tokens, keys read through block_tables as in
    paged_decode_attention; causal is bottom-right aligned per row -> [B, Sq, Hq, D]. Row b is bitwise
    attention over its gathered keys [0, seqlens[b]), so batch invariant."""
    _check_cpu("paged_attention", "backend='triton'", q=q, k_pool=k_pool, v_pool=v_pool, block_tables=block_tables,
               seqlens=seqlens)
    return _ops(q.device).paged_attention(q, k_pool, v_pool, block_tables, seqlens, causal, scale)


def _check_cpu(op, gpu_backend, **tensors):
    """The CPU-only ops: a clear error naming the tensors elsewhere and the backend to use on GPUs."""
    where = ", ".join(f"{n} is on {t.device}" for n, t in tensors.items()
                      if isinstance(t, torch.Tensor) and t.device.type != "cpu")
    if where:
        raise RuntimeError(f"fuselm native {op} runs on the CPU only ({where}); use {gpu_backend} on GPUs")
