"""The GPU validation run (bench/gpu_check.py) without a GPU: its dry run, and how a run reports
parts that fail or run out of time and goes on."""
import json
import subprocess
import sys
from pathlib import Path

from bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_passes():
    """Budgets within the run's limit, every test file in a part, collection, bench entry points, the wheel."""
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "dry run: ok" in r.stdout, r.stdout + r.stderr


def test_dry_run_names_what_is_wrong(monkeypatch, capsys):
    monkeypatch.setitem(gpu_check.BUDGETS_S, "native", gpu_check.TOTAL_BUDGET_S)
    monkeypatch.setitem(gpu_check.TEST_PARTS, "tests-model", ("test_model.py", "test_nothing_here.py"))
    monkeypatch.delitem(gpu_check.BENCHES, "bench-norm")
    # only the parts whose checks are cheap: the budget and coverage checks still see everything
    assert not gpu_check.dry_run(["env", "native"])
    out = capsys.readouterr().out
    assert f"the budgets add up to {gpu_check.BUDGETS_S['env'] + gpu_check.TOTAL_BUDGET_S} s" in out
    assert "unknown ['test_nothing_here.py']" in out and "'test_hf.py'" in out  # missing from the parts
    assert "benchmarks in neither BENCHES nor CPU_BENCHES: ['norm']" in out


def test_run_reports_failures_and_timeouts_and_goes_on(monkeypatch, tmp_path):
    py = sys.executable
    parts = {"ok": [py, "-c", "print('fine')"], "fails": [py, "-c", "import sys; sys.exit(3)"],
             "hangs": [py, "-c", "import time; time.sleep(60)"], "after": [py, "-c", "print('still ran')"]}
    monkeypatch.setattr(gpu_check, "_commands", lambda out, site: parts)
    monkeypatch.setattr(gpu_check, "BUDGETS_S", {"ok": 30, "fails": 30, "hangs": 2, "after": 30})
    monkeypatch.setattr(gpu_check, "WHEELS", tmp_path / "no-wheels")
    results = gpu_check.run(list(parts), tmp_path / "out")
    assert {p: s for p, (s, _) in results.items()} == {"ok": "ok", "fails": "failed (exit 3)",
                                                         "hangs": "timeout after 2 s", "after": "ok"}
    assert results["hangs"][1] < 30  # killed at its budget, not waited for
    summary = (tmp_path / "out" / "summary.md").read_text()
    for part, (status, _) in results.items():
        assert f"| {part} | {status} |" in summary
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "fine" in log and "still ran" in log
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == []


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="7" failures="1" errors="2" skipped="3"/>'
                   '<testsuite tests="1" failures="0" errors="0" skipped="0"/></testsuites>')
    assert gpu_check._junit(xml) == {"tests": 8, "failures": 1, "errors": 2, "skipped": 3}
    assert gpu_check._junit(tmp_path / "missing.xml") is None


def test_keep_writes_the_device_results(monkeypatch, tmp_path):
    """A run's folder back from the device becomes bench/results/<device>/ with a report."""
    run = tmp_path / "gpu-check"
    run.mkdir()
    doc = {"benchmark": "norm", "device": "NVIDIA H200", "cpu": "x", "date": "2026-12-02", "torch": "2.11",
           "threads": 1, "quick": False, "rows": [{"provider": "triton", "rows": 4, "median_ms": 0.01, "GB/s": 3.5}]}
    (run / "results.json").write_text(json.dumps([doc]))
    (run / "summary.md").write_text("# fuselm GPU check\n")
    monkeypatch.setattr(gpu_check.common, "RESULTS", tmp_path / "results")
    dest = gpu_check.keep(run)
    assert dest == tmp_path / "results" / "nvidia-h200"
    assert json.loads((dest / "norm.json").read_text()) == doc
    assert (dest / "gpu-check.md").read_text() == "# fuselm GPU check\n"
    assert "| triton | 4 | 0.01 | 3.5 |" in (dest / "report.md").read_text()
