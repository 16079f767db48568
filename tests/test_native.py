"""The native backend itself (csrc/ and fuselm.native); its numerics against the
reference are the shared property tests in test_norm.py and test_sampling.py.

- The extension builds (here: CPU) and every op passes torch.library.opcheck
  (schema, fake tensors, torch.compile's AOT dispatch, dynamic shapes).
- Every CUDA header compiles with nvcc for sm_80 and sm_90a (skipped only
  without nvcc), kernels instantiated for each dtype; the torch glue of the CUDA
  ops (CUDA_SOURCES) compiles against torch's headers for sm_90a.
- The CUDA kernels run on the CPU under csrc/emulator (fibers for threads):
  the norms match the reference, and the sampler draws the very tokens the CPU
  sampler draws for the same seed (both use Philox(seed, row) and the same
  inverse transform), all inside the reference's kept set.
- Without a compiler the ops raise a clear RuntimeError; importing compiles nothing.
- On a GPU: the ops run inside a captured CUDA graph, and compute-sanitizer
  memcheck finds no error in them on edge shapes (where it is installed).
"""
import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fuselm import native, reference
from tests.checks import assert_matches
from tests.conftest import DEVICE

CSRC = native.source_dir()
ROOT = Path(__file__).resolve().parent.parent
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def fuselm_ops():
    native.build()
    assert native.available() and native.available(DEVICE)
    return torch.ops.fuselm


# ---------------------------------------------------------------- registration

def _opcheck_cases(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 40, generator=g).to(device)        # [B, S, H]
    r, w, b = torch.randn_like(x), torch.randn(40).to(device), torch.randn(40).to(device)
    logits = torch.randn(4, 300, generator=g).to(device)     # [B, V]
    f32 = dict(dtype=torch.float32, device=device)
    params = (torch.tensor([0.0, 0.7, 1.0, 1.5], **f32), torch.tensor([0, 5, 1, 300], device=device),
              torch.tensor(0.9, **f32), torch.tensor([0.0, 0.1, 0.0, 0.5], **f32), torch.tensor(7, device=device))
    return [("rms_norm.default", (x, w, 1e-6)), ("rms_norm.residual", (x, r, w, 1e-6)),
            ("layer_norm.default", (x, w, b, 1e-5)), ("layer_norm.default", (x.half(), w.half(), None, 1e-5)),
            ("layer_norm.residual", (x.bfloat16(), r.bfloat16(), w, b, 1e-5)),
            ("sample.default", (logits, *params)), ("sample.default", (logits.bfloat16(), *params))]


@pytest.mark.parametrize("case", range(len(_opcheck_cases("cpu"))))
def test_opcheck(fuselm_ops, case):
    name, args = _opcheck_cases(DEVICE)[case]
    packet, overload = name.split(".")
    torch.library.opcheck(getattr(getattr(fuselm_ops, packet), overload), args)


def test_argument_errors_name_the_problem(fuselm_ops):
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(8,\)"):
        fuselm_ops.rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(RuntimeError, match="residual has shape"):
        fuselm_ops.rms_norm.residual(x, torch.randn(3, 8), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        fuselm_ops.layer_norm(x.double(), torch.ones(8), None, 1e-5)
    one = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="top_k must be a Long tensor"):
        fuselm_ops.sample(x, one, one, one, one, torch.tensor(0))
    with pytest.raises(RuntimeError, match=r"temperature must have shape \(\) or \(2,\)"):
        fuselm_ops.sample(x, torch.ones(3), torch.tensor(0), one, one, torch.tensor(0))


def test_import_compiles_nothing_and_missing_compiler_is_clear(tmp_path):
    """A subprocess with a nonexistent compiler and an empty build cache."""
    code = ("import sys, torch, fuselm, fuselm.native as n\n"
            "assert 'torch.utils.cpp_extension' not in sys.modules, 'importing fuselm.native loaded cpp_extension'\n"
            "assert not n.available() and not n.available('cuda')\n"
            "try:\n    n.rms_norm(torch.ones(2, 3), torch.ones(3))\n"
            "except RuntimeError as e:\n    print('ERROR:', e)\n")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), FUSELM_BUILD_DIR=str(tmp_path / "build"))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERROR:" in out.stdout and "a C++ compiler" in out.stdout and "no-such-c++" in out.stdout, out.stdout


