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
from bnlab.experiments.analysis import check_where_matches, mixture_note, sort_rows, strata, t_critical, varying
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
        if 0 < abs(v) < 0.001:
            return f"{v:.2g}"  # a learning rate of 1e-05, not 0.0000
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


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


# table headers in words; a metric column (test_acc, test_acc_mean, ...) is named by metric_name
COLUMN_LABELS = {"run_id": "run", "epochs_done": "epochs done", "seconds": "seconds (total)", "ci95": "± 95% CI"}


def _column_label(column: str) -> str:
    from bnlab.report.plots import metric_name

    for m in ("train_acc", "test_acc", "train_loss", "test_loss"):
        if column.startswith(m):
            stat = column[len(m) + 1:]
            return f"{metric_name(m)} {COLUMN_LABELS.get(stat, stat)}".strip()
    return COLUMN_LABELS.get(column, column)


def _html_table(records: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(_column_label(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c), c))}</td>" for c in columns) + "</tr>"
                   for r in records)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _settings_table(config: dict) -> str:
    """A sweep config as a table of setting | value(s) | gridded, the gridded settings first."""
    def words(v):
        return ", ".join(map(words, v)) if isinstance(v, list) else v if isinstance(v, str) else json.dumps(v)

    grid = config.get("grid", {})
    others = {**{k: v for k, v in config.items() if k not in ("name", "description", "claim", "fixed", "grid")},
              **config.get("fixed", {})}
    records = ([{"setting": k, "value(s)": words(v), "gridded": f"yes ({len(v)} values)"} for k, v in grid.items()]
               + [{"setting": k, "value(s)": words(v), "gridded": ""} for k, v in others.items()])
    return f"<div class='settings'>{_html_table(records, ['setting', 'value(s)', 'gridded'])}</div>"


def _settings(cfg: dict, versions: list[dict]) -> list[str]:
    """Every config version the sweep was run with (one when it never changed), as tables."""
    if len(versions) < 2:
        return ["<h2>Settings</h2>", _settings_table(cfg)]
    parts = ["<h2>Settings</h2>",
             f"<p><b>This sweep was run with {len(versions)} configs</b>; runs of different configs are "
             "different experiments and are never pooled:</p><ul>"
             + "".join(f"<li>{html.escape(line)}</li>" for line in config_changes(versions)) + "</ul>"]
    for v in versions:
        parts += [f"<h3>config version {v['version']} ({len(v['run_ids'])} runs)</h3>", _settings_table(v["config"])]
    return parts


def _judge(level: dict, epoch: int | None) -> str:
    """Whether a claimed value is what one run gives. A tutorial reports a single run, so its value
    reproduces when it lies where 95% of single runs fall: mean ± t·s·√(1 + 1/n) over the seeds
    (the CI of the mean would call every claim wrong once enough seeds are run). With 2 seeds t is
    12.7 and anything would pass, so it takes 3 or more."""
    if level["claimed"] is None:
        return "no number claimed"
    if level["measured_mean"] is None:
        return "no finished runs yet"
    if epoch and level["at_epoch"] != epoch:
        return f"not comparable: the runs end at epoch {level['at_epoch']}, the claim is at epoch {epoch}"
    n = level["n"]
    if n < 3:
        return f"{n} seed(s): too few to judge, run 3 or more"
    spread = t_critical(n - 1) * level["measured_std"] * math.sqrt(1 + 1 / n)
    return "reproduces" if abs(level["claimed"] - level["measured_mean"]) <= spread else "does not reproduce"


