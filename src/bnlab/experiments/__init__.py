"""Experiments: sweep configs, the run store, executors, analysis and reproductions.

>>> from bnlab import experiments as ex
>>> cfg = ex.load_config("deeplizard").override({"epochs": 2})   # a recipe's name, or a .toml file
>>> ex.run_sweep(cfg, "runs/bnlab.db", workers=2)
>>> ex.results("runs/bnlab.db", cfg.name, by="bn")               # a pandas DataFrame

The names below are imported when first used (PEP 562), so that importing a light submodule,
such as :mod:`bnlab.experiments.workers` (which starts the sweep workers' fork server before
this process imports torch), does not import torch and pandas first.
"""

from importlib import import_module

_WHERE = {
    "analysis": ["compare", "group", "parse_where", "results", "rows"],
    "config": ["Run", "SweepConfig", "load_config", "load_recipe", "parse_config", "parse_sets", "recipe_names",
               "run_id"],
    "execute": ["WorkerDied", "execute_run"],
    "store": ["DEFAULT_STORE", "RunStore"],
    "sweep": ["EXECUTORS", "SweepSummary", "run_sweep"],
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:  # a submodule (`experiments.store`), imported as a package attribute would be
        try:
            return import_module(f"bnlab.experiments.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"bnlab.experiments.{name}":
                raise
            raise AttributeError(f"module 'bnlab.experiments' has no attribute {name!r}") from None
    value = getattr(import_module(f"bnlab.experiments.{module}"), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
