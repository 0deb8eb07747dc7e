"""Tables, curves and the HTML report of a sweep, read from the run store."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import tempfile
from pathlib import Path

from bnlab.errors import ConfigError
from bnlab.experiments import RunStore, compare, group, rows
from bnlab.experiments.store import METRICS

TABLE_SETTINGS = ("model", "bn", "norm", "lr", "batch_size", "optimizer", "epochs")


def _fmt(v, column: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if column.startswith("seconds"):
            return f"{v:.1f}"
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def varying_settings(rows_: list[dict]) -> list[str]:
    """Settings that take more than one value among ``rows_`` (plus the usual identifying ones)."""
    if not rows_:
        return []
    keys = [k for k in rows_[0] if k not in ("run_id", "status", "seed", "epochs_done", *METRICS)
            and not k.startswith("summary.")]
    varying = [k for k in keys if len({json.dumps(r.get(k)) for r in rows_}) > 1]
    return varying or [k for k in TABLE_SETTINGS if k in keys][:3]


def format_table(records: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c), c)) for r in records)) if records else len(c) for c in columns}
    lines = ["  ".join(f"{c:>{widths[c]}}" for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(f"{_fmt(r.get(c), c):>{widths[c]}}" for c in columns) for r in records]
    return "\n".join(lines)


def sort_rows(records: list[dict], metric: str | None) -> list[dict]:
    if not metric:
        return records
    if records and metric not in records[0]:
        raise ConfigError(f"--sort: unknown column {metric!r}")
    # accuracies sort best first; losses and times smallest first; missing values last
    descending = not (metric.endswith("loss") or metric.endswith("loss_mean") or metric.startswith("seconds"))
    numeric = [r for r in records if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    other = [r for r in records if r not in numeric]
    numeric.sort(key=lambda r: r[metric], reverse=descending)
    other.sort(key=lambda r: str(r.get(metric)))
    return numeric + other


def results_table(store: RunStore, sweep: str | None, where=None, sort: str | None = "test_acc",
                  group_by: list[str] | None = None, fmt: str = "table") -> str:
    runs = store.runs(sweep)
    flat = rows(runs, where)
    if group_by:
        grouped = sort_rows(group(flat, group_by), f"{sort}_mean" if sort and not sort.endswith("_mean") else sort)
        if fmt == "json":
            return json.dumps(grouped, indent=2)
        cols = list(group_by) + ["runs"] + [f"{m}_{s}" for m in ("train_acc", "test_acc", "test_loss")
                                            for s in ("mean", "std", "ci95")]
        if fmt == "csv":
            return _csv(grouped, list(grouped[0]) if grouped else cols)
        return format_table(grouped, cols)
    flat = sort_rows(flat, sort)
    if fmt == "json":
        return json.dumps(flat, indent=2)
    if fmt == "csv":
        return _csv(flat, list(flat[0]) if flat else ["run_id"])
    cols = ["run_id", "status"] + varying_settings(flat) + ["seed", "train_acc", "test_acc", "test_loss", "seconds"]
    if any(r.get("summary.ics_w1") is not None for r in flat):
        cols.append("summary.ics_w1")
    short = [{**r, "run_id": r["run_id"][:8]} for r in flat]
    return format_table(short, cols)


def _csv(records, columns) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in records:
        w.writerow({k: r.get(k) for k in columns})
    return buf.getvalue()


def format_compare(c: dict) -> str:
    by, metric = c["by"], c["metric"]
    recs = [{by: lv[by], "n": lv["n"], f"{metric} mean": lv["mean"], "std": lv["std"], "95% CI ±": lv["ci95"]}
            for lv in c["levels"]]
    lines = [format_table(recs, [by, "n", f"{metric} mean", "std", "95% CI ±"]), ""]
    lines += [t["verdict"] for t in c["tests"]]
    return "\n".join(lines)


def curves_by(store: RunStore, sweep: str, group_by: list[str], metric: str = "test_acc", where=None) -> dict:
    """{group label: [per-seed curve [(epoch, value)]]} for finished runs of a sweep."""
    runs = store.runs(sweep)
    flat = {r["run_id"]: r for r in rows(runs, where)}
    if metric not in METRICS:
        raise ConfigError(f"--metric: unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if not group_by:
        group_by = varying_settings(list(flat.values()))
        group_by = [k for k in group_by if k != "seed"]
    series: dict = {}
    for rid, r in flat.items():
        if r["status"] not in ("done", "diverged"):
            continue
        label = ", ".join(f"{k}={r[k]}" for k in group_by) or "all runs"
        curve = [(e["epoch"], e[metric]) for e in store.epochs(rid) if e[metric] is not None]
        series.setdefault(label, []).append(curve)
    if not series:
        raise ConfigError(f"sweep {sweep!r} has no finished runs to plot yet")
    return dict(sorted(series.items()))


def plot_sweep(store: RunStore, sweep: str, path: str | Path, metric: str = "test_acc",
               group_by: list[str] | None = None, where=None) -> Path:
    from bnlab.report.plots import learning_curves

    series = curves_by(store, sweep, group_by or [], metric, where)
    return learning_curves(series, path, metric,
                           title=f"{sweep}: {metric}\nmean over seeds; band: min-max for 2 seeds, ±1 std for 3+")


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _html_table(records: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c), c))}</td>" for c in columns) + "</tr>"
                   for r in records)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_report(store: RunStore, sweep: str, path: str | Path, by: str | None = None) -> Path:
    """One self-contained HTML file: config, grouped results, per-run table, comparison, curves
    (PNG figures embedded as data URIs, no external files or scripts)."""
    cfg = store.sweep_config(sweep)
    flat = rows(store.runs(sweep))
    varying = [k for k in varying_settings(flat) if k != "seed"]
    by = by or (varying[0] if varying else None)
    parts = [f"<h1>bnlab sweep: {html.escape(sweep)}</h1>",
             f"<p>{html.escape(cfg.get('description') or '')}</p>",
             f"<pre>{html.escape(json.dumps(cfg, indent=2))}</pre>"]
    claim = cfg.get("claim") or {}
    if claim.get("text"):
        parts.append(f"<p><b>Tutorial claim:</b> {html.escape(claim['text'])}</p>")
    if varying:
        grouped = group(flat, varying)
        cols = varying + ["runs"] + [f"{m}_{s}" for m in ("train_acc", "test_acc") for s in ("mean", "std", "ci95")]
        parts += ["<h2>Mean over seeds</h2>", _html_table(grouped, cols)]
    if by:
        # held-out accuracy always; the claim's own metric too when it is another one
        for metric in dict.fromkeys([claim.get("metric", "test_acc"), "test_acc"]):
            try:
                c = compare(flat, by, metric)
                parts += [f"<h2>Effect of {html.escape(by)} on {html.escape(metric)}</h2>",
                          f"<pre>{html.escape(format_compare(c))}</pre>"]
            except ConfigError as e:
                parts.append(f"<p>No comparison on {html.escape(metric)}: {html.escape(str(e))}</p>")
    with tempfile.TemporaryDirectory() as tmp:
        for metric in ("test_acc", "train_acc", "test_loss"):
            try:
                png = plot_sweep(store, sweep, Path(tmp) / f"{metric}.png", metric, varying)
                parts += [f"<h2>{metric}</h2>", _img(png)]
            except ConfigError:
                break
    cols = ["run_id", "status"] + varying + ["seed", "epochs_done", "train_acc", "test_acc", "test_loss", "seconds"]
    parts += ["<h2>Runs</h2>", _html_table([{**r, "run_id": r["run_id"][:8]} for r in flat], cols)]
    doc = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>bnlab: " + html.escape(sweep) + "</title>"
           "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}pre{background:#f6f6f6;padding:8px}"
           "img{max-width:100%}</style></head><body>" + "\n".join(parts) + "</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(doc)
    tmp.replace(path)
    return path
