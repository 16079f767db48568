"""The GPU validation run: every GPU test and benchmark in one prepared command (`make gpu-check`).

A GPU machine is lent now and then for ~15 minutes in all, with no package registry: one run of
at most 8 minutes and one rerun of the parts that failed. From the repository root:

    make gpu-check                         # on the GPU machine: python3 -m bench.gpu_check
    make gpu-check DRY=1                   # anywhere: checks the plan without a GPU (make test runs it)
    python3 -m bench.gpu_check --parts tests-model,bench-e2e     # a rerun of some parts
    python -m bench.gpu_check --keep /work/.device/.../gpu-check # back here: bench/results/<device>/

Parts, each a subprocess with its own time budget (a part that fails or runs out of time is
reported and the run goes on):
    env        nvidia-smi, torch / triton / CUDA versions
    install    pip install --no-deps --no-build-isolation -e . ; carried wheels (.whl/, e.g. gguf,
               which the GPU image lacks: `make gpu-wheels` fetches them here) into a target folder
    native     the native extension with its CUDA kernels
    tests-*    the whole test suite, natively, in three parts (hypothesis profile "ci", pytest-xdist
               where the image has it); the dry run checks that the parts cover every test file
    bench-*    the benchmarks at their GPU sizes, one part each
Everything lands in one folder (--out; default $OUT/gpu-check when the device tool's $OUT is set,
else bench/results/gpu-check): summary.md (device, driver, versions, date, per-part status and
times, test counts, the benchmark tables), results.json (every benchmark's rows), one JUnit XML
per test part and log.txt: at most 8 files, as the device tool brings back.
"""
import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from . import common, report

ROOT = Path(__file__).resolve().parent.parent
TOTAL_BUDGET_S = 480
WHEELS = ROOT / ".whl"
CARRIED = ("gguf",)  # pure-Python packages fuselm needs that the GPU image lacks (KINDS.md's package list)
TEST_PARTS = {
    "tests-kernels": ("test_norm.py", "test_attention.py", "test_decode.py", "test_sampling.py",
                      "test_pointwise.py", "test_triton_quant.py", "test_triton_compile.py"),
    "tests-native": ("test_native.py", "test_native_attention.py", "test_native_linear.py", "test_quant.py",
                     "test_graphs.py", "test_tuning.py", "test_gpu_check.py", "test_bench.py"),
    "tests-model": ("test_model.py", "test_engine.py", "test_serve.py", "test_hf.py", "test_quant_model.py",
                    "test_config_weights.py", "test_tokenizer.py", "test_tp.py"),
}
BENCHES = {"bench-norm": "norm", "bench-attention": "attention", "bench-decode": "decode",
           "bench-sampling": "sampling", "bench-quant": "quant", "bench-e2e": "e2e", "bench-engine": "engine"}
# bench/run.py's benchmarks the GPU check skips: the CPU-only kernels, serve (its peer is a CPU llama-server and
# its clients would share the part's budget with the server) and tp (two ranks need two GPUs)
CPU_BENCHES = ("native_cpu", "serve", "tp")
# the microbenchmarks keep their own CUDA repetitions (50 per case); quant spends most of its time
# quantizing the weights on the CPU, so three of its shapes
BENCH_ARGS = {"e2e": ["--reps", "3"], "engine": ["--reps", "1"], "quant": ["--shapes", "1b o,8b qkv,8b down"]}
# estimates, not measurements (no run on a GPU yet): the first run's summary.md says what each part took
BUDGETS_S = {"env": 15, "install": 40, "native": 65, "tests-kernels": 70, "tests-native": 45, "tests-model": 55,
             "bench-norm": 20, "bench-attention": 30, "bench-decode": 20, "bench-sampling": 20, "bench-quant": 30,
             "bench-e2e": 40, "bench-engine": 30}
LOG_TAIL = 200_000  # characters of each part's output kept in log.txt


