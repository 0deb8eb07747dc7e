"""One-command reproductions of the tutorials' experiments (recipes in ``recipes/*.toml``)."""

from __future__ import annotations

import dataclasses
import math
import statistics

from bnlab.errors import ConfigError
from bnlab.experiments.analysis import compare, metric_name, rows, t_critical, welch
from bnlab.experiments.config import SweepConfig, load_recipe, recipe_names  # noqa: F401 (re-exported)
from bnlab.experiments.store import RunStore
from bnlab.experiments.sweep import run_sweep

def adapt(cfg: SweepConfig, epochs: int | None = None, seeds: int | None = None, dataset: str | None = None) -> SweepConfig:
    """The recipe with fewer epochs/seeds or another dataset; the sweep name records the change."""
    name = cfg.name
    fixed = dict(cfg.fixed)
    if epochs is not None:
        if epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {epochs}")
        fixed["epochs"] = epochs
        name += f"-e{epochs}"
    seed_list = list(cfg.seeds)
    if seeds is not None:
        if seeds < 1:
            raise ConfigError(f"--seeds must be at least 1, got {seeds}")
        seed_list = [cfg.seeds[0] + i for i in range(seeds)]
        name += f"-s{seeds}"
    ds = cfg.dataset
    if dataset is not None and dataset != cfg.dataset:
        ds = dataset
        name += f"-{dataset}"
    out = dataclasses.replace(cfg, name=name, dataset=ds, seeds=seed_list, fixed=fixed, grid=dict(cfg.grid),
                              claim=dict(cfg.claim), overrides=dict(cfg.overrides),
                              claim_dataset=cfg.claim_dataset or cfg.dataset)
    out.runs()
    return out


def _values_at(store: RunStore, run_ids: list[str], metric: str, epoch: int | None) -> tuple[list[float], int | None]:
    vals, at = [], None
    for rid in run_ids:
        eps = store.epochs(rid)
        if not eps:
            continue
        chosen = next((e for e in eps if e["epoch"] == epoch), None) if epoch else None
        chosen = chosen or eps[-1]
        at = chosen["epoch"]
        value = _metric_value(chosen, metric)
        if value is not None:
            vals.append(value)
    return vals, at


def runs_of(store: RunStore, cfg: SweepConfig) -> list[dict]:
    """Rows of exactly this config's runs: a sweep name reused with other settings (say fewer
    epochs) also holds other experiments, which must not be pooled with these."""
    scaled = {"lr"} if cfg.scale_lr_with_batch else set()  # each run's lr follows its batch size
    cases = cfg.full_cases()

    def belongs(r):
        return (r["seed"] in cfg.seeds and r.get("dataset") == cfg.dataset
                and all(r.get(k) == v for k, v in cfg.fixed.items() if k not in scaled)
                and all(r.get(k) in v for k, v in cfg.grid.items())
                and (not cases or any(all(r.get(k) == v for k, v in c.items()) for c in cases)))

    return [r for r in rows(store.runs(cfg.name)) if belongs(r)]


def _mean_of(runs: list[dict], key: str) -> float | None:
    """The mean of a final metric over the runs that have one (a run that diverged in its first
    epoch has none)."""
    vals = [r[key] for r in runs if r.get(key) is not None and math.isfinite(r[key])]
    return statistics.fmean(vals) if vals else None


def _level_runs(cfg: SweepConfig, flat: list[dict]) -> tuple[str, dict[str, list[dict]]]:
    """The levels a claim compares (the cases by label, else the values of ``by``) and their runs."""
    if cfg.cases:
        by, levels, level_of = "case", cfg.case_labels(), cfg.case_label
    else:
        by = (cfg.claim or {}).get("by", "bn")
        levels = [str(v) for v in cfg.grid.get(by, [cfg.fixed.get(by)])]

        def level_of(r):
            return str(r.get(by))
    out = {level: [] for level in levels}
    for r in flat:
        level = level_of(r)
        if level in out:
            out[level].append(r)
    return by, out


