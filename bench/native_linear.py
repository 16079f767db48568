"""Decode-sized linear layers on the CPU: fuselm.native.linear against torch's F.linear.

Decode reads every weight once per token, so the matrix-vector product sets the
decode speed. Shapes are SmolLM2-135M's (hidden 576, intermediate 1536, vocab
49152) and a 1B model's (hidden 2048, intermediate 8192, vocab 128256), at
M = 1, 4, 16 rows of x, float32 and bfloat16. Each output is checked against
x.float() @ w.float().T before it is timed.

    bytes = N*K*e + M*K*e + M*N*e   (weight, x, y; the weight is nearly all of it)
    GB/s = bytes / median time; "% read" = GB/s / the read bandwidth measured in the same run
    (common.read_bandwidth over a buffer the size of the rotating weight copies);
    "vs torch" = F.linear's median time / native's

Every call reads a different copy of the weight, at least 4x the L3 in all
(common.stream_bytes: 128 MiB for a 32 MiB L3), so the weight comes from memory
as in a real decode step.
The machine may be shared: the providers alternate in rounds of timed calls,
the reported figures are the medians over rounds, and the load average is
printed at the start and end.

    python -m bench.native_linear               # the shapes above
    python -m bench.native_linear --threads 1   # one core each (steadier on a shared machine)
    python -m bench.native_linear --quick       # tiny sizes, seconds
"""
import argparse
import math
import os
import statistics

import torch
import torch.nn.functional as F

from . import common
from fuselm import native

SHAPES = {  # name -> (K, N): y [M, N] = x [M, K] @ w[N, K].T
    "smollm2 qkv": (576, 960), "smollm2 o": (576, 576), "smollm2 gate_up": (576, 3072),
    "smollm2 down": (1536, 576), "smollm2 lm_head": (576, 49152),
    "1b o": (2048, 2048), "1b gate_up": (2048, 16384), "1b down": (8192, 2048), "1b lm_head": (2048, 128256),
}
QUICK_SHAPES = {"tiny": (64, 96), "odd": (100, 33)}
ROUNDS = 5              # alternations of the two providers
PROVIDERS = {"torch": F.linear, "native": native.linear}


def case(K, N, M, dtype, reps, quick):
    g = torch.Generator().manual_seed(K * N + M)
    e = torch.finfo(dtype).bits // 8
    copies = 1 if quick else max(1, math.ceil(common.stream_bytes("cpu") / (N * K * e)))  # 4x L3 of copies
    weights = [torch.randn(N, K, generator=g).to(dtype) for _ in range(copies)]
    x = torch.randn(M, K, generator=g).to(dtype)
    expected = x.float() @ weights[0].float().T
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    common.check_close("native linear", native.linear(x, weights[0]), expected, atol=tol * math.sqrt(K), rtol=tol)
    if reps is None:  # ~0.3 s per provider and round at ~10 GB/s, within [4, 100] calls
        reps = max(4, min(100, int(0.3 * 10e9 / (N * K * e))))
    rounds = {name: [] for name in PROVIDERS}
    for _ in range(1 if quick else ROUNDS):
        for name, fn in PROVIDERS.items():
            rounds[name].append(common.timeit(common.rotating(fn, x, weights), "cpu", reps=reps, warmup=2))
    times = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in rounds.items()}
    return N * K * e + M * K * e + M * N * e, times


def main(argv=None):
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--threads", type=int, default=None, help="torch threads for both providers (default: torch's)")
    known, rest = extra.parse_known_args(argv)
    args = common.parse_args(__doc__.splitlines()[0], rest)
    args.device = "cpu"  # the op is CPU-only
    if known.threads:
        torch.set_num_threads(known.threads)
    shapes, ms, dtypes = (QUICK_SHAPES, (1, 4), (torch.float32, torch.bfloat16)) if args.quick else \
        (SHAPES, (1, 4, 16), (torch.float32, torch.bfloat16))
    native.build()
    load_start = os.getloadavg()
    working_set = common.stream_bytes("cpu")
    read = common.read_bandwidth(working_set, "cpu")
    print(f"{common.header('cpu')}; read bandwidth {read:.1f} GB/s (over {working_set >> 20} MiB), "
          f"load average {load_start[0]:.2f} (1 min) {load_start[1]:.2f} (5 min) at start")
    rows = []
    for dtype in dtypes:
        for name, (K, N) in shapes.items():
            for M in ms:
                bytes_moved, times = case(K, N, M, dtype, args.reps, args.quick)
                for provider in PROVIDERS:
                    t = times[provider]
                    gbps = bytes_moved / t["median_ms"] / 1e6
                    rows.append({"shape": name, "K": K, "N": N, "M": M, "dtype": str(dtype).replace("torch.", ""),
                                 "provider": provider, **t, "GB/s": gbps, "% read": 100 * gbps / read,
                                 "vs torch": times["torch"]["median_ms"] / t["median_ms"]})
                print(f"  {name} {rows[-1]['dtype']} M={M}: native x{rows[-1]['vs torch']:.2f}", flush=True)
    load_end = os.getloadavg()
    common.print_table(rows, ["shape", "K", "N", "M", "dtype", "provider", "median_ms", "p20_ms", "p80_ms", "GB/s",
                              "% read", "vs torch"])
    print(f"load average {load_end[0]:.2f} (1 min) {load_end[1]:.2f} (5 min) at end")
    summary = {}
    for dtype in dtypes:
        for M in ms:
            rs = [r["vs torch"] for r in rows if r["provider"] == "native" and r["M"] == M
                  and r["dtype"] == str(dtype).replace("torch.", "")]
            summary[f"{dtype} M={M}"] = {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}
            print(f"native vs torch, {str(dtype).replace('torch.', '')} M={M}: median x{statistics.median(rs):.2f}, "
                  f"min x{min(rs):.2f}, max x{max(rs):.2f} over {len(rs)} shapes")
    if not args.quick:  # SmolLM2-135M: 30 layers of qkv, o, gate_up, down, then the lm_head
        for dtype in dtypes:
            per_token = {p: sum(r["median_ms"] * (1 if r["shape"] == "smollm2 lm_head" else 30) for r in rows
                                if r["provider"] == p and r["M"] == 1 and r["shape"].startswith("smollm2")
                                and r["dtype"] == str(dtype).replace("torch.", "")) for p in PROVIDERS}
            summary[f"smollm2 decode {dtype}"] = per_token
            print(f"SmolLM2-135M decode, linear layers at M=1, {str(dtype).replace('torch.', '')}: "
                  + ", ".join(f"{p} {ms:.1f} ms/token" for p, ms in per_token.items()))
    name = "native_linear" + (f"_threads{known.threads}" if known.threads else "")
    path = common.save(name, args, rows, extra={
        "read_bandwidth_GBps": read, "read_bandwidth_buffer_bytes": working_set,
        "loadavg_start": load_start, "loadavg_end": load_end,
        "summary": summary})
    print(f"saved {path}")
    return rows


if __name__ == "__main__":
    main()