def _claimed_difference(c: dict, runs: list[dict]) -> tuple[str, str] | None:
    """For a claim of two or more values: ``(status, words)`` of the Welch test between the two
    levels claimed highest, status ``same`` (significant, the claimed way round), ``reversed``
    (significant, the other way) or ``unclear``; None for a claim of one value."""
    by = c["by"]
    claimed = sorted((lv for lv in c["levels"] if lv["claimed"] is not None), key=lambda lv: -lv["claimed"])
    if len(claimed) < 2:
        return None
    a, b = claimed[0][by], claimed[1][by]
    said = (f"Claimed: {by}={a} higher than {by}={b} by {(claimed[0]['claimed'] - claimed[1]['claimed']) * 100:.2f} "
            "points. Measured: ")
    try:
        measured = compare([r for r in runs if r[by] in (a, b)], by, c["metric"])
    except ConfigError as e:
        return "unclear", f"{said}no test ({e})"
    higher = max(measured["levels"], key=lambda lv: lv["mean"])[by]
    status = "unclear" if not measured["tests"][0]["p"] < 0.05 else "same" if higher == a else "reversed"
    return status, said + _effect_words(measured)


def _claim_verdict(c: dict, runs: list[dict]) -> str:
    """The claim, the measured value (95% CI of the mean) next to each claimed one, and the verdict.
    ``c`` is :func:`~bnlab.experiments.reproduce.comparison` of the recipe, ``runs`` its rows."""
    from bnlab.report.plots import metric_name

    def pct(v):
        return "-" if v is None else f"{v * 100:.2f}%"

    by = c["by"]
    measured = f"measured {metric_name(c['metric'])}" + (f" at epoch {c['epoch']}" if c["epoch"] else " (final)")
    records = [{by: lv[by], "claimed": pct(lv["claimed"]), "seeds": lv["n"], "verdict": _judge(lv, c["epoch"]),
                measured: pct(lv["measured_mean"]) + (f" ± {ci * 100:.2f}" if (ci := lv["measured_ci95"]) else "")}
               for lv in c["levels"]]
    verdicts = {r["verdict"] for r in records}
    status, difference = _claimed_difference(c, runs) or (None, "")
    difference = f"<p class='answer'>{html.escape(difference)}</p>" if difference else ""
    if verdicts == {"no number claimed"}:
        answer = "states no number: judge it by the measured effect"
        difference = _effect_verdict(runs, by, c["metric"])
    elif not verdicts & {"reproduces", "does not reproduce"}:
        answer = "is not judged (see the table)"
    elif "does not reproduce" in verdicts or status == "reversed":
        answer = "does not reproduce"
    elif status == "unclear":
        answer = "partly reproduces: the values do, the claimed difference is not significant here"
    else:
        answer = "reproduces"
    return (f"<p class='answer'>Claim: {html.escape(c['claim'])}</p>"
            f"<p class='answer'>Verdict: the claim <b>{html.escape(answer)}</b></p>" + difference
            + _html_table(records, [by, "claimed", measured, "seeds", "verdict"])
            + "<p class='note'>± is the 95% CI of the mean over seeds. A claim is one run, so a claimed value "
              "reproduces when it lies where 95% of single runs fall (mean ± t·s·√(1 + 1/n)).</p>")


def _effect_words(c: dict) -> str:
    """compare()'s best level against the next best in words: ``bn=after is better than bn=none by
    3.10 points of test accuracy (95% CI 1.20 to 5.00), Welch p = 0.002``."""
    from bnlab.report.plots import metric_name

    by, t = c["by"], c["tests"][0]
    best, second = c["levels"][0], c["levels"][1]  # compare() sorts the levels best first
    scale, unit, digits = (100, " points", ".2f") if c["metric"].endswith("acc") else (1, "", ".3g")
    gain = abs(t["diff"]) * scale
    what = f"{by}={t['a']} is ahead of {by}={t['b']} by {gain:{digits}}{unit} of {metric_name(c['metric'])}"
    if len(c["levels"]) > 2:
        what += f" (the best two of {len(c['levels'])} values; every pair is tested below)"
    if math.isnan(t["p"]):
        return f"{what}, but with {min(best['n'], second['n'])} seed(s) per side there is no test: run more seeds"
    half = t["diff_ci95"] * scale
    numbers = f"(95% CI {gain - half:{digits}} to {gain + half:{digits}}), Welch p = {t['p']:.2g}"
    if t["p"] < 0.05:
        return f"{what.replace(' is ahead of ', ' is better than ', 1)} {numbers}"
    return f"No clear difference: {what} {numbers}"


