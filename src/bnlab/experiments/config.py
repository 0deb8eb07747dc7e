"""Sweep configs: fixed settings, a grid whose cartesian product (x seeds) gives the runs.

```toml
name = "deeplizard-bn"
dataset = "fashion-mnist"
seeds = [0, 1]

[fixed]
model = "deeplizard-cnn"
epochs = 2

[grid]
bn = ["none", "tutorial"]
lr = [0.01, 0.001]

[claim]            # optional: what a tutorial reported, shown by `bnlab reproduce`
text = "BN 93.7% vs no-BN 91% train accuracy by epoch 20"
```

Two more keys for experiments whose conditions are not a cartesian product:

- ``[[cases]]`` tables: linked settings that form one more grid dimension, each case named by an
  optional ``label`` (``{label = "group+WS", norm = "group", weight_std = true}``).
- ``scale_lr_with_batch = 32``: the linear scaling rule, each run's ``lr`` is the configured
  ``lr`` times ``batch_size / 32`` (Goyal et al. 2017; what Wu & He do across batch sizes).

``parse_config`` checks every value once (its type, its bounds, that the model exists and has
the BN placement asked for); ``run_sweep`` then checks every run of the grid and builds each
distinct network for its dataset, all before the store is touched. A run's identity is a hash of
its resolved settings (plus the torch thread count a sweep runs it with, see ``run_id``), so
re-running a config finds the runs it already did.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bnlab._toml import read_toml
from bnlab.errors import ConfigError, suggest
from bnlab.train.settings import NOT_IDENTITY, TrainSettings, identity_hash  # noqa: F401 (re-exported)

CONFIG_KEYS = {"name", "dataset", "seeds", "fixed", "grid", "claim", "description", "quick", "cases",
               "scale_lr_with_batch"}
# a sweep with more runs than this is refused unless the caller raises the limit (--max-runs)
MAX_RUNS = 10_000


@dataclass
class Run:
    """One run of a sweep: its identity, its settings and the torch threads it runs with
    (``None``: not part of its identity, as for ``cfg.runs()`` without ``threads``).

    Made by :meth:`SweepConfig.iter_runs`; ``run_id`` is :func:`run_id` of the settings and threads.

    Example::

        run = load_config("deeplizard").runs()[0]
        run.label, run.settings.bn   # ('0d9f32f0 seed=50', 'none')
    """

    run_id: str
    settings: TrainSettings
    threads: int | None = None

    @property
    def label(self) -> str:
        """``"<first 8 hex digits of the id> seed=<seed>"``, as sweep progress lines show it."""
        return f"{self.run_id[:8]} seed={self.settings.seed}"

    def stored_settings(self) -> dict:
        """The settings as the run store keeps them: the training settings plus ``threads``."""
        d = self.settings.to_dict()
        if self.threads is not None:
            d["threads"] = self.threads
        return d


@dataclass
class SweepConfig:
    """A sweep: fixed settings, a grid of values and seeds; its runs are the grid's cartesian
    product times the seeds (see the module docstring for the TOML form).

    Make one with :func:`load_config` (a file or a recipe) or :func:`parse_config` (a dict), which
    check every value; constructing one directly checks nothing (call :meth:`check`).

    Args:
        name: the sweep's name in the run store.
        dataset: the dataset of every run.
        seeds: one run per seed at each grid point.
        fixed: settings shared by every run (``{"model": "deeplizard-cnn", "epochs": 2}``).
        grid: setting -> list of values to try.
        claim: what a tutorial reported (``text``; ``by``, ``metric``, ``epoch``, ``values``),
            shown by ``bnlab reproduce``.
        description: one line for listings.
        source: where the config came from (a file path), for messages.
        overrides: the values :meth:`override` fixed, kept so the store records what ran.
        quick: the overrides of the recipe's ``--quick`` size (a ``[quick]`` table: fewer
            epochs, examples or seeds, so it runs in about 3 minutes); see :meth:`quick_size`.
        cases: linked settings, one more grid dimension (see the module docstring).
        scale_lr_with_batch: the batch size at which ``lr`` is as configured (linear scaling).

    Example::

        cfg = load_config("deeplizard")
        cfg.size(), cfg.size_text(), cfg.grid_keys()
        for run in cfg.iter_runs():
            print(run.label, run.settings.bn)
    """

    name: str
    dataset: str
    seeds: list[int]
    fixed: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    claim: dict = field(default_factory=dict)
    description: str = ""
    source: str = ""

    overrides: dict = field(default_factory=dict)
    quick: dict = field(default_factory=dict)
    claim_dataset: str = ""  # the dataset the claim was made on, when the sweep runs on another (not stored)
    cases: list = field(default_factory=list)
    scale_lr_with_batch: int | None = None

    def grid_keys(self) -> list[str]:
        """The settings that vary: the gridded ones in the config's order, then those of the cases."""
        keys = list(self.grid)
        for case in self.cases:
            keys += [k for k in case if k != "label" and k not in keys]
        if self.scale_lr_with_batch and "batch_size" in keys and "lr" not in keys:
            keys.append("lr")
        return keys

    def case_labels(self) -> list[str]:
        """Each case's label (its settings in words when it has none), in order."""
        return [c.get("label") or ", ".join(f"{k}={v}" for k, v in c.items() if k != "label") for c in self.cases]

    def case_label(self, settings: dict) -> str | None:
        """The label of the case a run's settings (a dict, e.g. a results row) belong to
        (``None`` without cases, or when they match none)."""
        return next((label for case, label in zip(self.full_cases(), self.case_labels())
                     if all(settings.get(k) == v for k, v in case.items())), None)

    def full_cases(self) -> list[dict]:
        """Each case's settings with every setting any case links (a case that leaves one out
        runs with its default, e.g. ``weight_std = false``): what tells the cases apart."""
        linked = list(dict.fromkeys(k for c in self.cases for k in c if k != "label"))
        defaults = TrainSettings()
        return [{k: c.get(k, getattr(defaults, k)) for k in linked} for c in self.cases]

    def to_dict(self) -> dict:
        """The config as plain values (what the run store records; ``source`` left out)."""
        d = {"name": self.name, "dataset": self.dataset, "seeds": self.seeds, "fixed": self.fixed,
             "grid": self.grid, "claim": self.claim, "description": self.description}
        if self.cases:
            d["cases"] = self.cases
        if self.scale_lr_with_batch:
            d["scale_lr_with_batch"] = self.scale_lr_with_batch
        if self.overrides:
            d["overrides"] = self.overrides
        return d

    def quick_size(self) -> "SweepConfig":
        """This sweep at its ``--quick`` size: its ``[quick]`` overrides applied and ``-quick``
        added to the name (so the quick runs never pool with the full ones).

        Raises:
            ConfigError: the config has no ``[quick]`` table.
        """
        if not self.quick:
            raise ConfigError(f"{self.name} has no --quick size (no [quick] table): use --epochs/--seeds to shrink it")
        # a list for a gridded setting is a smaller grid; anything else fixes the setting
        regrid = {k: v for k, v in self.quick.items() if k in self.grid and isinstance(v, list)}
        out = self.override({k: v for k, v in self.quick.items() if k not in regrid})
        out = dataclasses.replace(out, name=f"{self.name}-quick", quick={}, grid={**out.grid, **regrid},
                                  overrides={**out.overrides, **regrid})
        out.check()
        return out

    def override(self, values: dict) -> "SweepConfig":
        """This sweep with ``values`` fixed (``--set``): a gridded setting becomes fixed, ``seeds``
        and ``dataset`` replace the top-level ones. The changes are kept in :attr:`overrides`,
        so the stored config says what ran. Every value is checked now.

        Example::

            load_config("deeplizard").override({"epochs": 1, "train_limit": 10000})
        """
        if not values:
            return self
        from bnlab.train.settings import settings_fields

        names = [f.name for f in settings_fields()]
        fixed, grid = dict(self.fixed), dict(self.grid)
        seeds, dataset = list(self.seeds), self.dataset
        for key, value in values.items():
            if key == "seeds":
                seeds = value if isinstance(value, list) else [value]
                _check_seeds(seeds, f"--set seeds")
            elif key == "dataset":
                dataset = value
            elif key == "seed":
                raise ConfigError("--set seed: set the seeds of a sweep with --set seeds=[0,1,2]")
            elif key in {k for c in self.cases for k in c}:
                raise ConfigError(f"--set {key}: {self.name} sets {key} in its [[cases]]; change the cases in a copy "
                                  f"of the config (bnlab recipes show {self.name} > mine.toml)")
            elif key in names:
                grid.pop(key, None)
                fixed[key] = value
            else:
                raise ConfigError(f"--set {key}: no such setting{suggest(key, names + ['seeds'])} "
                                  "(the settings: bnlab train --help)")
        out = dataclasses.replace(self, seeds=seeds, dataset=dataset, fixed=fixed, grid=grid,
                                  overrides={**self.overrides, **values})
        out.check()
        return out

    def size(self) -> int:
        """How many runs the sweep has (grid product x cases x seeds), computed without expanding it."""
        return math.prod(len(v) for v in self.grid.values()) * max(len(self.cases), 1) * len(self.seeds)

    def size_text(self) -> str:
        """``"200 x 200 values x 1 seed(s)"``: where :meth:`size` comes from."""
        parts = [" x ".join(str(len(v)) for v in self.grid.values()) + " values"] if self.grid else []
        parts += [f"{len(self.cases)} cases"] if self.cases else []
        return " x ".join(parts + [f"{len(self.seeds)} seed(s)"])

    def iter_runs(self, overrides: dict | None = None, threads: int | None = None) -> Iterator[Run]:
        """Every run of the sweep, one at a time (grid product x seeds, in a fixed order), each
        validated. ``threads`` (the torch threads per run) becomes part of each run's identity."""
        _check_seeds(self.seeds, f"sweep {self.name!r}")
        keys = list(self.grid)
        cases = [{k: v for k, v in c.items() if k != "label"} for c in self.cases] or [{}]
        for combo in itertools.product(*(self.grid[k] for k in keys), cases):
            point = {**dict(zip(keys, combo[:-1])), **combo[-1]}
            first = self._run(point, self.seeds[0], overrides, threads)
            yield first
            for seed in self.seeds[1:]:
                if overrides and "seed" in overrides:
                    yield self._run(point, seed, overrides, threads)
                    continue
                # validated once per grid point: the seeds differ only in the seed, checked by parse_config
                s = dataclasses.replace(first.settings, seed=seed)
                yield Run(run_id(s, threads), s, threads)

    def runs(self, overrides: dict | None = None, threads: int | None = None) -> list[Run]:
        """Every run of the sweep as a list (see :meth:`iter_runs`, which does not hold them all)."""
        return list(self.iter_runs(overrides, threads))

    def _run(self, point: dict, seed: int, overrides: dict | None, threads: int | None) -> Run:
        d = {"dataset": self.dataset, **self.fixed, **point, "seed": seed, **(overrides or {})}
        if self.scale_lr_with_batch and not (overrides and "lr" in overrides):
            lr, batch = d.get("lr", TrainSettings.lr), d.get("batch_size", TrainSettings.batch_size)
            if isinstance(lr, (int, float)) and isinstance(batch, int):
                d["lr"] = lr * batch / self.scale_lr_with_batch  # the linear scaling rule
        try:
            # validate() checks each value's type and bounds, and batch_size >= 2 with BN
            s = TrainSettings.from_dict(d).validate().resolved()
        except ConfigError as e:
            raise ConfigError(f"sweep {self.name!r}{_where(point)}: {e}") from None
        except (TypeError, ValueError) as e:  # a value of a type validate() did not expect
            raise ConfigError(f"sweep {self.name!r}{_where(point)}: a setting has a value of the wrong type ({e}): "
                              "check the types in [fixed] and [grid] (numbers without quotes)") from None
        return Run(run_id(s, threads), s, threads)

    def values(self, key: str, overrides: dict | None = None) -> list:
        """The values setting ``key`` takes in this sweep (its default when neither fixed nor gridded)."""
        if overrides and key in overrides:
            return [overrides[key]]
        if key in self.grid:
            return list(self.grid[key])
        if key in self.fixed:
            return [self.fixed[key]]
        if key == "dataset":
            return [self.dataset]
        return [getattr(TrainSettings(), key)]

    def check(self, overrides: dict | None = None) -> None:
        """Cheap checks before anything runs, independent of the grid's size and of the data:
        each grid value in one run (the other keys at their first values), every model (a zoo
        name or a spec file) and its BN placements. The combinations and the networks' fit to
        the data are checked by ``run_sweep``."""
        from bnlab.models import resolve_spec

        _check_seeds(self.seeds, f"sweep {self.name!r}")
        first = {k: v[0] for k, v in self.grid.items()}
        points = [first] + [{**first, k: v} for k, vs in self.grid.items() for v in vs[1:]]
        points += [{**first, **{k: v for k, v in c.items() if k != "label"}} for c in self.cases]
        for point in points:
            self._run(point, self.seeds[0], overrides, None)
        bns = self.values("bn", overrides)
        for model in self.values("model", overrides):
            where = "[grid]" if "model" in self.grid else "[fixed]" if "model" in self.fixed else "(the default)"
            try:
                spec = resolve_spec(model)
            except ConfigError as e:
                raise ConfigError(f"sweep {self.name!r}: model = {json.dumps(model)} in {where}: {e}") from None
            if "tutorial" in bns and not spec.get("tutorial_bn"):
                raise ConfigError(f"sweep {self.name!r}: bn = \"tutorial\" with model = {json.dumps(model)}: "
                                  f"{spec['name']} has no tutorial BN placement: use bn = \"before\" or \"after\" "
                                  "for it")


