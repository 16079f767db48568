"""Shared benchmark harness: timing, device limits, result tables.

Every op benchmark checks correctness against runtime/reference.py before it
times anything, reports medians with p20/p80, and derives GB/s or TFLOP/s from
a byte/FLOP formula written next to the call, plus ratios to the baselines
measured in the same run. On CUDA the timer is CUDA events around each call;
on the CPU it is perf_counter.

Limits: copy_bandwidth (read + written) and read_bandwidth are measured over
buffers at least as big as the data the kernel streams (stream_bytes: 4x the
CPU's L3), never over one that fits the cache. Every result names the device
(on the CPU its model name from /proc/cpuinfo) and the date.
"""
import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

def _results_root():
    """bench/results in a source checkout (beside this file), else ./fuselm-bench in the working directory
    (an installed package: `pip install fuselm` then `fuselm bench`)."""
    here = Path(__file__).resolve().parent
    if (here.parent / "pyproject.toml").is_file() and (here.parent / "runtime").is_dir():
        return here / "results"
    return Path.cwd() / "fuselm-bench"


RESULTS = _results_root()


def parse_args(description, argv=None, extra=None):
    """The common benchmark options; `extra(parser)` adds a script's own."""
    p = argparse.ArgumentParser(description=description)
    if extra:
        extra(p)
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per case")
    p.add_argument("--out", default=None, help="directory for the JSON result (default bench/results/<device>)")
    return p.parse_args(argv)


def cpu_name():
    """The CPU's model name ("model name" in /proc/cpuinfo, e.g. "AMD EPYC"), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def header(device):
    """The first line a benchmark prints: the device (the CPU model on the CPU), date, torch, threads."""
    host = f" (host CPU {cpu_name()})" if torch.device(device).type == "cuda" else ""
    return (f"{device_name(device)}{host}, {datetime.date.today().isoformat()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads")


def device_slug(device):
    return slug(device_name(device))


def slug(name):
    """A device name as a folder name: "NVIDIA H200" -> "nvidia-h200"."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def implementations(backend, op_names, device, quick, notes):
    """{op: fuselm's implementation with `backend`} for the ops named, or None, with a note saying why,
    when they cannot be timed here. Triton runs on CPU tensors only under its interpreter, and only
    with --quick: interpreted timings say nothing about GPUs."""
    from fuselm import ops
    if backend == "triton" and torch.device(device).type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            notes.append("triton: needs CUDA; set TRITON_INTERPRET=1 with --quick to run it under the interpreter")
            return None
        if not quick:
            notes.append("triton: the interpreter runs only with --quick (its timings say nothing about GPUs)")
            return None
    try:
        return {op: ops.implementation(op, backend, torch.device(device)) for op in op_names}
    except (RuntimeError, ValueError) as e:
        notes.append(f"{backend}: not available ({e})")
        return None


def run_or_drop(fns, name, call, notes, what=""):
    """call() for provider `name`. The native extension may fail to build or run on a machine: then
    the failure is noted, `name` leaves fns and None is returned; any other provider's error is raised."""
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - an extension that fails to build is reported, not fatal
        if name != "native":
            raise
        notes.append(f"native: {what}failed to run ({type(e).__name__}: {e})")
        del fns[name]
        return None


def summarize(values, unit="ms"):
    """{"median_<unit>", "p20_<unit>", "p80_<unit>"} of a few measurements (inclusive quantiles: they
    stay within the measured range when there are only a handful)."""
    values = list(values)
    q = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else [values[0]] * 9
    return {f"median_{unit}": statistics.median(values), f"p20_{unit}": q[1], f"p80_{unit}": q[7]}


def timeit(fn, device, reps=None, warmup=3):
    """Run fn() repeatedly; return {"median_ms", "p20_ms", "p80_ms"}."""
    device = torch.device(device)
    reps = reps or (50 if device.type == "cuda" else 5)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times)


def rotating(fn, x, weights):
    """fn(x, w) with the next weight copy on each call (copies larger than the caches together)."""
    it = itertools.cycle(weights)
    return lambda: fn(x, next(it))


_limits = {}


from fuselm.memory import l3_bytes  # noqa: E402  (re-exported: the benchmarks size buffers by it)


def stream_bytes(device):
    """Bytes an op benchmark streams so its data comes from memory, not cache: on the CPU 4x the L3
    (256 MiB when it is unknown; a 32 MiB buffer fits a 32 MiB L3 and measures the cache), on CUDA 256 MiB."""
    if torch.device(device).type == "cuda":
        return 1 << 28
    l3 = l3_bytes()
    return 4 * l3 if l3 else 1 << 28