def _effect_verdict(flat: list[dict], by: str, metric: str = "test_acc") -> str:
    """The effect of ``by`` in words, once per experiment (combination of the other varied settings)."""
    out = []
    for fixed, part in strata(flat, by):
        where = ", ".join(f"{k}={v}" for k, v in fixed.items())
        lead = f"<b>Runs with {html.escape(where)}:</b> " if where else ""
        try:
            out.append(f"<p class='answer'>{lead}{html.escape(_effect_words(compare(part, by, metric)))}</p>")
        except ConfigError as e:
            out.append(f"<p class='answer'>{lead}no comparison of {html.escape(by)}: {html.escape(str(e))}</p>")
    return "".join(out)


def _comparisons(flat: list[dict], by: str, metrics: list[str]) -> list[str]:
    """Per experiment and metric: each level of ``by`` (mean, std, CI over seeds) and every Welch test."""
    from bnlab.report.plots import metric_name

    parts = []
    for fixed, part in strata(flat, by):
        where = ", ".join(f"{k}={v}" for k, v in fixed.items())
        for metric in metrics:
            title = html.escape(f"Effect of {by} on {metric_name(metric)}" + (f" (runs with {where})" if where else ""))
            try:
                c = compare(part, by, metric)
            except ConfigError as e:
                parts.append(f"<p>{title}: no comparison: {html.escape(str(e))}</p>")
                continue
            parts += [f"<h3>{title}</h3>", _html_table(c["levels"], [by, "n", "mean", "std", "ci95"]),
                      "<ul>" + "".join(f"<li>{html.escape(t['verdict'])}</li>" for t in c["tests"]) + "</ul>"]
    return parts


STYLE = """body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child,.settings td,.settings th{text-align:left}img{max-width:100%}
#verdict{background:#eef5ff;border-left:5px solid #3a6fd8;padding:.2em 1em 1em;margin:1em 0}
.answer{font-size:1.1em}.note{color:#555;font-size:.9em}"""


