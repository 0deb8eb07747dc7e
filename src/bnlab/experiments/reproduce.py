"""One-command reproductions of the tutorials' experiments (recipes in ``recipes/*.toml``)."""

from __future__ import annotations

import math
import statistics

from bnlab.errors import ConfigError
from bnlab.experiments.analysis import compare, rows, t_critical
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
    out = SweepConfig(name, ds, seed_list, fixed, dict(cfg.grid), dict(cfg.claim), cfg.description, cfg.source,
                      dict(cfg.overrides), claim_dataset=cfg.claim_dataset or cfg.dataset)
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


def reproduce(name: str, store_path: str, *, epochs=None, seeds=None, dataset=None, data_dir=None, workers=1,
              executor="local", log=print, quick: bool = False) -> tuple[SweepConfig, dict]:
    """Run a recipe (resuming what the store has) and return its config and :func:`comparison`.
    ``quick``: the recipe's ``--quick`` size (:meth:`SweepConfig.quick_size`). Figures are drawn
    by :mod:`bnlab.report.reproductions`."""
    cfg = load_recipe(name)
    cfg = adapt(cfg.quick_size() if quick else cfg, epochs, seeds, dataset)
    overrides = {"data_dir": data_dir} if data_dir else None
    run_sweep(cfg, store_path, workers=workers, executor=executor, overrides=overrides, log=log)
    with RunStore(store_path) as store:
        return cfg, comparison(store, cfg)
