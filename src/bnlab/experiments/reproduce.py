"""One-command reproductions of the tutorials' experiments (recipes in ``recipes/*.toml``)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from bnlab.errors import ConfigError
from bnlab.experiments.analysis import compare, rows, t_critical
from bnlab.experiments.config import SweepConfig, load_config
from bnlab.experiments.store import RunStore
from bnlab.experiments.sweep import run_sweep

RECIPES = Path(__file__).with_name("recipes")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.toml"))


def load_recipe(name: str) -> SweepConfig:
    path = RECIPES / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown reproduction {name!r}: choose one of {', '.join(recipe_names())}")
    return load_config(path)


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
    out = SweepConfig(name, ds, seed_list, fixed, dict(cfg.grid), dict(cfg.claim), cfg.description, cfg.source)
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
        if chosen[metric] is not None and math.isfinite(chosen[metric]):
            vals.append(chosen[metric])
    return vals, at


def runs_of(store: RunStore, cfg: SweepConfig) -> list[dict]:
    """Rows of exactly this config's runs: a sweep name reused with other settings (say fewer
    epochs) also holds other experiments, which must not be pooled with these."""
    def belongs(r):
        return (r["seed"] in cfg.seeds and r.get("dataset") == cfg.dataset
                and all(r.get(k) == v for k, v in cfg.fixed.items())
                and all(r.get(k) in v for k, v in cfg.grid.items()))

    return [r for r in rows(store.runs(cfg.name)) if belongs(r)]


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
        n = len(vals)
        std = statistics.stdev(vals) if n > 1 else None
        levels.append({
            by: level, "n": n, "claimed": (claim.get("values") or {}).get(str(level)),
            "measured_mean": statistics.fmean(vals) if vals else None, "measured_std": std,
            "measured_ci95": t_critical(n - 1) * std / math.sqrt(n) if n > 1 else None, "at_epoch": at,
            "final_train_acc": statistics.fmean([r["train_acc"] for r in finals]) if finals else None,
            "final_test_acc": statistics.fmean([r["test_acc"] for r in finals if r["test_acc"] is not None]) if finals else None,
            "diverged": sum(r["status"] == "diverged" for r in finals),
        })
    out = {"sweep": cfg.name, "dataset": cfg.dataset, "claim": claim.get("text", ""), "by": by, "metric": metric,
           "epoch": epoch, "levels": levels, "tests": []}
    for m in dict.fromkeys([metric, "test_acc"]):
        try:
            out["tests"] += compare(flat, by, m)["tests"]
        except ConfigError:
            pass
    return out


def ics_figure(store: RunStore, cfg: SweepConfig, path: str | Path) -> Path | None:
    """Fig. 1 of the BN paper from a sweep with activation tracking (bn none vs with BN)."""
    from bnlab.report.plots import ics_figure as draw

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
    without = examples.get("none", examples[levels[0]])
    with_bn = examples[[lv for lv in levels if lv != "none"][0]]
    return draw(acc, without, with_bn, path, title=f"{cfg.name} on {cfg.dataset}: Fig. 1 of Ioffe & Szegedy "
                                                  f"(accuracy: mean of {len(flat) // len(levels)} seed(s); percentiles: first seed)")


def reproduce(name: str, store_path: str, *, epochs=None, seeds=None, dataset=None, data_dir=None, workers=1,
              executor="local", figure: str | None = None, log=print) -> dict:
    cfg = adapt(load_recipe(name), epochs, seeds, dataset)
    overrides = {"data_dir": data_dir} if data_dir else None
    run_sweep(cfg, store_path, workers=workers, executor=executor, overrides=overrides, log=log)
    with RunStore(store_path) as store:
        out = comparison(store, cfg)
        if cfg.fixed.get("track_activations"):
            path = ics_figure(store, cfg, figure or f"{cfg.name}-fig1.png")
            out["figure"] = str(path) if path else None
        return out


def format_comparison(c: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{v * 100:.2f}%"

    metric = c["metric"] + (f" @ epoch {c['epoch']}" if c["epoch"] else " (final)")
    lines = [f"{c['sweep']} on {c['dataset']}", f"claim: {c['claim']}", "",
             f"{c['by']:<10} {'claimed':>9} {'measured ' + metric:>30} {'n':>3} {'final train':>12} {'final test':>11}"]
    for lv in c["levels"]:
        m = lv["measured_mean"]
        meas = "-" if m is None else f"{pct(m)}" + (f" ± {lv['measured_ci95'] * 100:.2f}" if lv["measured_ci95"] else "")
        if lv["at_epoch"] and c["epoch"] and lv["at_epoch"] != c["epoch"]:
            meas += f" (epoch {lv['at_epoch']})"
        lines.append(f"{str(lv[c['by']]):<10} {pct(lv['claimed']):>9} {meas:>30} {lv['n']:>3} "
                     f"{pct(lv['final_train_acc']):>12} {pct(lv['final_test_acc']):>11}")
    lines.append("(± is the 95% confidence half-width over seeds)")
    if c.get("figure"):
        lines.append(f"Fig. 1 trio written to {c['figure']}")
    lines += [""] + [t["verdict"] for t in c["tests"]]
    return "\n".join(lines)
