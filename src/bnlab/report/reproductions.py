"""What `bnlab reproduce` shows: the claim next to the measured figures, and each recipe's figure."""

from __future__ import annotations

from pathlib import Path

from bnlab.experiments import RunStore
from bnlab.experiments.analysis import metric_name
from bnlab.experiments.config import SweepConfig
from bnlab.experiments.reproduce import fig1_data


def format_comparison(c: dict) -> str:
    """The claim, a table of claimed vs measured values per level, and the verdicts."""
    if "series" in c:
        return format_axis_comparison(c)
    if "contrasts" in c:
        return format_contrast_comparison(c)
    def pct(v):
        return "-" if v is None else f"{v * 100:.2f}%"

    reached = {lv["at_epoch"] for lv in c["levels"] if lv["at_epoch"]}
    at = f" @ epoch {c['epoch']}" if c["epoch"] and c["epoch"] in reached else " (final)"
    metric = c["metric"] + at
    notes = []
    if c["epoch"] and reached and c["epoch"] not in reached:
        notes.append(f"note: the claim is at epoch {c['epoch']}; these runs stopped at epoch "
                     f"{', '.join(map(str, sorted(reached)))}, so the measured values are final ones")
    if c.get("claim_dataset") and c["claim_dataset"] != c["dataset"]:
        notes.append(f"note: the claim is for {c['claim_dataset']}; these runs are on {c['dataset']}, so the claimed "
                     "numbers are not expected here (the shape of the result is what compares)")
    lines = [f"{c['sweep']} on {c['dataset']}", f"claim: {c['claim']}", *notes, "",
             f"{c['by']:<10} {'claimed':>9} {'measured ' + metric:>30} {'n':>3} {'final train':>12} {'final test':>11}"]
    for lv in c["levels"]:
        m = lv["measured_mean"]
        meas = "-" if m is None else f"{pct(m)}" + (f" ± {lv['measured_ci95'] * 100:.2f}" if lv["measured_ci95"] else "")
        if lv["at_epoch"] and c["epoch"] in reached and lv["at_epoch"] != c["epoch"]:
            meas += f" (epoch {lv['at_epoch']})"
        lines.append(f"{str(lv[c['by']]):<10} {pct(lv['claimed']):>9} {meas:>30} {lv['n']:>3} "
                     f"{pct(lv['final_train_acc']):>12} {pct(lv['final_test_acc']):>11}"
                     + (f"  (+{lv['diverged']} diverged)" if lv.get("diverged") else ""))
    lines.append("(± is the 95% confidence half-width over seeds)")
    if c.get("figure"):
        lines.append(f"figure written to {c['figure']}")
    lines += [""] + [t["verdict"] for t in c["tests"]]
    return "\n".join(lines)


def format_axis_comparison(c: dict) -> str:
    """An :func:`~bnlab.experiments.reproduce.axis_comparison` as text: one row per value of the
    axis, one column per level (mean ± 95% CI, diverged runs counted), then the verdict."""
    pct = c["metric"].endswith(("acc", "error"))

    def cell(p):
        if p["mean"] is None:
            return f"diverged ({p['diverged']}/{p['runs']})" if p["diverged"] else "-"
        text = f"{p['mean'] * 100:.2f}%" if pct else f"{p['mean']:.4g}"
        if p["ci95"]:
            text += f" ± {p['ci95'] * 100:.2f}" if pct else f" ± {p['ci95']:.2g}"
        return text + (f" ({p['diverged']} div.)" if p["diverged"] else "")

    levels = list(c["series"])
    head = [f"{c['sweep']} on {c['dataset']}", f"claim: {c['claim']}", "",
            f"{c['axis']:>10} " + " ".join(f"{lv if c['by'] == 'case' else c['by'] + '=' + lv:>24}" for lv in levels)]
    xs = [p[c["axis"]] for p in c["series"][levels[0]]]
    rows = [f"{x:>10g} " + " ".join(f"{cell(c['series'][lv][i]):>24}" for lv in levels) for i, x in enumerate(xs)]
    tail = [f"({metric_name(c['metric'])} of the final epoch; ± is the 95% confidence half-width over seeds)"]
    if c.get("figure"):
        tail.append(f"figure written to {c['figure']}")
    if c.get("verdict"):
        tail += ["", c["verdict"]]
    return "\n".join(head + rows + tail)


