"""Reading results back: one row per run, grouping over seeds, and the effect of one setting."""

from __future__ import annotations

import json
import math
import statistics

from bnlab.errors import ConfigError, suggest
from bnlab.experiments.config import NOT_IDENTITY
from bnlab.experiments.store import METRICS

# columns of a row that are not settings of the run
RESULT_COLUMNS = {"run_id", "status", "seed", "epochs_done", "config_versions", *METRICS}


def setting_columns(rows_: list[dict]) -> list[str]:
    """The settings among the columns of ``rows_`` (not the seed, the results or where the data lives)."""
    if not rows_:
        return []
    return [k for k in rows_[0] if k not in RESULT_COLUMNS and k not in NOT_IDENTITY and not k.startswith("summary.")]


def varying(rows_: list[dict], exclude=()) -> dict[str, list]:
    """Settings that take more than one value among ``rows_`` (besides ``exclude`` and the seed),
    with their values: the things that make runs *different experiments*, not seeds of one."""
    out = {}
    for k in setting_columns(rows_):
        if k in exclude:
            continue
        values = {json.dumps(r.get(k), sort_keys=True): r.get(k) for r in rows_}
        if len(values) > 1:
            out[k] = sorted(values.values(), key=lambda v: (v is None, str(type(v)), v if v is not None else 0))
    return out


def mixture_note(extra: dict[str, list], by, rows_: list[dict] | None = None) -> str:
    """One line saying which other settings differ, and how to pick one experiment: a ``--where``
    naming every one of them, with the values of the last of ``rows_`` (a combination that
    exists), or each one's last value without rows."""
    if not extra:
        return ""
    what = "; ".join(f"{k} = {', '.join(map(str, v))}" for k, v in extra.items())
    last = rows_[-1] if rows_ else {}
    pick = ",".join(f"{k}={last.get(k, v[-1]) if rows_ else v[-1]}" for k, v in extra.items())
    return (f"these runs also differ in {what} (besides {', '.join(by) or 'the seed'}): they are different "
            f"experiments, not seeds of one; choose one with --where {pick}")


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
    """``"bn=after,lr=0.01"`` -> [("bn", "after"), ("lr", "0.01")].

    The values stay strings: :func:`rows` converts each to the type of the setting it is
    compared with. ``status`` is accepted as a key too (``status=failed``).

    Args:
        text: comma-separated ``key=value`` conditions (``None`` or ``""``: none).

    Returns:
        ``[(key, value), ...]`` with surrounding spaces stripped.

    Raises:
        ConfigError: a condition without ``=``.

    Example::

        parse_where("bn=after, lr=0.01")   # [('bn', 'after'), ('lr', '0.01')]
    """
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
    """Flat rows: run_id, status, seed, every setting, final metrics, total seconds.

    Settings a run was stored without (it predates a setting) take the value it ran with (for
    ``device``, ``cpu``) or the setting's default, so an added setting does not make old and new
    runs look like different experiments.

    Args:
        runs: run dicts as :meth:`RunStore.runs` returns them.
        where: only the runs matching these conditions: a ``"bn=after,lr=0.01"`` string or
            :func:`parse_where` pairs (``None``: every run).

    Returns:
        One dict per run: ``run_id``, ``status``, ``seed``, each setting, the final epoch's
        metrics (``train_loss`` ... ``test_acc``; ``seconds`` is the total), ``epochs_done``,
        ``config_versions`` and ``summary.<key>`` for each summary value (e.g. ``summary.ics_w1``).

    Raises:
        ConfigError: a ``where`` key that is neither a setting nor ``status``.

    Example::

        with RunStore("runs/bnlab.db", create=False) as store:
            after = rows(store.runs("deeplizard-bn"), where="bn=tutorial")
    """
    from bnlab.train.settings import added_settings, settings_fields

    # a setting a run lacks: the value it really ran with if the setting came later, else the default
    defaults = {**{f.name: f.default for f in settings_fields()}, **added_settings()}
    out = []
    conds = parse_where(where) if isinstance(where, str) or where is None else where
    for r in runs:
        s = {**defaults, **r["settings"]}
        ok = True
        for k, v in conds:
            if k not in s and k not in ("status",):
                raise ConfigError(f"--where: unknown setting {k!r}{suggest(k, sorted(s))}; settings are "
                                  f"{', '.join(sorted(s))}")
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
        if "config_versions" in r:
            row["config_versions"] = r["config_versions"]
        row.update({f"summary.{k}": v for k, v in r.get("summary", {}).items()})
        out.append(row)
    return out


def check_where_matches(runs: list[dict], where, selected: list[dict]) -> None:
    """An error when ``--where`` matched nothing, naming the values that exist."""
    conds = parse_where(where) if isinstance(where, str) or where is None else where
    if not conds or selected or not runs:
        return
    every = rows(runs)
    hints = []
    for k, v in conds:
        values = sorted({str(r.get(k, r["status"] if k == "status" else None)) for r in every})
        hints.append(f"{k} is one of {', '.join(values)}{suggest(v, values)}")
    raise ConfigError(f"--where {','.join(f'{k}={v}' for k, v in conds)} matches no run: " + "; ".join(hints))