def _stats(vals: list[float]) -> dict:
    n = len(vals)
    std = statistics.stdev(vals) if n > 1 else None
    return {"n": n, "mean": statistics.fmean(vals) if vals else None, "std": std,
            "ci95": t_critical(n - 1) * std / math.sqrt(n) if n > 1 else None}


def comparison(store: RunStore, cfg: SweepConfig) -> dict:
    """Measured values next to the recipe's claim, per level of the claim's setting."""
    claim = cfg.claim or {}
    by = claim.get("by", "bn")
    metric = claim.get("metric", "test_acc")
    epoch = claim.get("epoch")
    flat = runs_of(store, cfg)
    levels = []
    for level in cfg.grid.get(by, [cfg.fixed.get(by)]):
        ids = [r["run_id"] for r in flat if r.get(by) == level and r["status"] in ("done", "diverged")]
        vals, at = _values_at(store, ids, metric, epoch)
        finals = [r for r in flat if r["run_id"] in ids]
        st = _stats(vals)
        levels.append({
            by: level, "n": st["n"], "claimed": (claim.get("values") or {}).get(str(level)),
            "measured_mean": st["mean"], "measured_std": st["std"], "measured_ci95": st["ci95"], "at_epoch": at,
            "final_train_acc": _mean_of(finals, "train_acc"),
            "final_test_acc": _mean_of(finals, "test_acc"),
            "diverged": sum(r["status"] == "diverged" for r in finals),
        })
    out = {"sweep": cfg.name, "dataset": cfg.dataset, "claim": claim.get("text", ""),
           "claim_dataset": claim.get("dataset") or cfg.claim_dataset or cfg.dataset, "by": by, "metric": metric,
           "epoch": epoch, "levels": levels, "tests": []}
    for m in dict.fromkeys([metric, "test_acc"]):
        try:
            out["tests"] += compare(flat, by, m)["tests"]
        except ConfigError:
            pass
    return out