def copy_bandwidth(device, nbytes=None):
    """Measured copy bandwidth in GB/s (bytes read + written) over buffers of nbytes each (default
    stream_bytes(device)), cached per device and size."""
    device = torch.device(device)
    n = int(nbytes or stream_bytes(device))
    if ("copy", device, n) not in _limits:
        src = torch.empty(n, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        t = timeit(lambda: dst.copy_(src), device, reps=10 if device.type == "cpu" else 20)
        _limits[("copy", device, n)] = 2 * n / t["median_ms"] / 1e6
        del src, dst
    return _limits[("copy", device, n)]


def read_bandwidth(nbytes, device, cached=True):
    """Measured memory READ bandwidth in GB/s over a buffer of nbytes: what a decode step, which reads
    each weight once, can reach at best. CPU: torch.sum over a float32 buffer of nbytes (bytes =
    nbytes, the buffer read once; the result is 4 bytes) with the current torch thread count, median
    of 10 runs after 3 warm-ups, cached per size and thread count unless cached=False (a shared
    machine: measure it again in each round); size it to the data the kernel streams. CUDA: the copy
    bandwidth (read + written) over buffers of at least 256 MiB, as before."""
    device = torch.device(device)
    if device.type == "cuda":
        return copy_bandwidth(device, max(int(nbytes), 1 << 28))
    key = ("read", device, int(nbytes), torch.get_num_threads())
    if key not in _limits or not cached:
        buf = torch.ones(max(1, int(nbytes) // 4), dtype=torch.float32)
        t = timeit(lambda: buf.sum(), device, reps=10, warmup=3)
        _limits[key] = buf.numel() * 4 / t["median_ms"] / 1e6
        del buf
    return _limits[key]


def matmul_peak(device, dtype=torch.bfloat16):
    """Measured dense matmul TFLOP/s for `dtype`, cached per device."""
    device = torch.device(device)
    if ("mm", device, dtype) not in _limits:
        n = 8192 if device.type == "cuda" else 1024
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = timeit(lambda: a @ b, device, reps=10)
        _limits[("mm", device, dtype)] = 2 * n ** 3 / t["median_ms"] / 1e9
    return _limits[("mm", device, dtype)]


def bandwidth_rows(case, times, bytes_moved, device, baselines):
    """One row per provider: case keys, timings, GB/s (bytes_moved / median time), % of copy
    bandwidth, and the speed ratio to each baseline measured in the same run."""
    copy = copy_bandwidth(device)
    rows = []
    for name, t in times.items():
        gbps = bytes_moved / t["median_ms"] / 1e6
        row = {**case, "provider": name, **t, "GB/s": gbps, "% copy": 100 * gbps / copy}
        for base in baselines:
            if base in times:
                row[f"vs {base}"] = times[base]["median_ms"] / t["median_ms"]
        rows.append(row)
    return rows


def check_close(name, out, expected, atol, rtol):
    """Correctness gate before timing: raises with the worst error if out is off."""
    out, expected = out.float(), expected.float()
    if not torch.allclose(out, expected, atol=atol, rtol=rtol, equal_nan=True):
        err = (out - expected).abs().nan_to_num(nan=float("inf")).max().item()
        raise AssertionError(f"{name}: result differs from the reference (max abs error {err:.3g})")


def fmt_row(cells, widths):
    return " | ".join(str(c).rjust(w) for c, w in zip(cells, widths))


def print_table(rows, columns):
    """Print rows (dicts) as an aligned table with the given column keys."""
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print(fmt_row(columns, widths))
    print("-+-".join("-" * w for w in widths))
    for row in cells:
        print(fmt_row(row, widths))


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def results_dir(args):
    """RESULTS/<device>, or <device>-quick for tiny-size runs (git ignores those)."""
    return RESULTS / (device_slug(args.device) + ("-quick" if args.quick else ""))


def save(name, args, rows, extra=None):
    """Write bench/results/<device>[-quick]/<name>.json (or args.out) and return its path."""
    out = Path(args.out) if args.out else results_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "device": device_name(args.device),
        "cpu": cpu_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quick": bool(args.quick),
        "copy_bandwidth_GBps": copy_bandwidth(args.device),
        "copy_bandwidth_buffer_bytes": stream_bytes(args.device),
        "rows": rows,
        **(extra or {}),
    }
    path = out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1))
    return path