def _where(point: dict) -> str:
    return f" ({', '.join(f'{k}={v}' for k, v in point.items())})" if point else ""


def _check_seeds(seeds, source: str) -> None:
    if (not isinstance(seeds, (list, tuple)) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ConfigError(f"{source}: 'seeds' must be a non-empty list of non-negative integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{source}: 'seeds' has duplicates")


def run_id(settings: TrainSettings, threads: int | None = None) -> str:
    """A run's id: :meth:`TrainSettings.identity`.

    Args:
        settings: the run's settings.
        threads: the torch threads the run uses (part of the identity when given).

    Returns:
        16 hex digits; equal settings (but for ``data_dir``) and threads give the same id.

    Example::

        run_id(TrainSettings(dataset="digits", bn="after"), threads=2)
    """
    return settings.identity(threads)


def parse_config(d: dict, source: str = "config") -> SweepConfig:
    """A checked :class:`SweepConfig` from a dict shaped like a sweep ``.toml`` (see the module
    docstring).

    Every value is checked now (see :meth:`SweepConfig.check`): the keys, ``name`` and ``dataset``
    non-empty strings, ``seeds`` (default ``[0]``) non-negative distinct integers, ``[grid]``
    values non-empty lists without duplicates, no setting both fixed and gridded, ``seed`` and
    ``dataset`` only at the top level, each setting's type and bounds, every model and its BN
    placements. Whether the networks fit the data is checked later, by :func:`run_sweep`.

    Args:
        d: the parsed config (``name``, ``dataset``, ``seeds``, ``fixed``, ``grid``, ``claim``,
            ``description``).
        source: where it came from (a file path), named in errors and kept as ``cfg.source``.

    Returns:
        The :class:`SweepConfig`.

    Raises:
        ConfigError: anything above, with ``source`` and the key or value at fault.

    Example::

        cfg = parse_config({"name": "bn-digits", "dataset": "digits", "seeds": [0, 1],
                            "fixed": {"model": "keras-mlp", "epochs": 2},
                            "grid": {"bn": ["none", "after"]}})
        cfg.size()   # 4 runs
    """
    unknown = set(d) - CONFIG_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(CONFIG_KEYS))}")
    for key in ("name", "dataset"):
        if not isinstance(d.get(key), str) or not d[key]:
            raise ConfigError(f"{source}: '{key}' must be a non-empty string")
    seeds = d.get("seeds", [0])
    _check_seeds(seeds, source)
    fixed, grid = d.get("fixed", {}), d.get("grid", {})
    if not isinstance(fixed, dict) or not isinstance(grid, dict):
        raise ConfigError(f"{source}: [fixed] and [grid] must be tables")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{source}: grid value {k} must be a non-empty list, got {v!r}")
        if len({json.dumps(x, sort_keys=True) for x in v}) != len(v):
            raise ConfigError(f"{source}: grid value {k} has duplicates")
    for k in ("seed", "dataset"):
        if k in fixed or k in grid:
            raise ConfigError(f"{source}: set '{k}' at the top level ({'seeds' if k == 'seed' else k} = ...), not in [fixed]/[grid]")
    both = set(fixed) & set(grid)
    if both:
        raise ConfigError(f"{source}: {', '.join(sorted(both))} both fixed and gridded")
    quick = d.get("quick", {})
    if not isinstance(quick, dict):
        raise ConfigError(f"{source}: [quick] must be a table of settings")
    cases = d.get("cases", [])
    if not isinstance(cases, list) or not all(isinstance(c, dict) and c for c in cases):
        raise ConfigError(f"{source}: cases must be [[cases]] tables of settings")
    labels = [c.get("label") for c in cases if c.get("label") is not None]
    if len(set(labels)) != len(labels) or not all(isinstance(x, str) and x for x in labels):
        raise ConfigError(f"{source}: each case's label must be a distinct non-empty string")
    linked = {k for c in cases for k in c if k != "label"}
    if linked & (set(grid) | set(fixed)):
        raise ConfigError(f"{source}: {', '.join(sorted(linked & (set(grid) | set(fixed))))} both in [[cases]] "
                          "and in [fixed]/[grid]")
    scale = d.get("scale_lr_with_batch")
    if scale is not None and not (isinstance(scale, int) and not isinstance(scale, bool) and scale >= 1):
        raise ConfigError(f"{source}: scale_lr_with_batch must be a whole number >= 1 (a batch size), got {scale!r}")
    cfg = SweepConfig(d["name"], d["dataset"], seeds, fixed, grid, d.get("claim", {}), d.get("description", ""), source,
                      quick=quick, cases=cases, scale_lr_with_batch=scale)
    _check_contrasts(cfg, source)
    cfg.check()  # every value and model now, before anything runs (run_sweep checks every run)
    if quick:
        cfg.quick_size().check()
    return cfg


