"""Compile fuselm's Triton kernels for real GPU targets on a machine without a GPU.

    python tests/triton_aot.py --arch 80,90 [--full] [--shard I/N] --out results.json

Run with TRITON_INTERPRET unset (tests/test_triton_compile.py starts it in a
subprocess, because its conftest turns the interpreter on): the kernel modules
then take their GPU paths (tile sizes, warps, stages, autotuned configs).

How. Each launcher in fuselm.kernels runs on small CPU tensors of the shapes
listed below, with every `kernel[grid](...)` launch recorded instead of run,
and with the questions the launchers ask the CUDA runtime (current device, SM
count, CUDA split plan) answered for the target GPU. Each recorded launch is
then compiled through the kernel's own warmup path (an autotuned kernel: once
per config its pruning keeps) under a stand-in triton driver that reports the
target. So the signature, the specialisation of every argument (pointer
alignment, integers equal to 1 or divisible by 16) and the constexprs are the
ones a launch on that GPU compiles; nothing is copied from the launchers.
The cuobjdump bundled with triton then reads each cubin's registers and stack
frame: triton kernels call no functions and keep no local arrays, so a stack
frame holds register spills only.

Output: a JSON list with one record per (target, launch, config): arch, module,
kernel, case, config, error (null when it compiled), regs, stack (bytes of
spills per thread), shared (bytes the launch needs), max_shared (the target's
limit per block) and seconds.
"""
import argparse
import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.runtime.jit import KernelInterface

from fuselm import quant as formats
from fuselm.kernels import attention, decode, norm, quant, sampling


@dataclass(frozen=True)
class Gpu:
    sms: int         # streaming multiprocessors (decode's split plan counts them)
    max_shared: int  # bytes of shared memory one block may opt in to


GPUS = {80: Gpu(sms=108, max_shared=166912),   # A100
        90: Gpu(sms=132, max_shared=232448)}   # H100 SXM
# the CI subset runs every kernel in fp32 (its own tiles, exact-fp32 dots) and bf16 at one head
# dim that is not a power of two; --full runs the whole matrix
DTYPES = {False: (torch.float32, torch.bfloat16), True: (torch.float32, torch.float16, torch.bfloat16)}
HEAD_DIMS = {False: (80,), True: (64, 80, 96, 128, 256)}
# paged KV pools: the engine's block size; --full adds one key per block and an odd size
PAGE_SIZES = {False: (16,), True: (1, 5, 16)}


def _dt(dtype):
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# The cases: (label, launcher call), for the CI subset or the full matrix
# ---------------------------------------------------------------------------------------------

def norm_cases(full):
    # widest single-pass row (the most registers), first chunked width (unaligned), aligned widths
    widths = (norm.MAX_BLOCK_SIZE, norm.MAX_BLOCK_SIZE + 1)
    if full:
        widths += (1000, 4096, 4 * norm.MAX_BLOCK_SIZE)
    for dtype in DTYPES[full]:
        for n in widths:
            x = torch.empty(2, n, dtype=dtype)                            # [M, N]
            r, w, b = torch.empty_like(x), torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
            case = f"{_dt(dtype)} x[2, {n}]"
            yield f"rms_norm {case}", functools.partial(norm.rms_norm, x, w)
            yield f"rms_norm {case} residual", functools.partial(norm.rms_norm, x, w, residual=r)
            for bias in (None, b):
                for residual in (None, r):
                    extra = " bias" * (bias is not None) + " residual" * (residual is not None)
                    yield f"layer_norm {case}{extra}", functools.partial(norm.layer_norm, x, w, bias, residual=residual)


def attention_cases(full):
    # 1024 query rows: the autotuner's pruning keeps every tile of the head dim. The CI subset
    # compiles causal attention only (a language model's prefill), with and without padding, dense
    # and paged.
    for dtype in DTYPES[full]:
        for d in HEAD_DIMS[full]:
            q = torch.empty(1, 512, 2, d, dtype=dtype)                   # [B, Sq, Hq, D]
            kv = torch.empty(1, 512, 1, d, dtype=dtype)                  # [B, Sk, Hkv, D]
            for causal in (True, False) if full else (True,):
                for kv_start in (None, torch.empty(1, dtype=torch.int32)):  # [B] left padding
                    case = f"attention {_dt(dtype)} q[1, 512, 2, {d}] causal={causal}"
                    yield (case + " kv_start" * (kv_start is not None),
                           functools.partial(attention.attention, q, kv, kv, causal=causal, kv_start=kv_start))
                for page in PAGE_SIZES[full]:  # the same 512 keys through a block table
                    pool = torch.empty(64, page, 1, d, dtype=dtype)          # [blocks, page, Hkv, D]
                    table = torch.empty(1, triton.cdiv(512, page), dtype=torch.int32)  # [B, M]
                    yield (f"paged_attention {_dt(dtype)} q[1, 512, 2, {d}] pool[64, {page}, 1, {d}] "
                           f"table{list(table.shape)} causal={causal}",
                           functools.partial(attention.paged_attention, q, pool, pool, table,
                                             torch.empty(1, dtype=torch.int32), causal=causal))