def t_critical(df: float, level: float = 0.95) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, df)) if df > 0 else math.nan


def group(rows_: list[dict], by: list[str], metrics=METRICS) -> list[dict]:
    """Mean, std and 95% CI half-width over the seeds of each group (finished runs only).

    A group holds runs whose settings are all equal but for the seed: any other setting that
    varies among ``rows_`` is added to ``by`` (see :func:`varying` and :func:`mixture_note`), so
    runs of different experiments are never averaged together.

    Args:
        rows_: rows from :func:`rows`; runs not ``done`` or ``diverged`` are left out.
        by: the settings to group by.
        metrics: the columns to summarize (non-finite values are skipped).

    Returns:
        One dict per group: its ``by`` (and other varying) settings, ``runs``, ``diverged``, and
        ``<metric>_mean``, ``<metric>_std`` and ``<metric>_ci95`` (Student t half-width; None
        with fewer than two values) for each metric.

    Raises:
        ConfigError: a ``by`` setting that the rows do not have.

    Example::

        for g in group(rows(store.runs("deeplizard-bn")), ["bn"]):
            print(g["bn"], g["runs"], g["test_acc_mean"], g["test_acc_ci95"])
    """
    for k in by:
        if rows_ and k not in rows_[0]:
            raise ConfigError(f"--group-by: unknown setting {k!r}{suggest(k, setting_columns(rows_))}")
    finished = [r for r in rows_ if r["status"] in ("done", "diverged")]
    keys = list(by) + [k for k in varying(finished, exclude=by)]
    groups: dict[tuple, list[dict]] = {}
    for r in finished:
        groups.setdefault(tuple(json.dumps(r[k], sort_keys=True) for k in keys), []).append(r)
    out = []
    for members in groups.values():
        g = {k: members[0][k] for k in keys}
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


def strata(rows_: list[dict], by: str) -> list[tuple[dict, list[dict]]]:
    """The rows split into experiments that differ only in ``by`` and the seed: one
    ``(fixed settings, rows)`` pair per combination of every other setting that varies."""
    extra = list(varying([r for r in rows_ if r["status"] in ("done", "diverged")], exclude=(by,)))
    parts: dict[str, tuple[dict, list[dict]]] = {}
    for r in rows_:
        fixed = {k: r[k] for k in extra}
        parts.setdefault(json.dumps(fixed, sort_keys=True), (fixed, []))[1].append(r)
    return list(parts.values())


def compare(rows_: list[dict], by: str, metric: str = "test_acc") -> dict:
    """The effect of setting ``by`` on ``metric``: per level mean/std/CI over seeds, and a Welch
    t-test between every pair of levels.

    Only runs that differ in ``by`` and the seed are compared: if any other setting varies
    among ``rows_`` (say 1- and 2-epoch runs of the same sweep) this refuses with a message that
    says how to choose (``--where epochs=2``); :func:`strata` splits such rows for callers that
    want every comparison.

    Args:
        rows_: rows from :func:`rows`; only ``done`` runs with a finite ``metric`` count.
        by: the setting whose levels are compared (e.g. ``bn``).
        metric: a metric column, or a ``summary.<key>`` column.

    Returns:
        ``{"by", "metric", "levels", "tests", "fixed"}``: ``levels`` are ``{by: level, "n",
        "mean", "std", "ci95"}``, best first (accuracies high, losses and seconds low);
        ``tests`` are ``{"a", "b", "diff", "diff_ci95", "t", "p", "verdict"}`` per pair of levels
        (``diff_ci95`` is the Welch 95% CI half-width of ``diff``; it, ``t`` and ``p`` are NaN
        without two seeds and some spread on a side); ``fixed`` the other
        settings of the first row.

    Raises:
        ConfigError: an unknown ``by`` or ``metric``, fewer than two levels with finished runs,
            or another setting that varies among the rows.

    Example::

        res = compare(rows(store.runs("deeplizard-bn")), "bn", "test_acc")
        print(res["tests"][0]["verdict"])
    """
    if rows_ and by not in rows_[0]:
        raise ConfigError(f"--by: unknown setting {by!r}{suggest(by, setting_columns(rows_))}")
    if rows_ and metric not in rows_[0]:
        known = [*METRICS, *(k for k in rows_[0] if k.startswith("summary."))]
        raise ConfigError(f"--metric: unknown metric {metric!r}{suggest(metric, known)}; choose one of {', '.join(known)}")
    levels: dict = {}
    for r in rows_:
        if r["status"] == "done" and r.get(metric) is not None and math.isfinite(r[metric]):
            levels.setdefault(r[by], []).append(r[metric])
    if len(levels) < 2:
        raise ConfigError(f"compare needs finished runs at two or more values of {by!r}; found {list(levels) or 'none'}")
    done = [r for r in rows_ if r["status"] == "done"]
    extra = varying(done, exclude=(by,))
    if extra:
        raise ConfigError(f"cannot compare {by}: {mixture_note(extra, [by], done)}")
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
            diff, half, t, p = welch(va, vb)
            tests.append({"a": a[by], "b": b[by], "diff": diff, "diff_ci95": half, "t": t, "p": p,
                          "verdict": verdict(by, a[by], b[by], diff, p, metric, len(va), len(vb))})
    fixed = {k: v for k, v in (rows_[0].items() if rows_ else ()) if k in setting_columns(rows_) and k != by}
    return {"by": by, "metric": metric, "levels": summary, "tests": tests, "fixed": fixed}


