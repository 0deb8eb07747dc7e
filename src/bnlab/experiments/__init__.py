"""Experiments: sweep configs, the run store, executors, analysis and reproductions.

>>> from bnlab import experiments as ex
>>> cfg = ex.load_config("experiments/deeplizard.toml")
>>> ex.run_sweep(cfg, "runs/bnlab.db", workers=2)
>>> ex.rows(ex.RunStore("runs/bnlab.db").runs(cfg.name))
"""

from bnlab.experiments.analysis import compare, group, parse_where, rows
from bnlab.experiments.config import Run, SweepConfig, load_config, parse_config, run_id
from bnlab.experiments.execute import WorkerDied, execute_run
from bnlab.experiments.store import DEFAULT_STORE, RunStore
from bnlab.experiments.sweep import EXECUTORS, SweepSummary, run_sweep

__all__ = ["compare", "group", "parse_where", "rows", "Run", "SweepConfig", "load_config", "parse_config", "run_id",
           "WorkerDied", "execute_run", "DEFAULT_STORE", "RunStore", "EXECUTORS", "SweepSummary", "run_sweep"]