def html_report(store: RunStore, sweep: str, path: str | Path, by: str | None = None) -> Path:
    """One self-contained HTML file (figures as data URIs, plotly.js inlined; nothing is fetched),
    in the order a reader wants: the verdict (the recipe's claim against the measurement, or else
    the effect of ``by`` with its Welch test), the figures, the settings, then the tables.

    When the sweep holds different experiments (its config changed under the same name, so runs
    differ in more than the compared setting and the seed), every config version is shown and
    the effect of ``by`` is tested separately within each experiment.
    """
    from bnlab.experiments.config import SweepConfig
    from bnlab.experiments.reproduce import (axis_comparison, comparison, contrast_comparison, contrast_words,
                                             probe_series, runs_of)
    from bnlab.report.interactive import sweep_view
    from bnlab.report.plots import contrast_figure, metric_name, metric_vs_axis

    cfg = store.sweep_config(sweep)
    versions = store.sweep_versions(sweep)
    flat = rows(store.runs(sweep))
    finished = [r for r in flat if r["status"] in ("done", "diverged")]
    varied = list(varying(finished))
    gridded = [k for k in cfg.get("grid", {}) if k in varied]
    by = by or (gridded or varied or [None])[0]
    claim = cfg.get("claim") or {}
    along = None  # a claim about a numeric setting: its comparison, drawn against that setting
    contrasted = None  # a claim made of contrasts between levels: its comparison and the probes' curves
    if claim.get("text"):
        recipe = SweepConfig(cfg["name"], cfg["dataset"], cfg["seeds"], cfg.get("fixed", {}), cfg.get("grid", {}),
                             claim, cases=cfg.get("cases", []), scale_lr_with_batch=cfg.get("scale_lr_with_batch"))
        if claim.get("contrasts"):
            contrasted = contrast_comparison(store, recipe), probe_series(store, recipe)
            items = "".join(f"<li>{html.escape(contrast_words(x))}</li>" for x in contrasted[0]["contrasts"])
            verdict = (f"<p class='answer'>Claim: {html.escape(claim['text'])}</p><ul>{items}</ul>"
                       f"<p class='answer'>{html.escape(contrasted[0]['verdict'])}</p>")
        elif claim.get("axis"):
            along = axis_comparison(store, recipe)
            verdict = (f"<p class='answer'>Claim: {html.escape(claim['text'])}</p>"
                       f"<p class='answer'>{html.escape(along.get('verdict') or 'No verdict: too few finished runs.')}"
                       "</p>")
        else:
            verdict = _claim_verdict(comparison(store, recipe), runs_of(store, recipe))
    elif by:
        verdict = _effect_verdict(flat, by)
    else:
        verdict = ("<p class='answer'>Every finished run has the same settings: there is nothing to compare.</p>"
                   if finished else "<p class='answer'>No run of this sweep has finished yet.</p>")
    parts = [f"<h1>bnlab sweep: {html.escape(sweep)}</h1>", f"<p>{html.escape(cfg.get('description') or '')}</p>",
             f'<section id="verdict"><h2>Verdict</h2>{verdict}</section>']
    view = sweep_view(finished, varied)
    if view:
        parts += ["<h2>Every run at a glance</h2>",
                  "<p class='note'>Interactive: hover for values, drag along an axis to select runs.</p>", view]
    with tempfile.TemporaryDirectory() as tmp:
        if along is not None:
            png = metric_vs_axis(along["series"], along["axis"], along["metric"], Path(tmp) / "axis.png",
                                 by=along["by"], threshold=along.get("threshold"),
                                 title=f"{sweep}: mean over seeds, 95% CI")
            what = f"{metric_name(along['metric']).capitalize()} against {along['axis'].replace('_', ' ')}"
            parts += [f"<h2>{what}</h2>", _img(png, what)]
        if contrasted is not None:
            c, probes = contrasted
            png = contrast_figure(c["levels"], c["metrics"], Path(tmp) / "contrasts.png", probes=probes,
                                  title=f"{sweep}: mean over seeds, 95% CI")
            what = "The compared levels" + (" and the landscape probes over training" if probes else "")
            parts += [f"<h2>{what}</h2>", _img(png, what)]
        for metric in ("test_acc", "train_acc", "test_loss"):
            try:
                png = plot_sweep(store, sweep, Path(tmp) / f"{metric}.png", metric, varied)
                parts += [f"<h2>{metric_name(metric).capitalize()} over epochs</h2>", _img(png, metric_name(metric))]
            except ConfigError:
                break
    parts += _settings(cfg, versions)
    if varied:
        cols = varied + ["runs"] + [f"{m}_{s}" for m in ("train_acc", "test_acc") for s in ("mean", "std", "ci95")]
        parts += ["<h2>Mean over seeds</h2>", _html_table(group(flat, varied), cols)]
    if by:
        # held-out accuracy always; the claim's own metric too when it is another one
        parts += ["<h2>Comparisons</h2>"] + _comparisons(flat, by, list(dict.fromkeys([claim.get("metric", "test_acc"),
                                                                                         "test_acc"])))
    cols = ["run_id", "status"] + varied + ["seed", "epochs_done", "train_acc", "test_acc", "test_loss", "seconds"]
    parts += ["<h2>Runs</h2>", _html_table([{**r, "run_id": r["run_id"][:8]} for r in flat], cols)]
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>bnlab: {html.escape(sweep)}</title>"
           f"<style>{STYLE}</style></head><body>" + "\n".join(parts) + "</body></html>")
    from bnlab._files import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(doc, encoding="utf-8")
    return path