def decode_cases(full):
    # Smax 128: one split (the split kernel writes the output); 32768: many splits and the combine;
    # each dense and as a paged pool of as many positions
    for dtype in DTYPES[full]:
        for d in HEAD_DIMS[full]:
            for group in (1, 8, 32) if full else (4,):
                for smax in (128, 32768):
                    q = torch.empty(1, group, d, dtype=dtype)            # [B, Hq, D]
                    cache = torch.empty(1, smax, 1, d, dtype=dtype)      # [B, Smax, Hkv, D]
                    seqlens = torch.empty(1, dtype=torch.int32)
                    case = f"decode_attention {_dt(dtype)} q[1, {group}, {d}] cache[1, {smax}, 1, {d}]"
                    for kv_start in (None, torch.empty(1, dtype=torch.int32)):  # [B] left padding
                        yield (case + " kv_start" * (kv_start is not None),
                               functools.partial(decode.decode_attention, q, cache, cache, seqlens, kv_start=kv_start))
                    for page in PAGE_SIZES[full]:  # the same positions through a block table
                        pool = torch.empty(64, page, 1, d, dtype=dtype)      # [blocks, page, Hkv, D]
                        table = torch.empty(1, triton.cdiv(smax, page), dtype=torch.int32)  # [B, M]
                        yield (f"paged_decode_attention {_dt(dtype)} q[1, {group}, {d}] pool[64, {page}, 1, {d}] "
                               f"table{list(table.shape)}",
                               functools.partial(decode.paged_decode_attention, q, pool, pool, table, seqlens))


def sampling_cases(full):
    # a real vocabulary (one row per program) and a tiny one (several rows per program);
    # parameters as numbers and as per-row tensors; batch 1 (n_rows specialised to 1) and 4
    for dtype in DTYPES[full]:
        for batch, vocab in ((1, 49152), (4, 49152), (4, 100)) if full else ((1, 49152), (4, 100)):
            logits = torch.empty(batch, vocab, dtype=dtype)              # [B, V]
            params = dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05)
            rows = {k: torch.full((batch,), v) for k, v in params.items()}
            case = f"sample {_dt(dtype)} logits[{batch}, {vocab}]"
            yield f"{case} scalar params", functools.partial(sampling.sample, logits, **params)
            yield f"{case} per-row params", functools.partial(sampling.sample, logits, **rows)


def quant_cases(full):
    # a 4096 x 4096 weight (many splits at decode); the CI subset: every format in bf16 at one decode
    # row, the prefill tile in bf16 for a 32- and a 256-block format, fp32's own tiles for one format
    shapes = (4096, 4096)
    cases = [(fmt, dtype, m) for fmt in formats.FORMATS for dtype in DTYPES[full] for m in (1, 16, 256)] if full else (
        [(fmt, torch.bfloat16, 1) for fmt in formats.FORMATS]
        + [("Q8_0", torch.bfloat16, 256), ("Q4_K", torch.bfloat16, 256), ("Q4_0", torch.float32, 1),
           ("Q4_0", torch.float32, 256)])
    for fmt, dtype, m in cases:
        f = formats.FORMATS[fmt]
        raw = torch.zeros(shapes[0], f.row_bytes(shapes[1]), dtype=torch.uint8)
        w = formats.QuantizedTensor(fmt, shapes, raw, name=fmt).pack_planes()
        x = torch.empty(m, shapes[1], dtype=dtype)
        yield f"linear {fmt} {_dt(dtype)} x[{m}, {shapes[1]}] w{list(shapes)}", functools.partial(quant.linear, x, w)


