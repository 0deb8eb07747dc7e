"""Experiments: sweep configs, the run store, executors, analysis and reproductions.

>>> from bnlab import experiments as ex
>>> cfg = ex.load_config("deeplizard").override({"epochs": 2})   # a recipe's name, or a .toml file
>>> ex.run_sweep(cfg, "runs/bnlab.db", workers=2)
>>> ex.results("runs/bnlab.db", cfg.name, by="bn")               # a pandas DataFrame
"""

from bnlab.experiments.analysis import compare, group, parse_where, results, rows
from bnlab.experiments.config import (Run, SweepConfig, load_config, load_recipe, parse_config, parse_sets,
                                      recipe_names, run_id)
from bnlab.experiments.execute import WorkerDied, execute_run
from bnlab.experiments.store import DEFAULT_STORE, RunStore
from bnlab.experiments.sweep import EXECUTORS, SweepSummary, run_sweep

__all__ = ["compare", "group", "parse_where", "results", "rows", "Run", "SweepConfig", "load_config", "load_recipe",
           "parse_config", "parse_sets", "recipe_names", "run_id",
           "WorkerDied", "execute_run", "DEFAULT_STORE", "RunStore", "EXECUTORS", "SweepSummary", "run_sweep"]
