"""Quantized GEMV at decode sizes: each GGUF block format against a bf16 dense GEMV of the same shape.

Providers, per weight shape (K, N) and M rows of x (bfloat16, the runtime's activations on GPUs and
on CPUs with AVX512-BF16):
    Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K   fuselm.ops.linear(x, qt, backend=KERNELS) on a
        quant.QuantizedTensor packed for those kernels: "native" (CPU; csrc/quant_cpu.cpp, tiles; the
        path it takes, torch.ops.fuselm.quant_isa(), is printed) or "triton" (GPU, or the CPU through
        Triton's interpreter; fuselm/kernels/quant.py, planes). Default: triton on CUDA, else native.
    bf16 F.linear                             torch's F.linear on a dense bfloat16 weight (cuBLAS on GPUs)
    bf16 native                               fuselm.native.linear on the same dense weight (CPU only)
Weights: the legacy formats are quant.quantize of a random normal tensor (gguf's quantizers); the
K-quants are random bytes with finite float16 scale fields (Q4_K/Q5_K: d at bytes 0-1, dmin at 2-3;
Q6_K: d at bytes 208-209 of each block), scaled so the weights are O(1). K-quants need K % 256 == 0:
the shapes with K = 576 are skipped for them (and the output says so). Shapes: SmolLM2's and a
1B model's on CPUs; on GPUs hidden sizes 2048 to 8192 (1B, 8B and 70B Llama projections).

Correctness before timing: each format's output (M = 16) is checked against
fuselm.reference.linear(x, qt) (the GGUF dequantization, float32 matmul) within a loose bound:
    |y - y_ref| <= 2 * A + 2^-7 |y_ref| + 1e-6
with A the kernels' own rounding: native, sum over 32-blocks b of dx_b / 2 * sum_{k in b} |w_nk|
(dx_b = max |x_b| / 127, the int8 step the kernel quantizes x with); triton, 2^-8 sum_k |x_k w_nk|
(each weight rounded to bf16). The second term bounds the bf16 output. The dense providers are
checked against x.float() @ w.float().T.

    bytes = weight bytes + M*K*2 + M*N*2     (weight: qt.nbytes, the packed tiles or planes = the GGUF
                                              bytes (+2.8% Q4_K, +2.3% Q5_K); dense: N*K*2; x; y)
    GB/s = bytes / median time;  "% read" = GB/s / common.read_bandwidth over the rotating copies' size
    (on CUDA the copy bandwidth, read + written)
    "vs F.linear" / "vs bf16 native" = that dense provider's median time / this provider's

Every call reads a different copy of its weight, copies totalling at least 4x the L3 on CPUs and
256 MiB on GPUs (common.stream_bytes), so weights come from memory as in a decode step. The
providers alternate in rounds of timed calls (the machine may be shared); the figures are the
medians over rounds. The read bandwidth (over a buffer the size of those copies) is measured once
in every round too, and its median over all rounds is the "% read" limit.

    python -m bench.quant                 # the shapes below, M = 1, 4, 16
    python -m bench.quant --threads 1     # one core
    python -m bench.quant --formats Q4_0,Q4_K --shapes "1b o"
    python -m bench.quant --quick         # tiny sizes, seconds
    TRITON_INTERPRET=1 python -m bench.quant --quick --reps 2 --device cpu --kernels triton  # the GPU path, on a CPU
"""
import argparse
import math
import os
import statistics

import torch
import torch.nn.functional as F

from . import common
from fuselm import native, ops, quant, reference