CASES = {"norm": norm_cases, "attention": attention_cases, "decode": decode_cases, "sampling": sampling_cases,
         "quant": quant_cases}


# ---------------------------------------------------------------------------------------------
# Recording launches as a launch on the target GPU would make them
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def recording(gpu, launches):
    """Launches append (kernel, grid, args, kwargs) to `launches`; CUDA questions get gpu's answers."""
    cuda_plan, quant_plan = decode.split_plan, quant.plan

    def record(kernel, grid):
        return lambda *args, **kwargs: launches.append((kernel, grid, args, kwargs))

    with mock.patch.object(KernelInterface, "__getitem__", record), \
         mock.patch.object(torch.cuda, "device", lambda device: contextlib.nullcontext()), \
         mock.patch.object(decode, "split_plan", lambda smax, d, device: cuda_plan(smax, d, torch.device("cuda"))), \
         mock.patch.object(decode, "_sm_count", lambda device: gpu.sms), \
         mock.patch.object(quant, "_sm_count", lambda device: gpu.sms), \
         mock.patch.object(quant, "plan", lambda m, n, k, dt, device: quant_plan(m, n, k, dt, torch.device("cuda"))):
        yield


class TargetDriver:
    """What triton's warmup path asks of its driver, answered for a GPU that is not here."""

    def __init__(self, arch):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # one kernel cache per target

    def get_current_stream(self, device):
        return 0


def units(arch, full):
    """[(module, label, jit fn, args, kwargs)]: every compilation of every case, for one target."""
    out = []
    for module, cases in CASES.items():
        for label, launcher in cases(full):
            launches = []
            with recording(GPUS[arch], launches):
                launcher()
            for kernel, grid, args, kwargs in launches:
                kwargs = dict(kwargs, grid=grid)
                if isinstance(kernel, Autotuner):  # each config its pruning keeps, as Autotuner.warmup does
                    kernel.nargs = dict(zip(kernel.arg_names, args))
                    configs = kernel.prune_configs(kwargs)
                    kernel.nargs = None
                    out += [(module, label, kernel.fn, args, {**kwargs, **c.all_kwargs()}) for c in configs]
                else:
                    out.append((module, label, kernel, args, kwargs))
    return out


def describe(fn, args, kwargs):
    """The constexprs and launch options of one compilation, e.g. 'BLOCK_D=128 num_warps=8'."""
    values = dict(zip(fn.arg_names, args)) | kwargs
    parts = [f"{fn.arg_names[i]}={values[fn.arg_names[i]]}" for i in fn.constexprs]
    return " ".join(parts + [f"{k}={kwargs[k]}" for k in ("num_warps", "num_stages") if k in kwargs])


def resources(cubin):
    """(registers, stack frame bytes) per thread of a cubin, read by the bundled cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return int(regs), int(stack)


def compile_one(arch, module, label, fn, args, kwargs):
    record = dict(arch=arch, module=module, kernel=fn.__name__, case=label, config=describe(fn, args, kwargs),
                  error=None, regs=None, stack=None, shared=None, max_shared=GPUS[arch].max_shared)
    start = time.perf_counter()
    try:
        compiled = fn.warmup(*args, **kwargs)
        record.update(shared=compiled.metadata.shared)
        record["regs"], record["stack"] = resources(compiled.asm["cubin"])
    except Exception as e:  # a compile error is the finding: report it and go on
        record["error"] = f"{type(e).__name__}: {e}"[:4000]
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="80,90", help="compute capabilities, e.g. 80,90")
    parser.add_argument("--full", action="store_true", help="the whole matrix (else the CI subset)")
    parser.add_argument("--shard", default="0/1", help="I/N: compile every N-th compilation, from the I-th")
    parser.add_argument("--out", required=True, help="where to write the JSON records")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("triton_aot.py compiles for GPUs: run it with TRITON_INTERPRET unset")
    shard, n_shards = map(int, args.shard.split("/"))
    results = []
    for arch in map(int, args.arch.split(",")):
        driver.set_active(TargetDriver(arch))
        for i, unit in enumerate(units(arch, args.full)):
            if i % n_shards == shard:
                r = compile_one(arch, *unit)
                results.append(r)
                print(f"sm_{arch} {r['kernel']} {r['case']} | {r['config']} | {r['seconds']}s regs={r['regs']} "
                      f"stack={r['stack']} shared={r['shared']}" + (f" ERROR {r['error']}" if r["error"] else ""),
                      flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
