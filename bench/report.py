"""Turn the JSON results of one device into report.md and one PNG plot per benchmark.

Each benchmark JSON (bench.common.save) holds rows of {case keys..., provider,
timings, a throughput metric}. The report shows every row in a markdown table
and plots the metric per case, one line per provider, with the device's
measured limit (read bandwidth where the benchmark measured it, else copy
bandwidth, for GB/s; matmul peak for TFLOP/s) drawn as a line. Without
matplotlib the report is written without plots and says so.
"""
import json
from pathlib import Path

# throughput column -> (axis label, the JSON keys of its measured limit, the first present is drawn)
METRICS = {"GB/s": ("GB/s", ("read_bandwidth_GBps", "copy_bandwidth_GBps")),
           "TFLOPs": ("TFLOP/s", ("matmul_peak_TFLOPs",)),
           "decode_tok_s": ("decode tokens/s", ())}
TIMINGS = {"median_ms", "p20_ms", "p80_ms"}
NOT_CASE = {"reps"}  # per-row counts that are not part of the case (e2e: repetitions a provider ran)


def _metric(rows):
    return next((m for m in METRICS if any(m in r for r in rows)), None)


def _case(row, metric):
    if "case" in row:
        return str(row["case"])
    skip = TIMINGS | NOT_CASE | {"provider", metric} | {k for k, v in row.items() if isinstance(v, float)}
    return " ".join(f"{k}={v}" for k, v in row.items() if k not in skip)


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _where(doc):
    """The device, its host CPU when they differ, the date, torch, threads, and the measured limits."""
    cpu = f" (host CPU {doc['cpu']})" if doc.get("cpu") and doc["cpu"] != doc["device"] else ""
    threads = f", {doc['threads']} threads" if doc.get("threads") else ""
    limits = [f"{what} bandwidth {doc[key]:.4g} GB/s" + (f" over {doc[key.replace('GBps', 'buffer_bytes')] >> 20} MiB"
                                                         if doc.get(key.replace("GBps", "buffer_bytes")) else "")
              for what, key in (("read", "read_bandwidth_GBps"), ("copy", "copy_bandwidth_GBps"))
              if isinstance(doc.get(key), (int, float))]
    return (f"{doc['device']}{cpu}, {doc['date']}, torch {doc['torch']}{threads}"
            + (f"; measured {', '.join(limits)}" if limits else ""))


def markdown(doc):
    rows = doc["rows"]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"### {doc['benchmark']}", "",
             _where(doc) + (" (quick sizes)" if doc.get("quick") else ""),
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
    label, limit_keys = METRICS[metric]
    limit_key = next((k for k in limit_keys if doc.get(k)), None)
    if limit_key:
        what = limit_key.split("_")[0]
        ax.axhline(doc[limit_key], color="k", linestyle="--", label=f"measured {what} bandwidth ({doc[limit_key]:.4g})"
                   if what in ("read", "copy") else f"measured limit ({doc[limit_key]:.4g})")
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
    try:
        import matplotlib  # noqa: F401
        plots = True
    except ImportError:
        plots = False
        parts += ["Plots skipped: matplotlib is not installed (pip install matplotlib).", ""]
        print("report: matplotlib is not installed; writing report.md without plots")
    for doc in docs:
        png = plot(doc, results_dir / f"{doc['benchmark']}.png") if plots else None
        parts.append(markdown(doc))
        if png:
            parts += [f"![{doc['benchmark']}]({png.name})", ""]
    report = results_dir / "report.md"
    report.write_text("\n".join(parts))
    return report