def test_philox_known_answers(tmp_path):
    """csrc/philox.h is Philox4x32-10: the known-answer vectors of Random123 (kat_vectors)."""
    src = tmp_path / "kat.cpp"
    src.write_text('#include "philox.h"\n#include <cstdio>\nint main() {\n'
                   '  const fuselm::Philox4x32 out[3] = {fuselm::philox4x32_10({{0, 0, 0, 0}}, 0),\n'
                   '    fuselm::philox4x32_10({{~0u, ~0u, ~0u, ~0u}}, ~0ull),\n'
                   '    fuselm::philox4x32_10({{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}},\n'
                   '                          0xa4093822ull | 0x299f31d0ull << 32)};\n'
                   '  for (const auto& o : out) std::printf("%08x %08x %08x %08x\\n", o.v[0], o.v[1], o.v[2], o.v[3]);\n'
                   '}\n')
    subprocess.run(["c++", "-std=c++17", f"-I{CSRC}", str(src), "-o", str(tmp_path / "kat")], check=True, timeout=120)
    out = subprocess.run([str(tmp_path / "kat")], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:3] == ["6627e8d5 e169c58d bc57ac4c 9b00dbd8", "408f276d 41c83b0e a20bc7c6 6d5451fd",
                       "d16cfe09 94fdcceb 5001e420 24126ea1"]


# ---------------------------------------------------------------- CUDA sources

def _nvcc():
    from torch.utils import cpp_extension
    found = shutil.which("nvcc")
    if found is None and cpp_extension.CUDA_HOME:
        candidate = Path(cpp_extension.CUDA_HOME, "bin", "nvcc")
        found = str(candidate) if candidate.exists() else None
    return found