def format_contrast_comparison(c: dict) -> str:
    """A :func:`~bnlab.experiments.reproduce.contrast_comparison` as text: one row per level with
    each metric's mean ± 95% CI, then each contrast in words, then the verdict."""
    from bnlab.experiments.reproduce import contrast_words

    def cell(st, metric):
        if st["mean"] is None:
            return "-"
        pct = metric.endswith(("acc", "error", "gap"))
        text = f"{st['mean'] * 100:.2f}%" if pct else f"{st['mean']:.4g}"
        if st["ci95"]:
            text += f" ± {st['ci95'] * 100:.2f}" if pct else f" ± {st['ci95']:.2g}"
        return text

    width = max([len(lv) for lv in c["levels"]] + [10])
    names = [metric_name(m) for m in c["metrics"]]
    lines = [f"{c['sweep']} on {c['dataset']}", f"claim: {c['claim']}"]
    if c.get("claim_dataset") and c["claim_dataset"] != c["dataset"]:
        lines.append(f"note: the claim is for {c['claim_dataset']}; these runs are on {c['dataset']}, so the claimed "
                     "numbers are not expected here (the shape of the result is what compares)")
    lines += ["", f"{c['by']:<{width}} " + " ".join(f"{n:>22}" for n in names) + "    n"]
    for lv, st in c["levels"].items():
        n = max((st[m]["n"] for m in c["metrics"]), default=0)
        lines.append(f"{lv:<{width}} " + " ".join(f"{cell(st[m], m):>22}" for m in c["metrics"]) + f" {n:>4}"
                     + (f"  (+{st['diverged']} diverged)" if st.get("diverged") else ""))
    lines.append("(final values; ± is the 95% confidence half-width over seeds)")
    if c.get("figure"):
        lines.append(f"figure written to {c['figure']}")
    lines += [""] + [f"- {contrast_words(x)}" for x in c["contrasts"]] + ["", c["verdict"]]
    return "\n".join(lines)


def reproduction_figure(store: RunStore, cfg: SweepConfig, path: str | Path) -> Path | None:
    """The recipe's own figure, if it has one: the BN paper's Fig. 1 (ioffe), the metric
    against a numeric grid axis (a claim with ``axis``), or the levels' bars and landscape
    probes of a claim made of contrasts; else ``None``."""
    from bnlab.report.plots import contrast_figure, ioffe_fig1, metric_vs_axis

    if (cfg.claim or {}).get("contrasts"):
        from bnlab.experiments.reproduce import contrast_comparison, probe_series

        c = contrast_comparison(store, cfg)
        return contrast_figure(c["levels"], c["metrics"], path, probes=probe_series(store, cfg),
                               title=f"{cfg.name} on {cfg.dataset}: mean of {len(cfg.seeds)} seed(s), 95% CI")

    if (cfg.claim or {}).get("axis"):
        from bnlab.experiments.reproduce import axis_comparison

        c = axis_comparison(store, cfg)
        return metric_vs_axis(c["series"], c["axis"], c["metric"], path, by=c["by"], threshold=c.get("threshold"),
                              title=f"{cfg.name} on {cfg.dataset}: mean of {len(cfg.seeds)} seed(s), 95% CI")
    if not cfg.fixed.get("track_activations"):
        return None
    data = fig1_data(store, cfg)
    if data is None:
        return None
    return ioffe_fig1(data["accuracy"], data["without"], data["with"], path,
                      title=f"{cfg.name} on {cfg.dataset}: Fig. 1 of Ioffe & Szegedy (accuracy: mean of "
                            f"{data['seeds']} seed(s); percentiles: first seed)")
