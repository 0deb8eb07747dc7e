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
from bnlab.experiments.analysis import check_where_matches, mixture_note, strata, varying
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
    """Settings that take more than one value among ``rows_`` (else the usual identifying ones)."""
    if not rows_:
        return []
    return list(varying(rows_)) or [k for k in TABLE_SETTINGS if k in rows_[0]][:3]


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
    check_where_matches(runs, where, flat)
    if group_by:
        grouped = sort_rows(group(flat, group_by), f"{sort}_mean" if sort and not sort.endswith("_mean") else sort)
        if fmt == "json":
            return json.dumps(grouped, indent=2)
        extra = varying([r for r in flat if r["status"] in ("done", "diverged")], exclude=group_by)
        cols = list(group_by) + list(extra) + ["runs"] + [f"{m}_{s}" for m in ("train_acc", "test_acc", "test_loss")
                                                          for s in ("mean", "std", "ci95")]
        if fmt == "csv":
            return _csv(grouped, list(grouped[0]) if grouped else cols)
        note = f"note: grouped by {', '.join(extra)} too: {mixture_note(extra, group_by)}\n" if extra else ""
        return versions_note(store, sweep) + note + format_table(grouped, cols)
    flat = sort_rows(flat, sort)
    if fmt == "json":
        return json.dumps(flat, indent=2)
    if fmt == "csv":
        return _csv(flat, list(flat[0]) if flat else ["run_id"])
    cols = ["run_id", "status"] + varying_settings(flat) + ["seed", "train_acc", "test_acc", "test_loss", "seconds"]
    if any(r.get("summary.ics_w1") is not None for r in flat):
        cols.append("summary.ics_w1")
    if len(store.sweep_versions(sweep) if sweep else []) > 1:
        cols.append("config_versions")
    short = [{**r, "run_id": r["run_id"][:8]} for r in flat]
    return versions_note(store, sweep) + format_table(short, cols)


