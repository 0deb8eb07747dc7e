"""Reading results back: one row per run, grouping over seeds, and the effect of one setting."""

from __future__ import annotations

import math
import statistics

from bnlab.errors import ConfigError
from bnlab.experiments.store import METRICS

SETTING_COLUMNS = ("model", "bn", "bn_impl", "norm", "activation", "optimizer", "lr", "schedule", "batch_size",
                   "epochs", "standardize", "augment", "dataset", "dropout", "virtual_batch_size",
                   "weight_decay", "momentum", "train_limit", "test_limit")


def _coerce(value: str, example):
    if isinstance(example, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(example, int):
        try:
            return int(value)
        except ValueError:
            return value
    if isinstance(example, float):
        try:
            return float(value)
        except ValueError:
            return value
    if example is None and value.lower() in ("none", "null"):
        return None
    return value


def parse_where(text: str | None) -> list[tuple[str, str]]:
    """``"bn=after,lr=0.01"`` -> [("bn", "after"), ("lr", "0.01")]."""
    if not text:
        return []
    out = []
    for part in text.split(","):
        if "=" not in part:
            raise ConfigError(f"--where {text!r}: each condition is key=value (e.g. bn=after,lr=0.01)")
        k, v = part.split("=", 1)
        out.append((k.strip(), v.strip()))
    return out


def rows(runs: list[dict], where=None) -> list[dict]:
    """Flat rows: run_id, status, seed, every setting, final metrics, total seconds."""
    out = []
    conds = parse_where(where) if isinstance(where, str) or where is None else where
    for r in runs:
        s = r["settings"]
        ok = True
        for k, v in conds:
            if k not in s and k not in ("status",):
                raise ConfigError(f"--where: unknown setting {k!r}; settings are {', '.join(sorted(s))}")
            actual = r["status"] if k == "status" else s[k]
            if actual != _coerce(v, actual):
                ok = False
        if not ok:
            continue
        row = {"run_id": r["run_id"], "status": r["status"], "seed": s["seed"]}
        row.update({k: v for k, v in s.items() if k != "seed"})
        for m in METRICS:
            row[m] = r["final"].get(m)
        row["epochs_done"] = r["epochs_done"]
        row.update({f"summary.{k}": v for k, v in r.get("summary", {}).items()})
        out.append(row)
    return out


def t_critical(df: float, level: float = 0.95) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, df)) if df > 0 else math.nan


def group(rows_: list[dict], by: list[str], metrics=METRICS) -> list[dict]:
    """Mean, std and 95% CI half-width over the seeds of each group (finished runs only)."""
    for k in by:
        if rows_ and k not in rows_[0]:
            raise ConfigError(f"--group-by: unknown setting {k!r}")
    groups: dict[tuple, list[dict]] = {}
    for r in rows_:
        if r["status"] not in ("done", "diverged"):
            continue
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    out = []
    for key, members in groups.items():
        g = dict(zip(by, key))
        g["runs"] = len(members)
        g["diverged"] = sum(m["status"] == "diverged" for m in members)
        for m in metrics:
            vals = [x[m] for x in members if x.get(m) is not None and math.isfinite(x[m])]
            n = len(vals)
            mean = statistics.fmean(vals) if vals else None
            std = statistics.stdev(vals) if n > 1 else (0.0 if n == 1 else None)
            g[f"{m}_mean"] = mean
            g[f"{m}_std"] = std
            g[f"{m}_ci95"] = t_critical(n - 1) * std / math.sqrt(n) if n > 1 else None
        out.append(g)
    return out


def compare(rows_: list[dict], by: str, metric: str = "test_acc") -> dict:
    """The effect of setting ``by`` on ``metric``: per level mean/std/CI over seeds, and a Welch
    t-test between every pair of levels, matched on all other settings being pooled."""
    from scipy import stats

    if rows_ and by not in rows_[0]:
        raise ConfigError(f"--by: unknown setting {by!r}")
    if rows_ and metric not in rows_[0]:
        raise ConfigError(f"--metric: unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    levels: dict = {}
    for r in rows_:
        if r["status"] == "done" and r.get(metric) is not None and math.isfinite(r[metric]):
            levels.setdefault(r[by], []).append(r[metric])
    if len(levels) < 2:
        raise ConfigError(f"compare needs finished runs at two or more values of {by!r}; found {list(levels) or 'none'}")
    summary = []
    for level, vals in levels.items():
        n = len(vals)
        std = statistics.stdev(vals) if n > 1 else 0.0
        summary.append({by: level, "n": n, "mean": statistics.fmean(vals), "std": std,
                        "ci95": t_critical(n - 1) * std / math.sqrt(n) if n > 1 else None})
    higher_is_better = not metric.endswith("loss") and metric != "seconds"
    summary.sort(key=lambda s: s["mean"], reverse=higher_is_better)
    tests = []
    for i in range(len(summary)):
        for j in range(i + 1, len(summary)):
            a, b = summary[i], summary[j]
            va, vb = levels[a[by]], levels[b[by]]
            if len(va) > 1 and len(vb) > 1 and (statistics.stdev(va) > 0 or statistics.stdev(vb) > 0):
                t, p = stats.ttest_ind(va, vb, equal_var=False)
                t, p = float(t), float(p)
            else:
                t, p = math.nan, math.nan
            diff = a["mean"] - b["mean"]
            tests.append({"a": a[by], "b": b[by], "diff": diff, "t": t, "p": p,
                          "verdict": verdict(by, a[by], b[by], diff, p, metric, len(va), len(vb))})
    return {"by": by, "metric": metric, "levels": summary, "tests": tests}


def verdict(by, a, b, diff, p, metric, na, nb) -> str:
    what = f"{by}={a} vs {by}={b}"
    amount = f"{abs(diff) * 100:.2f} points" if metric.endswith("acc") else f"{abs(diff):.4g}"
    better = "higher" if diff > 0 else "lower"
    if math.isnan(p):
        return (f"{what}: {metric} {better} by {amount}, but with {min(na, nb)} seed(s) per side "
                "there is no test; run more seeds (seeds = [0, 1, 2, ...])")
    if p < 0.01:
        strength = "a clear difference"
    elif p < 0.05:
        strength = "a significant difference"
    elif p < 0.10:
        strength = "weak evidence of a difference"
    else:
        return f"{what}: no significant difference in {metric} ({better} by {amount}, Welch p = {p:.3f})"
    return f"{what}: {strength}: {metric} {better} by {amount} (Welch t-test p = {p:.3g}, n = {na} and {nb})"
