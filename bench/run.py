"""Run every benchmark, then write bench/results/<device>/results.json, report.md and plots.

    python -m bench.run [--quick] [--device cuda] [--only norm,e2e]    (also: make bench, fuselm bench)

Quick runs (tiny sizes, for checking that nothing rotted) go to
bench/results/<device>-quick/, which git ignores.
"""
import importlib
import sys
import traceback

from tqdm import tqdm

from . import common, report

BENCHMARKS = ["norm", "attention", "decode", "sampling", "native_cpu", "quant", "e2e", "engine", "serve", "tp"]


def main(argv=None):
    def extra(p):
        p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    args = common.parse_args(__doc__.splitlines()[0], argv, extra=extra)
    names = args.only.split(",") if args.only else BENCHMARKS
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"unknown benchmarks {unknown}; choose from {', '.join(BENCHMARKS)}")
    out = args.out or str(common.results_dir(args))
    passthrough = ["--device", args.device, "--out", out] + (["--quick"] if args.quick else [])
    if args.reps:
        passthrough += ["--reps", str(args.reps)]
    failed = []
    for name in (bar := tqdm(names, desc="benchmarks", unit="bench", file=sys.stderr)):
        bar.set_postfix_str(name)
        print(f"\n== {name}", flush=True)
        try:
            importlib.import_module(f"{__package__}.{name}").main(passthrough)
        except Exception:  # one broken benchmark must not hide the others' results
            traceback.print_exc()
            failed.append(name)
    print("report:", report.write(out))
    if failed:
        raise SystemExit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