# Explicit instantiations, so the kernel templates are compiled and not only parsed.
INSTANTIATIONS = {
    "norm.cuh": [f"template void fuselm::launch_norm<{t}, {w}>(const fuselm::NormArgs&, cudaStream_t);"
                 for t, w in [("float", "float"), ("__half", "__half"), ("__half", "float"),
                              ("__nv_bfloat16", "__nv_bfloat16"), ("__nv_bfloat16", "float")]],
    "sampling.cuh": [f"template void fuselm::launch_sample<{t}>(const fuselm::SampleArgs&, cudaStream_t);"
                     for t in ("float", "__half", "__nv_bfloat16")],
}


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (no CUDA toolkit): CUDA headers not compile-checked")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_cuda_headers_compile(arch, tmp_path):
    headers = sorted(p.name for p in CSRC.glob("*.cuh"))
    assert set(INSTANTIATIONS) <= set(headers)
    unit = tmp_path / "check.cu"
    unit.write_text("".join(f'#include "{h}"\n' for h in headers)
                    + "\n".join(line for h in headers for line in INSTANTIATIONS.get(h, [])) + "\n")
    compute = arch.replace("sm_", "compute_")
    cmd = [_nvcc(), "-c", "-std=c++17", f"-I{CSRC}", f"-gencode=arch={compute},code={arch}", "-Werror",
           "all-warnings", str(unit), "-o", str(tmp_path / "check.o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"nvcc failed for {arch}:\n{out.stderr[-4000:]}"


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (no CUDA toolkit): CUDA glue not compile-checked")
@pytest.mark.parametrize("source", native.CUDA_SOURCES)
def test_cuda_glue_compiles_against_torch_headers(source, tmp_path):
    """The torch glue of the CUDA ops (checks, stream, dispatch, registration) never runs without a GPU:
    compile it as the extension build would (host and device code, one target). CPU builds of torch
    ship c10/cuda without the header its CMake generates; a stand-in declares its one macro."""
    from torch.utils import cpp_extension
    generated = tmp_path / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    generated.parent.mkdir(parents=True)
    generated.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{tmp_path / 'include'}", f"-I{CSRC}"]
    cmd = [_nvcc(), "-c", "-std=c++17", *includes, "-gencode=arch=compute_90a,code=sm_90a",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", str(CSRC / source),
           "-o", str(tmp_path / "glue.o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"nvcc failed for {source}:\n{out.stderr[-4000:]}"


# ---------------------------------------------------------------- CUDA kernels, emulated

class NormArgs(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("x_row_stride", ctypes.c_int64), ("residual", ctypes.c_void_p),
                ("residual_row_stride", ctypes.c_int64), ("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("y", ctypes.c_void_p), ("h", ctypes.c_void_p), ("rows", ctypes.c_int64), ("cols", ctypes.c_int64),
                ("eps", ctypes.c_float), ("rms", ctypes.c_bool)]


class SampleArgs(ctypes.Structure):
    _fields_ = [("logits", ctypes.c_void_p), ("row_stride", ctypes.c_int64), ("rows", ctypes.c_int64),
                ("vocab", ctypes.c_int64)] + [
        (f"{name}{suffix}", kind) for name in ("temperature", "top_k", "top_p", "min_p")
        for suffix, kind in (("", ctypes.c_void_p), ("_stride", ctypes.c_int64))] + [
        ("seed", ctypes.c_void_p), ("out", ctypes.c_void_p)]


def _cuda_include():
    from torch.utils import cpp_extension
    for home in (cpp_extension.CUDA_HOME, "/usr/local/cuda"):
        if home and Path(home, "include", "cuda_fp16.h").exists():
            return Path(home, "include")
    return None


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The .cuh kernels compiled for the CPU emulator, as a ctypes library."""
    include = _cuda_include()
    if include is None:
        pytest.skip("CUDA headers (cuda_fp16.h) not found: CUDA kernels not emulated")
    work = tmp_path_factory.mktemp("emulator")
    launch = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<(.*?)>>>\(([^;]*)\);")
    for p in CSRC.glob("*.[ch]*"):
        text = p.read_text()
        (work / p.name).write_text(launch.sub(r"::emu::launch(\2, [&] { \1(\3); });", text))
    assert "::emu::launch" in (work / "sampling.cuh").read_text()
    lib = work / "libemulated.so"
    cmd = ["c++", "-O1", "-std=c++20", "-shared", "-fPIC", f"-I{include}", f"-I{work}",
           "-include", str(CSRC / "emulator" / "cuda_emulator.h"), str(CSRC / "emulator" / "kernels.cpp"),
           "-o", str(lib)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return ctypes.CDLL(str(lib))


CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ptr(t):
    return None if t is None else t.data_ptr()


def emulated_norm(lib, rms, x, weight, bias, residual, eps):
    cols = x.shape[-1]
    x2 = x.reshape(-1, cols)                                    # [M, N], a view here (unit column stride)
    r2 = None if residual is None else residual.reshape(-1, cols)
    y, h = torch.empty_like(x2), None if residual is None else torch.empty_like(x2)
    lib.emulated_norm(CODE[x.dtype], weight.dtype == torch.float32 and x.dtype != torch.float32, NormArgs(
        _ptr(x2), x2.stride(0), _ptr(r2), 0 if r2 is None else r2.stride(0), _ptr(weight), _ptr(bias),
        _ptr(y), _ptr(h), x2.shape[0], cols, eps, rms))
    return y.view(x.shape) if residual is None else (y.view(x.shape), h.view(x.shape))


NORM_CASES = [  # (rows, cols, dtype, weight dtype, residual, bias, sliced: rows start off 16-byte alignment)
    (3, 7, torch.float32, torch.float32, True, True, False),
    (2, 576, torch.bfloat16, torch.bfloat16, True, False, False),
    (2, 1001, torch.float16, torch.float32, False, True, False),
    (2, 64, torch.float16, torch.float16, True, True, True),
    (1, 9000, torch.bfloat16, torch.float32, True, True, False),     # > 1024 packs: threads loop
    (2, 4100, torch.float32, torch.float32, False, False, True),
]


@pytest.mark.parametrize("case", NORM_CASES, ids=str)
@pytest.mark.parametrize("rms", [True, False], ids=["rms_norm", "layer_norm"])
def test_emulated_cuda_norm_matches_reference(emulated, case, rms):
    rows, cols, dtype, w_dtype, with_residual, with_bias, sliced = case
    g = torch.Generator().manual_seed(cols)
    x = (torch.randn(rows, cols + sliced, generator=g) * 4 + 2).to(dtype)[:, sliced:]
    residual = torch.randn(rows, cols, generator=g).to(dtype) if with_residual else None
    weight = torch.randn(cols, generator=g).to(w_dtype)
    bias = torch.randn(cols, generator=g).to(w_dtype) if with_bias and not rms else None
    eps = 1e-5
    out = emulated_norm(emulated, rms, x, weight, bias, residual, eps)
    ref = reference.rms_norm(x, weight, eps, residual) if rms else reference.layer_norm(x, weight, bias, eps, residual)
    if residual is None:
        out, ref = (out,), (ref,)
    else:
        assert torch.equal(out[1], ref[1]), "h = x + residual must be rounded exactly as the unfused add"
    h = ref[-1] if residual is not None else x
    y32 = (reference.rms_norm(h.float(), weight.float(), eps) if rms else
           reference.layer_norm(h.float(), weight.float(), None if bias is None else bias.float(), eps))
    assert_matches(out[0], y32, dtype, what=f"emulated {'rms' if rms else 'layer'}_norm {case}")


def emulated_sample(lib, logits, temperature, top_k, top_p, min_p, seed):
    def param(value, dtype):
        t = torch.as_tensor(value, dtype=dtype).contiguous()
        return t, 0 if t.dim() == 0 else 1

    (t, ts), (k, ks), (p, ps), (m, ms) = (param(temperature, torch.float32), param(top_k, torch.int64),
                                          param(top_p, torch.float32), param(min_p, torch.float32))
    seed_t, out = torch.tensor(seed, dtype=torch.int64), torch.empty(logits.shape[0], dtype=torch.int64)
    lib.emulated_sample(CODE[logits.dtype], SampleArgs(
        _ptr(logits), logits.stride(0), logits.shape[0], logits.shape[1], _ptr(t), ts, _ptr(k), ks, _ptr(p), ps,
        _ptr(m), ms, _ptr(seed_t), _ptr(out)))
    return out


def _sampling_rows(V):
    """Rows that reach every branch of the kernel: ties, -inf, flat, per-row parameters."""
    g = torch.Generator().manual_seed(V)
    x = (torch.randn(10, V, generator=g) * 3).round()    # integer logits: plenty of exact ties
    x[1, ::3] = float("-inf")
    x[2] = 0.0                                           # flat: every token tied
    x[3, 7] = x[3].max() + 4                             # one dominant token
    x[4, :V // 2] = x[4].max()                           # a tie at the max across warps' chunks
    params = dict(temperature=torch.tensor([1.0, 0.8, 1.0, 1.0, 1.3, 0.5, 1.0, 2.0, 1.0, 0.0]),
                  top_k=torch.tensor([0, 50, 7, 0, 3, 1000, 0, 2, V - 1, 0]),
                  top_p=torch.tensor([1.0, 0.9, 0.5, 0.95, 1.0, 0.7, 0.3, 1.0, 0.99, 1.0]),
                  min_p=torch.tensor([0.0, 0.0, 0.0, 0.05, 0.0, 0.0, 0.2, 0.0, 0.01, 0.0]))
    return x, params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_cuda_sampler_draws_the_cpu_tokens(fuselm_ops, emulated, dtype):
    x, params = _sampling_rows(3001)
    logits = x.to(dtype)
    probs = reference.sampling_probs(logits, **params)
    for seed in (0, 1):
        gpu = emulated_sample(emulated, logits, **params, seed=seed)
        cpu = fuselm_ops.sample(logits, params["temperature"], params["top_k"], params["top_p"], params["min_p"],
                                torch.tensor(seed))
        assert torch.equal(gpu, cpu), f"seed {seed}: emulated CUDA {gpu.tolist()} vs CPU {cpu.tolist()}"
        assert (probs.gather(1, gpu.view(-1, 1)) > 0).all(), f"token outside the kept set: {gpu.tolist()}"


def test_emulated_cuda_sampler_large_vocab(fuselm_ops, emulated):
    """A 128k vocabulary: three radix rounds over realistic values, 32 warp chunks of 4096."""
    x = torch.randn(2, 131072, generator=torch.Generator().manual_seed(0)) * 2.5
    params = dict(temperature=torch.tensor([0.8, 1.0]), top_k=torch.tensor([50, 0]),
                  top_p=torch.tensor([0.9, 0.95]), min_p=torch.tensor([0.0, 0.01]))
    gpu = emulated_sample(emulated, x, **params, seed=3)
    assert torch.equal(gpu, fuselm_ops.sample(x, *params.values(), torch.tensor(3)))
    assert (reference.sampling_probs(x, **params).gather(1, gpu.view(-1, 1)) > 0).all()


def test_emulated_cuda_sampler_rows_without_distribution(emulated):
    """NaN / +inf / all -inf rows return torch.argmax, like the CPU sampler."""
    x = torch.randn(3, 100)
    x[0, 17], x[1, 42], x[2] = float("nan"), float("inf"), float("-inf")
    tokens = emulated_sample(emulated, x, 1.0, 5, 0.9, 0.0, seed=0)
    assert tokens.tolist() == [17, 42, 0]


# ---------------------------------------------------------------- on a GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture(fuselm_ops):
    """Norms and the sampler (seed drawn on the device) replay in a CUDA graph."""
    x = torch.randn(4, 576, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(576, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(4, 32000, device="cuda")
    native.sample(logits, temperature=0.8, top_k=50, top_p=0.9)  # warm up outside the capture
    native.rms_norm(x, w, residual=x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, h = native.rms_norm(x, w, residual=x)
        tokens = native.sample(logits, temperature=0.8, top_k=50, top_p=0.9)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(h, reference.rms_norm(x, w, residual=x)[1])
    probs = reference.sampling_probs(logits, temperature=0.8, top_k=50, top_p=0.9)
    assert (probs.gather(1, tokens.view(-1, 1)) > 0).all()


# The CUDA ops on shapes that end inside a vector or a block (odd widths, vocabularies not a multiple of
# the block), with residuals and per-row parameters: what memcheck must see run without an error.
_SANITIZED = """
import torch
from fuselm import native
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for rows, cols in ((1, 1), (3, 577), (5, 4099), (2, 16385)):
        x = torch.randn(rows, cols, device="cuda", dtype=dtype)
        w = torch.randn(cols, device="cuda", dtype=dtype)
        native.rms_norm(x, w, residual=x)
        native.rms_norm(x.t().contiguous().t(), w.float())  # column-strided x, float32 weight
        native.layer_norm(x, w, w, residual=x)
    for rows, vocab in ((1, 7), (3, 32001), (2, 131073)):
        logits = torch.randn(rows, vocab, device="cuda", dtype=dtype)
        native.sample(logits, temperature=0.7, top_k=40, top_p=0.9, min_p=0.01)
        native.sample(logits, temperature=torch.full((rows,), 0.5, device="cuda"), top_k=0, top_p=1.0)
torch.cuda.synchronize()
"""


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() or shutil.which("compute-sanitizer") is None,
                    reason="needs a CUDA device and compute-sanitizer")
def test_cuda_ops_pass_compute_sanitizer_memcheck(fuselm_ops):
    """No out-of-bounds or misaligned access and no leak in the CUDA norms and sampler."""
    out = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", "--leak-check", "full",
                          sys.executable, "-c", _SANITIZED], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0 and "ERROR SUMMARY: 0 errors" in out.stdout, out.stdout[-4000:] + out.stderr[-2000:]
