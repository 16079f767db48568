"""auto's measured choice between the native CPU GEMV and torch's F.linear for dense weights.

Which one is faster depends on the machine: on one 2-core AMD EPYC the native GEMV streamed
SmolLM2's float32 lm_head faster than MKL, on an Intel Xeon slower (2026-12-01). So for each
dense (dtype, N, K) and number of rows in one of the decode buckets, both run on weights of that
shape streamed from memory (as in decode: copies cycled through a buffer of twice the L3 size,
at least 64 MiB) in alternating rounds, and the faster one is kept for the rest of the process;
ties go to torch. Model.load measures its matrices for one row (decode's first bucket) so the
first generate does not; other buckets are measured when first met. A quantized weight needs no
choice: only native multiplies it.
"""
import logging
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

from . import memory

log = logging.getLogger("fuselm")

_BUCKETS = (1, 4, 16, 32)      # rows of x measured: the first bucket >= M stands for M
_MAX_ROWS = _BUCKETS[-1]       # past it the native op calls torch's GEMM itself
_STREAM_BYTES = max(64 << 20, 2 * (memory.l3_bytes() or 0))  # weights cycled per round: from memory
_MAX_COPIES = 512              # (tiny weights: a few MiB, in cache, as a tiny model's decode is)
_ROUNDS = 5
_choices = {}                  # (dtype, N, K, bucket) -> "native" | "torch"


def linear_backend(x, weight):
    """"native" or "torch" for x @ weight.T on the CPU, measured once per shape and row bucket."""
    rows = x.numel() // max(1, x.shape[-1])
    if rows > _MAX_ROWS or os.environ.get("FUSELM_TUNING") == "0":
        return "torch"
    bucket = next(b for b in _BUCKETS if b >= rows)
    key = (weight.dtype, weight.shape[0], weight.shape[1], bucket)
    if key not in _choices:
        with _disable_current_modes(), torch.inference_mode():  # not part of a recorded decode step
            _choices[key] = _measure(*key)
    return _choices[key]


def prepare(weights):
    """Measure the dense matrices of a model (a dict of tensors) for one row of x, as decode will."""
    for w in {id(w): w for w in weights.values()}.values():
        if isinstance(w, torch.Tensor) and w.dim() == 2 and w.device.type == "cpu":
            linear_backend(w.new_empty(1, w.shape[1]), w)


def _measure(dtype, N, K, M):
    from . import native
    copies = max(1, min(_MAX_COPIES, _STREAM_BYTES // (N * K * dtype.itemsize)))
    buf = torch.zeros(copies, N, K, dtype=dtype)
    x = torch.randn(M, K).to(dtype)
    runs = {"native": lambda w: native.linear(x, w), "torch": lambda w: F.linear(x, w)}
    times = {name: [] for name in runs}
    for _ in range(_ROUNDS):
        for name, run in runs.items():
            t0 = time.perf_counter()
            for i in range(copies):
                run(buf[i])
            times[name].append((time.perf_counter() - t0) / copies)
    best = {name: statistics.median(t) for name, t in times.items()}
    choice = "native" if best["native"] < best["torch"] else "torch"
    gbps = {name: N * K * dtype.itemsize / t / 1e9 for name, t in best.items()}
    log.info("fuselm: linear [%d, %d] %s, %d row(s): native %.1f GB/s, torch %.1f GB/s -> %s", N, K,
             str(dtype)[6:], M, gbps["native"], gbps["torch"], choice)
    return choice