def _commands(out, site):
    """part -> argv, in run order."""
    py = sys.executable
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    if _has("xdist"):
        pytest += ["-n", str(min(8, os.cpu_count() or 1))]
    probe = ("import json, torch, triton; p = torch.cuda.get_device_properties(0); "
             "print(json.dumps({'torch': torch.__version__, 'triton': triton.__version__, 'cuda': torch.version.cuda, "
             "'device': p.name, 'sms': p.multi_processor_count, 'memory_GiB': round(p.total_memory / 2**30, 1)}))")
    cmds = {"env": [py, "-c", probe],
            "install": [py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e",
                        str(ROOT)],
            "native": [py, "-c", "from fuselm import native; print(native.build(verbose=False))"]}
    for part, files in TEST_PARTS.items():
        cmds[part] = pytest + [f"--junitxml={out / (part + '.xml')}"] + [str(ROOT / "tests" / f) for f in files]
    for part, name in BENCHES.items():
        cmds[part] = [py, "-m", f"bench.{name}", "--out", str(site.parent / "bench"), *BENCH_ARGS.get(name, [])]
    return cmds


def _has(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


def _run(cmd, budget, env, log):
    """(status, seconds, output): status "ok", "failed (exit N)" or "timeout after N s"; output also goes to log."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=budget)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the part and everything it started
        output, _ = proc.communicate()
        status = f"timeout after {budget} s"
    log.write(f"\n==== {' '.join(map(str, cmd))}\n{status}\n{(output or '')[-LOG_TAIL:]}\n")
    log.flush()
    return status, time.perf_counter() - t0, output or ""


def _junit(path):
    """{tests, failures, errors, skipped} of a JUnit XML, or None."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root)
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}


def _summary(out, env_info, results, benches):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    smi = env_info.get("nvidia-smi", "unknown")
    versions = env_info.get("versions", {})
    lines = ["# fuselm GPU check", "",
             f"{versions.get('device', smi)}; driver and GPU: {smi}; torch {versions.get('torch', '?')}, "
             f"triton {versions.get('triton', '?')}, CUDA {versions.get('cuda', '?')}; {now}", "",
             "| part | status | seconds | tests | failures | errors | skipped |", "|---|---|---|---|---|---|---|"]
    for part, (status, seconds) in results.items():
        counts = _junit(out / f"{part}.xml") if part in TEST_PARTS else None
        cells = [str(counts[k]) for k in ("tests", "failures", "errors", "skipped")] if counts else [""] * 4
        lines.append(f"| {part} | {status} | {seconds:.0f} | " + " | ".join(cells) + " |")
    lines.append("")
    for doc in benches:
        lines.append(report.markdown(doc))
    (out / "summary.md").write_text("\n".join(lines))


def _env_info():
    info = {}
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True)
        info["nvidia-smi"] = q.stdout.strip() or q.stderr.strip()
    return info


def run(parts, out):
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="fuselm-gpu-check-"))
    site = scratch / "site"
    cmds = _commands(out, site)
    env = {**os.environ, "FUSELM_HYPOTHESIS_PROFILE": "ci", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    env_info, results = _env_info(), {}
    with open(out / "log.txt", "a") as log:
        wheels = sorted(str(w) for w in WHEELS.glob("*.whl"))
        if wheels:  # carried pure-Python packages, importable by every part after this
            status, _, _ = _run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                              "--target", str(site), *wheels], BUDGETS_S["install"], env, log)
            print(f"carried wheels  {status}: {', '.join(Path(w).name for w in wheels)}", flush=True)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
        for part in parts:
            status, seconds, output = _run(cmds[part], BUDGETS_S[part], env, log)
            results[part] = (status, seconds)
            print(f"{part:15s} {status:24s} {seconds:5.0f} s", flush=True)
            if part == "env" and status == "ok":  # the probe prints one JSON line last
                env_info["versions"] = json.loads(output.strip().splitlines()[-1])
    benches = [json.loads(p.read_text()) for p in sorted((scratch / "bench").glob("*.json"))]
    shutil.rmtree(scratch, ignore_errors=True)
    (out / "results.json").write_text(json.dumps(benches, indent=1))
    _summary(out, env_info, results, benches)
    print("summary:", out / "summary.md")
    return results


