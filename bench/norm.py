"""rms_norm / layer_norm speed, alone and fused with the residual add, per provider.

Providers: torch eager (runtime/reference.py), torch.compile of that reference
(CUDA only), triton (fuselm.kernels.norm) and native (the C++/CUDA extension,
when it builds). Every provider's output is checked against the reference
before it is timed.

Bytes per call for M rows of N columns, e = element size:
    read x (+ residual) and weight (+ bias), write y (+ h)
    bytes = M*N*e * (2 + 2*residual) + N*e * (1 + bias)
GB/s = bytes / median time; "% copy" = GB/s / measured copy bandwidth;
"vs torch" / "vs compile" = that baseline's median time / this provider's.

    python -m bench.norm           # CUDA: 4096 rows, hidden 2048..16384 (+32768: chunked kernel), bf16
    python -m bench.norm --quick   # tiny sizes; CPU smoke run (triton only with TRITON_INTERPRET=1)
"""

import torch

from . import common
from fuselm import reference

OPS = ("rms_norm", "layer_norm")
DTYPE = torch.bfloat16
EPS = 1e-5


def providers(device, quick, notes):
    """name -> {op: function}; the baselines first. Unavailable ones leave a note."""
    out = {"torch": {op: getattr(reference, op) for op in OPS}}
    if device.type == "cuda":
        out["compile"] = None  # compiled per case in run_case, after a dynamo reset
    else:
        notes.append("torch.compile: measured on CUDA only; skipped on the CPU")
    for backend in ("triton", "native"):
        if (impls := common.implementations(backend, OPS, device, quick, notes)) is not None:
            out[backend] = impls
    return out


def make_inputs(rows, hidden, residual, device):
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(DTYPE).to(device)
    return randn(rows, hidden), (randn(rows, hidden) if residual else None), randn(hidden), randn(hidden)


def run_case(op, fns, rows, hidden, residual, device, reps, notes):
    """Check then time every provider on one shape; returns the table rows."""
    x, r, w, b = make_inputs(rows, hidden, residual, device)
    args = (x, w) if op == "rms_norm" else (x, w, b)
    bytes_moved = x.numel() * x.element_size() * (2 + 2 * residual) \
        + hidden * w.element_size() * (1 + (op == "layer_norm"))
    expected = getattr(reference, op)(*args, eps=EPS, residual=r)
    times = {}
    for name, impl in list(fns.items()):
        if name == "compile":
            torch._dynamo.reset()  # a fresh cache per case: no recompile limit falls back to eager
            fn = torch.compile(getattr(reference, op))
        else:
            fn = impl[op]
        out = common.run_or_drop(fns, name, lambda: fn(*args, eps=EPS, residual=r), notes, what=f"{op} ")
        if name not in fns:
            continue
        if r is None:
            common.check_close(f"{name} {op}", out, expected, atol=1e-2, rtol=1e-2)
        else:
            common.check_close(f"{name} {op} y", out[0], expected[0], atol=1e-2, rtol=1e-2)
            common.check_close(f"{name} {op} h", out[1], expected[1], atol=0, rtol=0)
        times[name] = common.timeit(lambda: fn(*args, eps=EPS, residual=r), device, reps=reps)
    case = {"op": op, "residual": residual, "rows": rows, "hidden": hidden}
    return common.bandwidth_rows(case, times, bytes_moved, device, ("torch", "compile"))


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv)
    device = torch.device(args.device)
    if args.quick:
        rows, hiddens = 8, (96, 1000)
    else:
        rows, hiddens = 4096, (2048, 4096, 8192, 16384, 32768)
    notes = []
    fns = providers(device, args.quick, notes)
    print(f"{common.header(device)}; copy bandwidth {common.copy_bandwidth(device):.1f} GB/s "
          f"(over {common.stream_bytes(device) >> 20} MiB); "
          f"{rows} rows, {str(DTYPE).replace('torch.', '')}")
    results = []
    for op in OPS:
        for residual in (False, True):
            for hidden in hiddens:
                results += run_case(op, fns, rows, hidden, residual, device, args.reps, notes)
    common.print_table(results, ["op", "residual", "hidden", "provider", "median_ms", "p20_ms", "p80_ms",
                                 "GB/s", "% copy", "vs torch", "vs compile"])
    for note in notes:
        print("note:", note)
    path = common.save("norm", args, results, extra={"dtype": str(DTYPE), "notes": notes})
    print(f"saved {path}")
    return results


if __name__ == "__main__":
    main()
