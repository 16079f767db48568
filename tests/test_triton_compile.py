"""Every Triton kernel of fuselm compiles for sm_80 and sm_90, without register spills.

The interpreter that runs the kernel tests on a CPU never compiles a kernel,
so type errors, ops or layouts the GPU backend rejects, shared memory beyond
the GPU's limit and register spills would only show on a GPU. Here
tests/triton_aot.py compiles each kernel ahead of time for each target with
the ptxas bundled with triton, exactly as its launcher would launch it there
(see that file). It runs in subprocesses with TRITON_INTERPRET unset (conftest
sets it on machines without a GPU): one worker per core, each taking every
N-th compilation.

The "ci" hypothesis profile compiles a subset (every kernel, fp32 and bf16,
head dim 80, causal attention, dense and paged caches of 16-key blocks);
FUSELM_HYPOTHESIS_PROFILE=thorough compiles the whole matrix (fp16 too, head
dims 64-256, non-causal attention, block sizes 1, 5 and 16, more widths, head
groups and batch shapes).
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARCHS = (80, 90)
MODULES = ("norm", "attention", "decode", "sampling", "quant")
FULL = os.environ.get("FUSELM_HYPOTHESIS_PROFILE", "ci") == "thorough"
AOT = Path(__file__).resolve().with_name("triton_aot.py")
TIMEOUT_S = 3600 if FULL else 900  # a hung compiler fails the test instead of the CI job


def _cannot_compile_for_cuda():
    """Why triton cannot compile for CUDA on this machine, or None."""
    import triton
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        for arch in ARCHS:
            get_ptxas(arch).path
        triton.knobs.nvidia.cuobjdump.path
    except (ImportError, RuntimeError) as e:  # no nvidia backend; ptxas or cuobjdump not found
        return f"triton cannot compile for CUDA here: {type(e).__name__}: {e}"
    return None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Records of every compilation (fields: see tests/triton_aot.py), from all workers."""
    why = _cannot_compile_for_cuda()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("triton_aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(AOT), "--arch", ",".join(map(str, ARCHS))] + ["--full"] * FULL
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = min(cores, 8)
    workers = []
    for i in range(n):
        with open(out / f"{i}.log", "w") as log:  # a file, not a pipe: a ptxas error prints the whole PTX
            workers.append(subprocess.Popen(cmd + ["--shard", f"{i}/{n}", "--out", str(out / f"{i}.json")],
                                            cwd=AOT.parent.parent, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    records = []
    try:
        for i, worker in enumerate(workers):
            try:
                rc = worker.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"triton_aot.py did not finish in {TIMEOUT_S} s; worker logs in {out}")
            if rc != 0:
                pytest.fail(f"triton_aot.py worker {i} exited with {rc}:\n{(out / f'{i}.log').read_text()[-3000:]}")
            records += json.loads((out / f"{i}.json").read_text())
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    return records


def _problem(r):
    """What is wrong with one compilation record, or None."""
    if r["error"]:
        return f"does not compile: {r['error']}"
    if r["stack"]:
        return f"spills registers: {r['stack']} bytes of stack per thread at {r['regs']} registers"
    if r["shared"] > r["max_shared"]:
        return f"needs {r['shared']} bytes of shared memory per block, the target allows {r['max_shared']}"
    return None


def test_every_kernel_is_compiled(compiled):
    """Each @triton.jit `*_kernel` in fuselm.kernels is compiled for every target (a new one needs a case)."""
    import importlib

    from triton.runtime.jit import KernelInterface
    kernels = {(m, name) for m in MODULES for name, obj in vars(importlib.import_module(f"fuselm.kernels.{m}")).items()
               if isinstance(obj, KernelInterface) and name.endswith("_kernel")}
    assert kernels, "no kernels found in fuselm.kernels"
    done = {(r["arch"], r["module"], r["kernel"]) for r in compiled}
    missing = sorted((arch, m, k) for arch in ARCHS for m, k in kernels if (arch, m, k) not in done)
    assert not missing, f"kernels with no case in tests/triton_aot.py (arch, module, kernel): {missing}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", MODULES)
def test_compiles_without_spills(compiled, module, arch):
    records = [r for r in compiled if r["module"] == module and r["arch"] == arch]
    assert records, f"no compilation of fuselm.kernels.{module} for sm_{arch}"
    problems = [f"{r['kernel']} ({r['case']}; {r['config']}): {_problem(r)}" for r in records if _problem(r)]
    assert not problems, f"fuselm.kernels.{module} on sm_{arch}:\n" + "\n".join(problems)