FORMATS = list(quant.FORMATS)   # Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K
SHAPES = {  # name -> (K, N): y [M, N] = x [M, K] @ w[N, K].T
    "smollm2 qkv": (576, 960), "smollm2 o": (576, 576), "smollm2 gate_up": (576, 3072),
    "smollm2 down": (1536, 576), "smollm2 lm_head": (576, 49152),
    "1b o": (2048, 2048), "1b gate_up": (2048, 16384), "1b down": (8192, 2048),
}
CUDA_SHAPES = {
    "1b o": (2048, 2048), "1b gate_up": (2048, 16384), "1b down": (8192, 2048),
    "8b qkv": (4096, 6144), "8b gate_up": (4096, 28672), "8b down": (14336, 4096), "70b o": (8192, 8192),
}
QUICK_SHAPES = {"tiny": (256, 96), "odd rows": (512, 37)}   # K % 256 == 0 so every format runs
DENSE = ("bf16 F.linear", "bf16 native")
VS = {"bf16 F.linear": "vs F.linear", "bf16 native": "vs bf16 native"}   # each dense provider's ratio column
KERNELS = ("native", "triton")
# byte offsets of the float16 scale fields of each K-quant block, and magnitudes that keep the weights
# within about [-1.5, 1.5] (q <= 2^bits - 1, 6-bit sub-scales <= 63, Q6_K's int8 scales <= 128)
K_FIELDS = {"Q4_K": ((0, 1 / (63 * 15)), (2, 1 / 63)), "Q5_K": ((0, 1 / (63 * 31)), (2, 1 / 63)),
            "Q6_K": ((208, 1 / (128 * 32)),)}
ROUNDS = 5


def k_quant_blocks(fmt, n, g):
    """n random blocks of a K-quant (uint8 [n, type_size]) whose float16 fields are finite and O(1)-scaled."""
    f = quant.FORMATS[fmt]
    blocks = torch.randint(0, 256, (n, f.type_size), generator=g, dtype=torch.uint8)
    for at, unit in K_FIELDS[fmt]:
        sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
        v = (sign * unit * (0.25 + 0.75 * torch.rand(n, generator=g))).half()
        blocks[:, at:at + 2] = v.reshape(n, 1).view(torch.uint8)
    return blocks