def fig1_data(store: RunStore, cfg: SweepConfig) -> dict | None:
    """The data of the BN paper's Fig. 1 from a sweep with activation tracking (bn none vs with
    BN): ``{"accuracy": {label: [(step, mean test_acc over seeds)]}, "without": records,
    "with": records, "seeds": n}`` (percentile records of each side's first seed), or ``None``
    when the sweep has no tracked runs on both sides."""
    flat = [r for r in runs_of(store, cfg) if r["status"] in ("done", "diverged")]
    levels = cfg.grid.get("bn", [])
    if len(levels) < 2 or not flat:
        return None
    acc, examples = {}, {}
    for level in levels:
        runs = sorted((r for r in flat if r["bn"] == level), key=lambda r: r["seed"])
        per_step: dict[int, list[float]] = {}
        for r in runs:
            recs = store.activations(r["run_id"])
            for rec in recs:
                if rec["layer"] == "test":
                    per_step.setdefault(rec["step"], []).append(rec["test_acc"])
            if level not in examples and recs:
                examples[level] = recs
        label = "without BN" if level == "none" else f"with BN ({level})"
        acc[label] = [(step, statistics.fmean(v)) for step, v in sorted(per_step.items())]
    if len(examples) < 2:
        return None
    return {"accuracy": acc, "without": examples.get("none", examples[levels[0]]),
            "with": examples[[lv for lv in levels if lv != "none"][0]], "seeds": len(flat) // len(levels)}


DERIVED = {"test_error": lambda r: 1.0 - r["test_acc"], "train_test_gap": lambda r: r["train_acc"] - r["test_acc"]}


def _metric_value(r: dict, metric: str) -> float | None:
    """A run's final value of ``metric``; ``test_error`` is ``1 - test_acc``, ``train_test_gap``
    ``train_acc - test_acc`` (training-mode accuracy over the last epoch, with batch statistics,
    minus eval-mode accuracy on the test set)."""
    if metric in DERIVED:
        try:
            v = DERIVED[metric](r)
        except (KeyError, TypeError):
            return None
    else:
        v = r.get(metric)
    return v if v is not None and math.isfinite(v) else None


def axis_comparison(store: RunStore, cfg: SweepConfig) -> dict:
    """A claim about a numeric grid axis (``[claim] axis = "lr"``): the metric at every value of
    the axis for each level of ``by``, with 95% CIs over seeds and the diverged runs counted.

    With ``usable = f`` in the claim, a value of the axis is *usable* for a level when its mean
    is at least ``f`` times the best mean of the whole sweep and no run there diverged; the
    usable range of each level is reported (lowest to highest usable value, in decades) and the
    verdict says whether the level the claim names as ``wider`` has the widest range.
    """
    claim = cfg.claim or {}
    axis, metric = claim["axis"], claim.get("metric", "test_acc")
    flat = [r for r in runs_of(store, cfg) if r["status"] in ("done", "diverged")]
    by, level_runs = _level_runs(cfg, flat)  # the cases (linked settings) by label, else the values of by
    series = {}
    for level in level_runs:
        pts = []
        for x in sorted(cfg.grid.get(axis, [cfg.fixed.get(axis)])):
            runs = [r for r in level_runs[level] if r.get(axis) == x]
            vals = [v for r in runs if r["status"] == "done" and (v := _metric_value(r, metric)) is not None]
            pts.append({axis: x, "runs": len(runs), "diverged": sum(r["status"] == "diverged" for r in runs),
                        **_stats(vals), "values": vals})
        series[level] = pts
    out = {"sweep": cfg.name, "dataset": cfg.dataset, "claim": claim.get("text", ""),
           "claim_dataset": claim.get("dataset") or cfg.claim_dataset or cfg.dataset, "by": by, "axis": axis,
           "metric": metric, "series": series, "tests": []}
    usable = claim.get("usable")
    means = [p["mean"] for pts in series.values() for p in pts if p["mean"] is not None]
    if usable and means:
        threshold = usable * max(means)
        ranges = {}
        for level, pts in series.items():
            ok = [p[axis] for p in pts if p["mean"] is not None and p["mean"] >= threshold and not p["diverged"]]
            ranges[level] = ({"low": min(ok), "high": max(ok), "values": len(ok),
                              "decades": math.log10(max(ok) / min(ok)) if min(ok) > 0 else None} if ok else None)
        out["threshold"], out["ranges"] = threshold, ranges
        out["verdict"] = _range_verdict(claim, axis, ranges, usable)
    if claim.get("degrades") or claim.get("holds"):
        out["changes"] = {level: _end_change(pts) for level, pts in series.items()}
        out["verdict"] = _trend_verdict(claim, axis, metric, out["changes"])
    for pts in series.values():
        for p in pts:
            p.pop("values")
    return out


def _end_change(pts: list[dict]) -> dict | None:
    """The metric at the axis's smallest value minus at its largest, with Welch's 95% CI and p."""
    lo, hi = pts[0], pts[-1]
    if len(lo["values"]) < 1 or len(hi["values"]) < 1:
        return None
    diff, half, _, p = welch(lo["values"], hi["values"])
    return {"diff": diff, "ci95": half, "p": p, "n": (len(lo["values"]), len(hi["values"]))}


def _trend_verdict(claim: dict, axis: str, metric: str, changes: dict) -> str:
    """Whether the levels the claim says degrade (``degrades``) get significantly worse at the
    smallest value of the axis, and those it says hold (``holds``) change much less."""
    lower_better = metric.endswith(("error", "loss"))

    def worse(ch):  # how much worse at the small end, in the metric's units (positive = worse)
        return ch["diff"] if lower_better else -ch["diff"]

    pct = metric.endswith(("acc", "error"))

    def words(level, ch):
        if ch is None:
            return f"{level}: no finished runs at both ends"
        amount = f"{worse(ch) * 100:+.2f} points" if pct else f"{worse(ch):+.4g}"
        ci = f" ± {ch['ci95'] * 100:.2f}" if pct and not math.isnan(ch["ci95"]) else ""
        p = "" if math.isnan(ch["p"]) else f", p = {ch['p']:.2g}"
        return f"{level} {amount}{ci}{p}"

    head = (f"{metric_name(metric)} at the smallest {axis} vs the largest (positive = worse): "
            + "; ".join(words(lv, ch) for lv, ch in changes.items()))
    degrades = [lv for lv in claim.get("degrades", []) if changes.get(lv)]
    holds = [lv for lv in claim.get("holds", []) if changes.get(lv)]
    if not degrades or not holds:
        return head
    sig = [lv for lv in degrades if changes[lv]["p"] < 0.05 and worse(changes[lv]) > 0]
    gap = min(worse(changes[d]) for d in degrades) - max(worse(changes[h]) for h in holds)
    if len(sig) == len(degrades) and gap > 0:
        verdict = (f"Reproduces: {', '.join(degrades)} get significantly worse at small {axis} and "
                   f"{', '.join(holds)} by at least {gap * 100 if pct else gap:.2f}{' points' if pct else ''} less.")
    elif sig:
        verdict = f"Partly: {', '.join(sig)} get significantly worse, but not every claimed contrast holds."
    else:
        verdict = f"Does not reproduce at this scale: {', '.join(degrades)} do not get significantly worse."
    return f"{head}. {verdict}"


def _range_verdict(claim: dict, axis: str, ranges: dict, usable: float) -> str:
    def width(level):
        r = ranges.get(level)
        return -1.0 if r is None else (r["decades"] or 0.0)

    wider = str(claim.get("wider", ""))
    words = "; ".join(f"{claim.get('by', 'bn')}={lv}: " + (f"{r['low']:g} to {r['high']:g} ({r['decades']:.2f} decades)"
                                                           if r else "none")
                      for lv, r in ranges.items())
    head = f"usable {axis} (mean within {usable:.0%} of the best, no run diverged): {words}"
    if wider not in ranges:
        return head
    others = [lv for lv in ranges if lv != wider]
    if all(width(wider) > width(o) for o in others):
        return f"{head}. Reproduces: the range is wider with {claim.get('by', 'bn')}={wider}."
    if all(width(wider) >= width(o) for o in others):
        return f"{head}. Does not reproduce at this scale: the ranges are equally wide."
    return f"{head}. Does not reproduce: the range is narrower with {claim.get('by', 'bn')}={wider}."


EXPECTS = ("higher", "lower", "similar", "not_lower", "not_higher", "recovers")


def contrast_comparison(store: RunStore, cfg: SweepConfig) -> dict:
    """A claim made of contrasts between levels (``[[claim.contrasts]]``): each names a
    ``metric`` (a final metric such as ``test_acc``/``test_error``, or a run summary such as
    ``summary.beta``), two levels ``a`` and ``b`` (case labels, or values of the claim's ``by``)
    and what the claim expects of ``a`` against ``b``:

    - ``higher`` / ``lower``: significantly (Welch, p < 0.05) in that direction;
    - ``not_lower`` / ``not_higher``: not significantly in that direction;
    - ``similar``: the means differ by at most ``within`` (in the metric's units);
    - ``recovers``: ``b`` is significantly off the level ``of`` and ``a`` closes at least
      ``fraction`` (default 0.5) of that gap, significantly better than ``b``.

    A contrast that cannot be tested (a side with one finished run, or no spread at all) has
    ``holds = None`` and is counted as undecided.

    Returns ``{"levels": {level: {metric: stats}}, "contrasts": [...], "verdict"}``: every level's
    mean, std, 95% CI and n of each metric the contrasts use, each contrast with its difference
    ``a - b``, Welch CI and p and whether it ``holds``, and the verdict: "Reproduces" when every
    contrast holds, "Partly" when some do, "Does not reproduce" when none does.
    """
    claim = cfg.claim or {}
    contrasts = claim.get("contrasts") or []
    flat = [r for r in runs_of(store, cfg) if r["status"] in ("done", "diverged")]
    by, level_runs = _level_runs(cfg, flat)
    metrics = list(dict.fromkeys(c["metric"] for c in contrasts))

    def values(level, metric):
        return [v for r in level_runs.get(level, []) if r["status"] == "done" and (v := _metric_value(r, metric)) is not None]

    levels = {level: {m: _stats(values(level, m)) for m in metrics} | {"runs": len(runs), "diverged": sum(
        r["status"] == "diverged" for r in runs)} for level, runs in level_runs.items()}
    results = []
    for c in contrasts:
        a, b, metric, expect = str(c["a"]), str(c["b"]), c["metric"], c["expect"]
        if expect not in EXPECTS:
            raise ConfigError(f"claim contrast expects {expect!r}: choose one of {', '.join(EXPECTS)}")
        for level in (a, b, *([str(c["of"])] if expect == "recovers" else [])):
            if level not in level_runs:
                raise ConfigError(f"claim contrast names {level!r}, which is not a level of this sweep: "
                                  f"{', '.join(level_runs)}")
        va, vb = values(a, metric), values(b, metric)
        res = {"metric": metric, "a": a, "b": b, "expect": expect, "n": (len(va), len(vb)), "holds": None,
               "diff": None, "ci95": None, "p": None}
        if va and vb:
            diff, half, _, p = welch(va, vb)
            res.update(diff=diff, ci95=half, p=p)
            sig = not math.isnan(p) and p < 0.05
            if math.isnan(p) and expect != "similar":  # no test possible (one seed, or no spread): no verdict
                results.append(res)
                continue
            if expect == "higher":
                res["holds"] = sig and diff > 0
            elif expect == "lower":
                res["holds"] = sig and diff < 0
            elif expect == "not_lower":
                res["holds"] = not (sig and diff < 0)
            elif expect == "not_higher":
                res["holds"] = not (sig and diff > 0)
            elif expect == "similar":
                res["within"] = float(c["within"])
                res["holds"] = abs(diff) <= res["within"]
            else:
                ref = values(str(c["of"]), metric)
                res["of"], res["fraction_needed"] = str(c["of"]), float(c.get("fraction", 0.5))
                if ref:
                    gap, _, _, p_gap = welch(ref, vb)
                    res["gap"], res["gap_p"] = gap, p_gap
                    res["fraction"] = diff / gap if gap else math.nan
                    # a real gap (b significantly off the reference) that a closes significantly, far enough
                    res["holds"] = bool(gap and p_gap < 0.05 and sig and diff * gap > 0
                                        and res["fraction"] >= res["fraction_needed"])
        results.append(res)
    decided = [r for r in results if r["holds"] is not None]
    held = sum(bool(r["holds"]) for r in decided)
    open_ = len(results) - len(decided)
    undecided = (f" ({open_} undecided: too few finished runs or no spread to test)" if open_ else "")
    if not decided:
        verdict = "No verdict: no contrast has two finished runs with a spread on both sides."
    elif held == len(results):
        verdict = f"Reproduces: all {held} contrasts hold."
    elif held:
        verdict = f"Partly: {held} of {len(results)} contrasts hold{undecided}."
    else:
        verdict = f"Does not reproduce: none of the {len(results)} contrasts holds{undecided}."
    return {"sweep": cfg.name, "dataset": cfg.dataset, "claim": claim.get("text", ""),
            "claim_dataset": claim.get("dataset") or cfg.claim_dataset or cfg.dataset, "by": by,
            "metrics": metrics, "levels": levels, "contrasts": results, "verdict": verdict}


def contrast_words(c: dict) -> str:
    """One contrast of :func:`contrast_comparison` in words, e.g. ``BN vs Standard: beta lower by
    12.3 (± 4.5, p = 0.001) — holds``."""
    pct = c["metric"].endswith(("acc", "error", "gap"))
    name = metric_name(c["metric"])

    def amount(v):
        return f"{v * 100:+.2f} points" if pct else f"{v:+.4g}"

    wanted = {"higher": "higher", "lower": "lower", "not_lower": "not lower", "not_higher": "not higher",
              "similar": f"within {c.get('within', 0) * 100 if pct else c.get('within', 0):g}{' points' if pct else ''}",
              "recovers": f"recovers ≥ {c.get('fraction_needed', 0.5):.0%} of the gap to {c.get('of')}"}[c["expect"]]
    head = f"{name}, {c['a']} vs {c['b']} (claim: {wanted})"
    if c["diff"] is None:
        return f"{head}: no finished runs on both sides"
    if c["holds"] is None:
        return f"{head}: {amount(c['diff'])}, n = {c['n'][0]}/{c['n'][1]} — undecided (too few runs to test)"
    ci = "" if c["ci95"] is None or math.isnan(c["ci95"]) else f" ± {c['ci95'] * 100 if pct else c['ci95']:.3g}"
    p = "" if c["p"] is None or math.isnan(c["p"]) else f", p = {c['p']:.2g}"
    extra = (f", {c['fraction']:.0%} of the {abs(c['gap']) * 100 if pct else abs(c['gap']):.3g}{' point' if pct else ''}"
             f" gap" if c.get("fraction") is not None and not math.isnan(c["fraction"]) else "")
    return f"{head}: {amount(c['diff'])}{ci}{p}{extra}, n = {c['n'][0]}/{c['n'][1]} — " + (
        "holds" if c["holds"] else "does not hold")


def probe_series(store: RunStore, cfg: SweepConfig) -> dict:
    """The landscape probe's measures over training (``track_landscape`` runs), per level:
    ``{level: {"loss_range" | "beta" | "ics_l2" | "ics_cos": [(step, mean over seeds)]}}``
    (``ics_*`` averaged over the layers first); empty when no run was probed."""
    from bnlab.inspect.landscape import summarize_probes

    flat = [r for r in runs_of(store, cfg) if r["status"] in ("done", "diverged")]
    _, level_runs = _level_runs(cfg, flat)
    out = {}
    for level, runs in level_runs.items():
        per: dict[str, dict[int, list[float]]] = {}
        for r in runs:
            by_step: dict[int, list[dict]] = {}
            for rec in store.activations(r["run_id"]):
                if rec["layer"] == "landscape" or str(rec["layer"]).startswith("ics:"):
                    by_step.setdefault(rec["step"], []).append(rec)
            for step, recs in by_step.items():
                for k, v in summarize_probes(recs).items():
                    if k != "grad_change":
                        per.setdefault(k, {}).setdefault(step, []).append(v)
        if per:
            out[level] = {k: [(step, statistics.fmean(v)) for step, v in sorted(d.items())] for k, d in per.items()}
    return out


def claim_comparison(store: RunStore, cfg: SweepConfig) -> dict:
    """The comparison a recipe's claim asks for: :func:`contrast_comparison` for contrasts,
    :func:`axis_comparison` for a numeric axis, else :func:`comparison`."""
    claim = cfg.claim or {}
    if claim.get("contrasts"):
        return contrast_comparison(store, cfg)
    return axis_comparison(store, cfg) if claim.get("axis") else comparison(store, cfg)


def reproduce(name: str, store_path: str, *, epochs=None, seeds=None, dataset=None, data_dir=None, workers=1,
              executor="local", log=print, quick: bool = False) -> tuple[SweepConfig, dict]:
    """Run a recipe (resuming what the store has) and return its config and :func:`claim_comparison`.
    ``quick``: the recipe's ``--quick`` size (:meth:`SweepConfig.quick_size`). Figures are drawn
    by :mod:`bnlab.report.reproductions`."""
    cfg = load_recipe(name)
    cfg = adapt(cfg.quick_size() if quick else cfg, epochs, seeds, dataset)
    overrides = {"data_dir": data_dir} if data_dir else None
    run_sweep(cfg, store_path, workers=workers, executor=executor, overrides=overrides, log=log)
    with RunStore(store_path) as store:
        return cfg, claim_comparison(store, cfg)