def _check_contrasts(cfg: "SweepConfig", source) -> None:
    """A claim's ``[[claim.contrasts]]`` name levels the sweep has and say what they expect."""
    from bnlab.experiments.reproduce import EXPECTS

    contrasts = (cfg.claim or {}).get("contrasts")
    if contrasts is None:
        return
    if cfg.cases:
        levels = cfg.case_labels()
    else:
        by = cfg.claim.get("by", "bn")
        levels = [str(v) for v in cfg.grid.get(by, [cfg.fixed.get(by)])]
    if not isinstance(contrasts, list) or not contrasts:
        raise ConfigError(f"{source}: claim.contrasts must be [[claim.contrasts]] tables")
    from bnlab.experiments.analysis import METRICS

    for i, c in enumerate(contrasts, 1):
        where = f"{source}: claim contrast {i}"
        if not isinstance(c, dict):
            raise ConfigError(f"{where} must be a [[claim.contrasts]] table, got {c!r}")
        missing = [k for k in ("metric", "a", "b", "expect") if k not in c]
        if missing:
            raise ConfigError(f"{where} lacks {', '.join(missing)} (each names metric, a, b and expect)")
        if c["expect"] not in EXPECTS:
            raise ConfigError(f"{where}: expect = {c['expect']!r}; choose one of {', '.join(EXPECTS)}")
        metric = c["metric"]
        if not (isinstance(metric, str) and (metric in METRICS or metric in ("test_error", "train_test_gap")
                                             or metric.startswith("summary."))):
            raise ConfigError(f"{where}: metric = {metric!r}; use one of {', '.join(METRICS)}, test_error, "
                              "train_test_gap or a run summary (summary.<key>, e.g. summary.beta)")
        if "fraction" in c and not (isinstance(c["fraction"], (int, float)) and 0 < c["fraction"] <= 1):
            raise ConfigError(f"{where}: fraction = {c['fraction']!r}; a number in (0, 1]")
        if c["expect"] == "similar" and not isinstance(c.get("within"), (int, float)):
            raise ConfigError(f"{where}: expect = 'similar' needs within = <largest difference>")
        if c["expect"] == "recovers" and "of" not in c:
            raise ConfigError(f"{where}: expect = 'recovers' needs of = <the level whose value is recovered>")
        for key in ("a", "b", "of"):
            if key in c and str(c[key]) not in levels:
                raise ConfigError(f"{where}: {key} = {c[key]!r} is not a level of this sweep; levels: "
                                  f"{', '.join(levels)}")