def dry_run(parts):
    """Check the plan without a GPU: budgets, test coverage, collection, entry points, packaging."""
    problems = []
    budget = sum(BUDGETS_S[p] for p in parts)
    print(f"plan: {len(parts)} parts, {budget} s of budgets (at most {TOTAL_BUDGET_S} s)")
    for p in parts:
        print(f"  {p:15s} {BUDGETS_S[p]:4d} s")
    if budget > TOTAL_BUDGET_S:
        problems.append(f"the budgets add up to {budget} s, over {TOTAL_BUDGET_S} s")
    files = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    listed = [f for fs in TEST_PARTS.values() for f in fs]
    if set(listed) != files or len(listed) != len(set(listed)):
        problems.append(f"test parts must list every test file once: missing {sorted(files - set(listed))}, "
                        f"unknown {sorted(set(listed) - files)}")
    from . import run as bench_run
    uncovered = set(bench_run.BENCHMARKS) - set(BENCHES.values()) - set(CPU_BENCHES)
    if uncovered:
        problems.append(f"benchmarks in neither BENCHES nor CPU_BENCHES: {sorted(uncovered)}")
    with tempfile.TemporaryDirectory() as tmp:
        out, site = Path(tmp), Path(tmp) / "site"
        cmds = _commands(out, site)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for part in (p for p in parts if p in TEST_PARTS):
            files = [a for a in cmds[part] if a.endswith(".py")]
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                                *files], cwd=ROOT, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                problems.append(f"{part}: pytest cannot collect its tests:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
        for part in (p for p in parts if p in BENCHES):
            r = subprocess.run([sys.executable, "-m", f"bench.{BENCHES[part]}", "--help"], cwd=ROOT, env=env,
                               capture_output=True, text=True)
            if r.returncode != 0 or "--reps" not in r.stdout:
                problems.append(f"{part}: `python -m bench.{BENCHES[part]} --help` failed: {r.stderr[-1000:]}")
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", tmp, str(ROOT)], capture_output=True, text=True)
        wheel = next(Path(tmp).glob("fuselm-*.whl"), None)
        if wheel is None:
            problems.append(f"the package does not build: {r.stderr[-2000:]}")
        else:
            import zipfile
            names = set(zipfile.ZipFile(wheel).namelist())
            for need in ("fuselm/bench/run.py", "fuselm/bench/gpu_check.py", "fuselm/bench/e2e.py",
                         "fuselm/csrc/norm.cuh", "fuselm/csrc/quant_cpu.cpp", "fuselm/kernels/attention.py"):
                if need not in names:
                    problems.append(f"the wheel lacks {need} (fuselm bench and the native build need it installed)")
    missing = [w for w in CARRIED if not any(WHEELS.glob(f"{w}-*.whl"))]
    if missing:
        print(f"note: .whl/ has no wheel of {', '.join(missing)}, which the GPU image lacks: `make gpu-wheels` "
              "fetches them (pass carry=['.whl'] to the device tool)")
    for p in problems:
        print("problem:", p)
    print("dry run:", "ok" if not problems else f"{len(problems)} problem(s)")
    return not problems


def keep(folder):
    """Commit-ready results from a run's folder (as the device tool brought it back): bench/results/<device>/
    gets one JSON per benchmark, report.md with plots (bench/report.py) and the run's summary as gpu-check.md."""
    folder = Path(folder)
    docs = json.loads((folder / "results.json").read_text())
    if not docs:
        raise SystemExit(f"{folder / 'results.json'} holds no benchmark results")
    dest = common.RESULTS / common.slug(docs[0]["device"])
    dest.mkdir(parents=True, exist_ok=True)
    for doc in docs:
        (dest / f"{doc['benchmark']}.json").write_text(json.dumps(doc, indent=1))
    shutil.copy(folder / "summary.md", dest / "gpu-check.md")
    print("report:", report.write(dest))
    return dest


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="check the plan without a GPU")
    p.add_argument("--parts", default=None, help=f"comma-separated subset of {','.join(BUDGETS_S)}")
    p.add_argument("--out", default=None, help="results folder (default $OUT/gpu-check, else bench/results/gpu-check)")
    p.add_argument("--keep", metavar="FOLDER", default=None,
                   help="no run: turn a run's folder into bench/results/<device>/ (JSON per benchmark, report.md)")
    a = p.parse_args(argv)
    if a.keep:
        keep(a.keep)
        return 0
    parts = a.parts.split(",") if a.parts else list(BUDGETS_S)
    unknown = [x for x in parts if x not in BUDGETS_S]
    if unknown:
        p.error(f"unknown parts {unknown}; choose from {', '.join(BUDGETS_S)}")
    if a.dry_run:
        return 0 if dry_run(parts) else 1
    out = Path(a.out) if a.out else Path(os.environ["OUT"]) / "gpu-check" if os.environ.get("OUT") else \
        ROOT / "bench" / "results" / "gpu-check"
    results = run(parts, out)
    return 0 if all(status == "ok" for status, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
