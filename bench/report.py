"""Turn the JSON results of one device into report.md and one PNG plot per benchmark.

Each benchmark JSON (bench.common.save) holds rows of {case keys..., provider,
timings, a throughput metric}. The report shows every row in a markdown table
and plots the metric per case, one line per provider, with the device's
measured limit (copy bandwidth for GB/s, matmul peak for TFLOP/s) drawn as a line.
"""
import json
from pathlib import Path

# throughput column -> (axis label, the JSON key of its measured limit)
METRICS = {"GB/s": ("GB/s", "copy_bandwidth_GBps"), "TFLOPs": ("TFLOP/s", "matmul_peak_TFLOPs"),
           "decode_tok_s": ("decode tokens/s", None)}
TIMINGS = {"median_ms", "p20_ms", "p80_ms"}


def _metric(rows):
    return next((m for m in METRICS if any(m in r for r in rows)), None)


def _case(row, metric):
    if "case" in row:
        return str(row["case"])
    skip = TIMINGS | {"provider", metric} | {k for k, v in row.items() if isinstance(v, float)}
    return " ".join(f"{k}={v}" for k, v in row.items() if k not in skip)


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(doc):
    rows = doc["rows"]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"### {doc['benchmark']}", "",
             f"{doc['device']}, {doc['date']}, torch {doc['torch']}" + (" (quick sizes)" if doc.get("quick") else ""),
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines + [""] + [f"- {n}" for n in doc.get("notes", [])] + [""])


def plot(doc, path):
    """One line per provider of the throughput metric over the cases; returns path or None."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    metric = _metric(rows)
    if metric is None:
        return None
    cases = list(dict.fromkeys(_case(r, metric) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(cases) + 3), 4.5))
    for provider in dict.fromkeys(r["provider"] for r in rows):
        pts = {_case(r, metric): r[metric] for r in rows if r["provider"] == provider and metric in r}
        xs = [i for i, c in enumerate(cases) if c in pts]
        ax.plot(xs, [pts[cases[i]] for i in xs], marker="o", label=provider)
    label, limit_key = METRICS[metric]
    if limit_key and doc.get(limit_key):
        ax.axhline(doc[limit_key], color="k", linestyle="--", label=f"measured limit ({doc[limit_key]:.4g})")
    ax.set_xticks(range(len(cases)), cases, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(label)
    ax.set_title(f"{doc['benchmark']} on {doc['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results_dir):
    """Write report.md and <benchmark>.png for every JSON in results_dir; return report.md's path."""
    results_dir = Path(results_dir)
    docs = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json")) if p.name != "results.json"]
    (results_dir / "results.json").write_text(json.dumps(docs, indent=1))
    parts = [f"# fuselm benchmark report: {docs[0]['device']}" if docs else "# fuselm benchmark report", ""]
    for doc in docs:
        png = plot(doc, results_dir / f"{doc['benchmark']}.png")
        parts.append(markdown(doc))
        if png:
            parts += [f"![{doc['benchmark']}]({png.name})", ""]
    report = results_dir / "report.md"
    report.write_text("\n".join(parts))
    return report