RECIPES = Path(__file__).with_name("recipes")


def recipe_names() -> list[str]:
    """The sweep configs shipped with bnlab (``bnlab recipes list``), sorted.

    Example::

        recipe_names()   # ['cifar', 'deeplizard', 'ioffe', 'keras-mlp', 's4tf']
    """
    return sorted(p.stem for p in RECIPES.glob("*.toml"))


def recipe_path(name: str) -> Path:
    """The file of recipe ``name``; an error with a did-you-mean when there is none."""
    path = RECIPES / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"no recipe named {name!r}{suggest(name, recipe_names())} (recipes: "
                          f"{', '.join(recipe_names())}; or give a sweep config .toml file)")
    return path


def load_recipe(name: str) -> SweepConfig:
    """The shipped sweep config ``name`` (e.g. ``deeplizard``).

    Args:
        name: one of :func:`recipe_names`.

    Returns:
        The checked :class:`SweepConfig`.

    Raises:
        ConfigError: no recipe of that name (with a did-you-mean).

    Example::

        load_recipe("ioffe").claim["text"]
    """
    return load_config(recipe_path(name))


def load_config(path_or_recipe: str | Path) -> SweepConfig:
    """A sweep config from a ``.toml`` file, or a recipe's name (``"deeplizard"``).

    Args:
        path_or_recipe: a config file, or a name without ``/`` or ``.toml`` that is not an
            existing file (then a recipe, see :func:`recipe_names`).

    Returns:
        The checked :class:`SweepConfig` (see :func:`parse_config` for what is checked).

    Raises:
        ConfigError: no such file or recipe, a file that is not TOML, or an invalid config.

    Example::

        cfg = load_config("deeplizard").override({"epochs": 1, "train_limit": 10000})
        run_sweep(cfg, "runs/bnlab.db")
    """
    text = str(path_or_recipe)
    if not Path(text).exists() and "/" not in text and not text.endswith(".toml"):
        path = recipe_path(text)
    else:
        path = Path(text)
    hint = f"give a config file, or a recipe name ({', '.join(recipe_names())})"
    return parse_config(read_toml(path, "sweep config", hint), str(path))


def parse_sets(items) -> dict:
    """``["epochs=1", "lr=0.01", "bn=none"]`` (the CLI's ``--set``) as typed values: each value
    is read as TOML (numbers, booleans, ``[lists]``, quoted strings), else taken as a string.

    Args:
        items: ``KEY=VALUE`` strings (``None``: none).

    Returns:
        ``{key: value}``, ready for :meth:`SweepConfig.override` (a later key wins).

    Raises:
        ConfigError: an item without ``=`` or without a key.

    Example::

        parse_sets(["epochs=1", "lr=0.01", "bn=none", "seeds=[0, 1]"])
        # {'epochs': 1, 'lr': 0.01, 'bn': 'none', 'seeds': [0, 1]}
    """
    out = {}
    for item in items or ():
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. --set epochs=1")
        try:
            out[key] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value.strip()
    return out