def welch(va: list[float], vb: list[float]) -> tuple[float, float, float, float]:
    """``(mean(va) - mean(vb), 95% CI half-width of that difference, t, p)`` of Welch's t-test
    (Welch-Satterthwaite degrees of freedom); the last three are NaN with fewer than two values
    on a side or no spread at all."""
    diff = statistics.fmean(va) - statistics.fmean(vb)
    if len(va) < 2 or len(vb) < 2 or (statistics.stdev(va) == 0 and statistics.stdev(vb) == 0):
        return diff, math.nan, math.nan, math.nan
    import warnings

    from scipy import stats

    with warnings.catch_warnings():  # identical values on one side (every run at chance) are fine here
        warnings.simplefilter("ignore", RuntimeWarning)
        t, p = stats.ttest_ind(va, vb, equal_var=False)
    sa, sb = statistics.variance(va) / len(va), statistics.variance(vb) / len(vb)
    df = (sa + sb) ** 2 / (sa ** 2 / (len(va) - 1) + sb ** 2 / (len(vb) - 1))
    return diff, t_critical(df) * math.sqrt(sa + sb), float(t), float(p)


METRIC_NAMES = {"test_acc": "test accuracy", "train_acc": "training accuracy", "test_loss": "test loss",
                "train_loss": "training loss", "seconds": "seconds per epoch", "test_error": "test error",
                "train_test_gap": "train - test accuracy"}


def metric_name(metric: str) -> str:
    """A metric column in words: ``test_acc`` -> ``test accuracy``."""
    return METRIC_NAMES.get(metric, metric.replace("summary.", "").replace("_", " "))


def verdict(by, a, b, diff, p, metric, na, nb) -> str:
    what = f"{by}={a} vs {by}={b}"
    amount = f"{abs(diff) * 100:.2f} points" if metric.endswith(("acc", "error")) else f"{abs(diff):.4g}"
    metric = metric_name(metric)
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


def results(store, sweep: str | None = None, *, where=None, by=None, sort: str | None = "test_acc"):
    """A sweep's results as a ``pandas.DataFrame``: one row per run (its settings, seed, status
    and final metrics), best ``sort`` first; with ``by`` (a setting or a list of them) one row
    per group with mean, std and 95% CI over the seeds (see :func:`group`).

    Args:
        store: a :class:`~bnlab.experiments.RunStore` or the path of one (opened read-only).
        sweep: the sweep's name (None: every run in the store).
        where: ``"bn=after,lr=0.01"``: only the runs matching.
        by: group by these settings.
        sort: the column to sort by, best first (losses ascending); None keeps the run order.

    Raises:
        ConfigError: no such store or sweep, an unknown setting in ``where`` or ``by``, an
            unknown ``sort`` column, or a ``where`` that matches no run (naming the values that exist).

    Example::

        df = results("runs/bnlab.db", "deeplizard-bn", by="bn")
        df[["bn", "runs", "test_acc_mean", "test_acc_ci95"]]
    """
    import pandas as pd

    from bnlab.experiments.store import RunStore

    own = not isinstance(store, RunStore)
    st = RunStore(store, create=False) if own else store
    try:
        runs = st.runs(sweep)
    finally:
        if own:
            st.close()
    flat = rows(runs, where)
    check_where_matches(runs, where, flat)
    if by is not None:
        flat = group(flat, [by] if isinstance(by, str) else list(by))
        sort = f"{sort}_mean" if sort and not sort.endswith("_mean") else sort
    return pd.DataFrame(sort_rows(flat, sort))


def sort_rows(records: list[dict], metric: str | None) -> list[dict]:
    """``records`` sorted by ``metric``: accuracies best first, losses and times smallest first,
    missing or non-finite values last."""
    if not metric:
        return records
    if records and metric not in records[0]:
        raise ConfigError(f"--sort: unknown column {metric!r}{suggest(metric, records[0])}")
    descending = not (metric.endswith("loss") or metric.endswith("loss_mean") or metric.startswith("seconds"))
    numeric = [r for r in records if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    other = [r for r in records if r not in numeric]
    numeric.sort(key=lambda r: r[metric], reverse=descending)
    other.sort(key=lambda r: str(r.get(metric)))
    return numeric + other