def make_weight(fmt, N, K, g, kernels, device):
    """A QuantizedTensor [N, K] packed for `kernels` on `device`, keeping raw (the reference's input)."""
    f = quant.FORMATS[fmt]
    if fmt in K_FIELDS:
        raw = k_quant_blocks(fmt, N * K // f.block, g).reshape(N, f.row_bytes(K))
        qt = quant.QuantizedTensor(fmt, (N, K), raw, name=f"w.{fmt}")
    else:
        qt = quant.quantize(torch.randn(N, K, generator=g) / 2, fmt, name=f"w.{fmt}")
    return qt.pack(keep_raw=True) if kernels == "native" else qt.pack_planes(device, keep_raw=True)


def copy_of(qt):
    """Another QuantizedTensor with its own copy of qt's kernel layout (no raw)."""
    if qt.tiles is not None:
        return quant.QuantizedTensor(qt.fmt, qt.shape, tiles=qt.tiles.clone(), name=qt.name)
    return quant.QuantizedTensor(qt.fmt, qt.shape, planes={k: v.clone() for k, v in qt.planes.items()}, name=qt.name)


def check_quantized(fmt, x, qt, kernels):
    """The kernel's y within the loose bound of the module docstring around the reference's."""
    y = ops.linear(x, qt, backend=kernels).float()
    y_ref = reference.linear(x, qt).float()
    w_abs = qt.dequantize().abs()                                              # [N, K]
    M, K = x.shape
    if kernels == "native":
        dx = x.float().abs().reshape(M, K // 32, 32).amax(-1, keepdim=True) / 127   # [M, K/32, 1]
        own = (dx / 2).expand(M, K // 32, 32).reshape(M, K) @ w_abs.T
    else:
        own = 2 ** -8 * (x.float().abs() @ w_abs.T)
    bound = 2 * own + 2 ** -7 * y_ref.abs() + 1e-6
    err = (y - y_ref).abs()
    if not (err <= bound).all():   # NaN fails too
        worst = (err / bound).nan_to_num(nan=float("inf")).argmax()
        raise AssertionError(f"{fmt} linear [{qt.shape[0]}, {K}]: result outside the sanity bound of the "
                             f"reference (worst: error {err.flatten()[worst]:.3g}, bound {bound.flatten()[worst]:.3g})")


def copies_of(nbytes, quick, device):
    return 1 if quick else max(1, math.ceil(common.stream_bytes(device) / nbytes))


def providers(K, N, formats, g, quick, x16, kernels):
    """{provider: (fn(x, w), [weight copies], weight bytes)}, every output checked first."""
    out = {}
    device = x16.device
    for fmt in formats:
        if K % quant.FORMATS[fmt].block:
            continue
        qt = make_weight(fmt, N, K, g, kernels, device)
        check_quantized(fmt, x16, qt, kernels)
        qt.raw = None   # the reference's copy is no longer needed
        copies = [qt] + [copy_of(qt) for _ in range(copies_of(qt.nbytes, quick, device) - 1)]
        out[fmt] = (lambda x, w: ops.linear(x, w, backend=kernels), copies, qt.nbytes)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16).to(device)
    expected = x16.float() @ w.float().T
    fns = {"bf16 F.linear": F.linear, **({"bf16 native": native.linear} if device.type == "cpu" else {})}
    for p, fn in fns.items():
        common.check_close(f"{p} [{N}, {K}]", fn(x16, w), expected, atol=2e-2 * math.sqrt(K), rtol=2e-2)
    dense = [w] + [w.clone() for _ in range(copies_of(w.numel() * 2, quick, device) - 1)]
    for p, fn in fns.items():
        out[p] = (fn, dense, w.numel() * 2)
    return out


def main(argv=None):
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    extra.add_argument("--formats", default=None, help="comma-separated subset of " + ",".join(FORMATS))
    extra.add_argument("--shapes", default=None, help="comma-separated subset of the shape names")
    extra.add_argument("--kernels", choices=KERNELS, default=None,
                       help="the quantized kernels: triton on CUDA (default there), native on CPUs (default)")
    known, rest = extra.parse_known_args(argv)
    args = common.parse_args(__doc__.splitlines()[0], rest)
    device = torch.device(args.device)
    kernels = known.kernels or ("triton" if device.type == "cuda" else "native")
    if kernels == "native" and device.type != "cpu":
        raise SystemExit("--kernels native runs on the CPU (--device cpu); on CUDA the quantized kernels are triton")
    if kernels == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--kernels triton on the CPU runs through Triton's interpreter: set TRITON_INTERPRET=1 "
                         "(and --quick: it is ~1000x slower than a GPU)")
    if known.threads:
        torch.set_num_threads(known.threads)
    full = CUDA_SHAPES if device.type == "cuda" else SHAPES
    shapes, ms = (QUICK_SHAPES, (1, 4)) if args.quick else (full, (1, 4, 16))
    if known.shapes:
        shapes = {n: shapes[n] for n in known.shapes.split(",")}
    formats = known.formats.split(",") if known.formats else FORMATS
    unknown = [f for f in formats if f not in quant.FORMATS]
    if unknown:
        raise SystemExit(f"unknown formats {unknown}; choose from {', '.join(FORMATS)}")
    if device.type == "cpu":
        native.build()  # the bf16 native provider, and the native quantized kernels
        isa = torch.ops.fuselm.quant_isa()
    kernel_path = f"native {isa}" if kernels == "native" else "triton" + " (interpreter)" * (device.type == "cpu")
    working_set = common.stream_bytes(device)
    load_start = os.getloadavg()
    reads = [common.read_bandwidth(working_set, device, cached=False)]
    print(f"{common.header(device)}; quantized kernels: {kernel_path}; read bandwidth {reads[0]:.1f} GB/s over "
          f"{working_set >> 20} MiB (L3 {(common.l3_bytes() or 0) >> 20} MiB); load average {load_start[0]:.2f} "
          f"at start", flush=True)
    notes = [f"quantized kernels: {kernel_path}"]
    skipped = {n: (K, N) for n, (K, N) in shapes.items() if K % 256}
    kquants = [f for f in formats if quant.FORMATS[f].block == 256]
    if skipped and kquants:
        notes.append(f"{', '.join(kquants)}: skipped for {', '.join(f'{n} (K={K})' for n, (K, N) in skipped.items())}: "
                     "K-quants need K % 256 == 0")
        print("note:", notes[-1], flush=True)
    g = torch.Generator().manual_seed(0)
    raw_rows = []   # (case, provider, timings, bytes)
    for name, (K, N) in shapes.items():
        x16 = torch.randn(16 if not args.quick else max(ms), K, generator=g).to(torch.bfloat16).to(device)
        provs = providers(K, N, formats, g, args.quick, x16, kernels)
        for M in ms:
            x = x16[:M].contiguous()
            if args.reps is None:  # ~0.1 s per provider and round at ~15 GB/s, within [4, 200] calls
                reps = {p: max(4, min(200, int(0.1 * 15e9 / b))) for p, (_, _, b) in provs.items()}
            else:
                reps = dict.fromkeys(provs, args.reps)
            rounds = {p: [] for p in provs}
            for _ in range(1 if args.quick else ROUNDS):
                reads.append(common.read_bandwidth(working_set, device, cached=False))
                for p, (fn, weights, _) in provs.items():
                    rounds[p].append(common.timeit(common.rotating(fn, x, weights), device, reps=reps[p], warmup=2))
            times = {p: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for p, rs in rounds.items()}
            for p, (_, _, wbytes) in provs.items():
                raw_rows.append(({"shape": name, "K": K, "N": N, "M": M}, p, times[p],
                                 wbytes + M * K * 2 + M * N * 2, times))
            best = min((p for p in provs if p not in DENSE), key=lambda p: times[p]["median_ms"], default=None)
            print(f"  {name} M={M}: " + ", ".join(f"{p} {times[p]['median_ms'] * 1e3:.0f} us" for p in provs)
                  + (f"; fastest format {best}" if best else ""), flush=True)
        del provs
    read = statistics.median(reads)
    load_end = os.getloadavg()
    rows = []
    for case, p, t, nbytes, times in raw_rows:
        gbps = nbytes / t["median_ms"] / 1e6
        rows.append({**case, "provider": p, **t, "MiB": nbytes / 2**20, "GB/s": gbps, "% read": 100 * gbps / read,
                     **{VS[d]: times[d]["median_ms"] / t["median_ms"] for d in DENSE if d in times}})
    common.print_table(rows, ["shape", "M", "provider", "median_ms", "p20_ms", "p80_ms", "MiB", "GB/s", "% read",
                              "vs F.linear"] + ["vs bf16 native"] * (device.type == "cpu"))
    print(f"read bandwidth over {working_set >> 20} MiB: median {read:.1f} GB/s of {len(reads)} measurements "
          f"(min {min(reads):.1f}, max {max(reads):.1f}); load average {load_end[0]:.2f} (1 min) at end")
    summary = {}
    for M in ms:
        for p in dict.fromkeys(r["provider"] for r in rows):
            rs = [r for r in rows if r["provider"] == p and r["M"] == M]
            summary[f"{p} M={M}"] = {"median GB/s": statistics.median(r["GB/s"] for r in rs),
                                     "median vs F.linear": statistics.median(r["vs F.linear"] for r in rs),
                                     "shapes": len(rs)}
            if p not in DENSE:
                print(f"{p} M={M}: median {summary[f'{p} M={M}']['median GB/s']:.1f} GB/s, "
                      f"x{summary[f'{p} M={M}']['median vs F.linear']:.2f} bf16 F.linear over {len(rs)} shapes")
    for n in notes:
        print("note:", n)
    path = common.save("quant" + (f"_threads{known.threads}" if known.threads else ""), args, rows, extra={
        "kernels": kernel_path, "read_bandwidth_GBps": read, "read_bandwidth_samples_GBps": reads,
        "read_bandwidth_buffer_bytes": working_set,
        "loadavg_start": load_start, "loadavg_end": load_end, "notes": notes, "summary": summary})
    print(f"saved {path}")
    return rows


if __name__ == "__main__":
    main()
