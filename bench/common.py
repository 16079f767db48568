"""Shared benchmark harness: timing, device limits, result tables.

Every op benchmark checks correctness against runtime/reference.py before it
times anything, reports medians with p20/p80, and derives GB/s or TFLOP/s from
a byte/FLOP formula written next to the call, plus ratios to the baselines
measured in the same run. On CUDA the timer is CUDA events around each call;
on the CPU it is perf_counter.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


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


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def device_slug(device):
    return "".join(c if c.isalnum() else "-" for c in device_name(device).lower()).strip("-")


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
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7]}


_limits = {}


def copy_bandwidth(device):
    """Measured device copy bandwidth in GB/s (bytes read + written), cached per device."""
    device = torch.device(device)
    if ("copy", device) not in _limits:
        n = (1 << 28) if device.type == "cuda" else (1 << 25)  # bytes per buffer
        src = torch.empty(n, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        t = timeit(lambda: dst.copy_(src), device, reps=20)
        _limits[("copy", device)] = 2 * n / t["median_ms"] / 1e6
    return _limits[("copy", device)]


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
    """bench/results/<device>, or <device>-quick for tiny-size runs (git ignores those)."""
    return RESULTS / (device_slug(args.device) + ("-quick" if args.quick else ""))


def save(name, args, rows, extra=None):
    """Write bench/results/<device>[-quick]/<name>.json (or args.out) and return its path."""
    out = Path(args.out) if args.out else results_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "device": device_name(args.device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "quick": bool(args.quick),
        "copy_bandwidth_GBps": copy_bandwidth(args.device),
        "rows": rows,
        **(extra or {}),
    }
    path = out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1))
    return path