def config_changes(versions: list[dict]) -> list[str]:
    """One line per config version after the first: what changed from the one before."""
    lines = []
    for prev, cur in zip(versions, versions[1:]):
        a, b = _flat_config(prev["config"]), _flat_config(cur["config"])
        diff = [f"{k}: {a.get(k, '-')} -> {b.get(k, '-')}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
        lines.append(f"v{cur['version']}: " + ("; ".join(diff) or "no setting changed"))
    return lines


def _flat_config(cfg: dict) -> dict:
    out = {k: json.dumps(v) for k, v in cfg.items() if k not in ("fixed", "grid", "claim", "description")}
    out.update({k: json.dumps(v) for k, v in cfg.get("fixed", {}).items()})
    out.update({f"grid.{k}": json.dumps(v) for k, v in cfg.get("grid", {}).items()})
    return out


def versions_note(store: RunStore, sweep: str | None) -> str:
    """A header saying that a sweep's config changed under the same name (empty if it never did)."""
    versions = store.sweep_versions(sweep) if sweep else []
    if len(versions) < 2:
        return ""
    head = (f"note: sweep {sweep!r} was run with {len(versions)} configs (versions "
            f"{', '.join(str(v['version']) for v in versions)}; column config_versions):")
    return "\n".join([head] + [f"  {line}" for line in config_changes(versions)]) + "\n"


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
    selected = rows(runs, where)
    check_where_matches(runs, where, selected)
    flat = {r["run_id"]: r for r in selected}
    if metric not in METRICS:
        raise ConfigError(f"--metric: unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    finished = [r for r in selected if r["status"] in ("done", "diverged")]
    # a curve is one experiment: split by every other setting that varies, never pool them
    group_by = list(group_by or []) + [k for k in varying(finished, exclude=group_by or ())]
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
    from bnlab.report.plots import learning_curves, metric_name

    series = curves_by(store, sweep, group_by or [], metric, where)
    return learning_curves(series, path, metric, title=f"{sweep}: {metric_name(metric)}\n"
                                                       "mean over seeds; band: min-max for 2 seeds, ±1 std for 3+")


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _html_table(records: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c), c))}</td>" for c in columns) + "</tr>"
                   for r in records)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_report(store: RunStore, sweep: str, path: str | Path, by: str | None = None) -> Path:
    """One self-contained HTML file: config(s), grouped results, per-run table, comparison, curves
    (PNG figures embedded as data URIs, no external files or scripts).

    When the sweep holds different experiments (its config changed under the same name, so runs
    differ in more than the compared setting and the seed), every config version is shown and
    the effect of ``by`` is tested separately within each experiment.
    """
    cfg = store.sweep_config(sweep)
    versions = store.sweep_versions(sweep)
    flat = rows(store.runs(sweep))
    finished = [r for r in flat if r["status"] in ("done", "diverged")]
    varied = list(varying(finished))
    gridded = [k for k in cfg.get("grid", {}) if k in varied]
    by = by or (gridded or varied or [None])[0]
    parts = [f"<h1>bnlab sweep: {html.escape(sweep)}</h1>",
             f"<p>{html.escape(cfg.get('description') or '')}</p>"]
    if len(versions) > 1:
        parts.append(f"<p><b>This sweep was run with {len(versions)} configs</b>; runs of different configs are "
                     "different experiments and are never pooled:</p><ul>"
                     + "".join(f"<li>{html.escape(line)}</li>" for line in config_changes(versions)) + "</ul>")
        for v in versions:
            parts.append(f"<h3>config version {v['version']} ({len(v['run_ids'])} runs)</h3>"
                         f"<pre>{html.escape(json.dumps(v['config'], indent=2))}</pre>")
    else:
        parts.append(f"<pre>{html.escape(json.dumps(cfg, indent=2))}</pre>")
    claim = cfg.get("claim") or {}
    if claim.get("text"):
        parts.append(f"<p><b>Tutorial claim:</b> {html.escape(claim['text'])}</p>")
    if varied:
        grouped = group(flat, varied)
        cols = varied + ["runs"] + [f"{m}_{s}" for m in ("train_acc", "test_acc") for s in ("mean", "std", "ci95")]
        parts += ["<h2>Mean over seeds</h2>", _html_table(grouped, cols)]
    if by:
        # held-out accuracy always; the claim's own metric too when it is another one
        for fixed, part in strata(flat, by):
            where = ", ".join(f"{k}={v}" for k, v in fixed.items())
            for metric in dict.fromkeys([claim.get("metric", "test_acc"), "test_acc"]):
                title = f"Effect of {by} on {metric}" + (f" (runs with {where})" if where else "")
                try:
                    c = compare(part, by, metric)
                    parts += [f"<h2>{html.escape(title)}</h2>", f"<pre>{html.escape(format_compare(c))}</pre>"]
                except ConfigError as e:
                    parts.append(f"<p>{html.escape(title)}: no comparison: {html.escape(str(e))}</p>")
    with tempfile.TemporaryDirectory() as tmp:
        for metric in ("test_acc", "train_acc", "test_loss"):
            try:
                png = plot_sweep(store, sweep, Path(tmp) / f"{metric}.png", metric, varied)
                parts += [f"<h2>{metric}</h2>", _img(png)]
            except ConfigError:
                break
    cols = ["run_id", "status"] + varied + ["seed", "epochs_done", "train_acc", "test_acc", "test_loss", "seconds"]
    parts += ["<h2>Runs</h2>", _html_table([{**r, "run_id": r["run_id"][:8]} for r in flat], cols)]
    doc = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>bnlab: " + html.escape(sweep) + "</title>"
           "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}pre{background:#f6f6f6;padding:8px}"
           "img{max-width:100%}</style></head><body>" + "\n".join(parts) + "</body></html>")
    from bnlab._files import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(doc, encoding="utf-8")
    return path
