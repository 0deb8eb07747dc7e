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

Every run's settings are validated before anything runs. A run's identity is a hash of its
resolved settings, so re-running a config finds the runs it already did.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from bnlab._toml import read_toml
from bnlab.errors import ConfigError
from bnlab.train.settings import TrainSettings

CONFIG_KEYS = {"name", "dataset", "seeds", "fixed", "grid", "claim", "description", "track"}
# settings that describe where data lives, not what the run is: left out of the run's identity
NOT_IDENTITY = {"data_dir"}


@dataclass
class Run:
    run_id: str
    settings: TrainSettings

    @property
    def label(self) -> str:
        return f"{self.run_id[:8]} seed={self.settings.seed}"


@dataclass
class SweepConfig:
    name: str
    dataset: str
    seeds: list[int]
    fixed: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    claim: dict = field(default_factory=dict)
    description: str = ""
    source: str = ""

    def grid_keys(self) -> list[str]:
        return list(self.grid)

    def to_dict(self) -> dict:
        return {"name": self.name, "dataset": self.dataset, "seeds": self.seeds, "fixed": self.fixed,
                "grid": self.grid, "claim": self.claim, "description": self.description}

    def runs(self, overrides: dict | None = None) -> list[Run]:
        """Every run of the sweep: grid product x seeds, each validated."""
        keys = list(self.grid)
        combos = list(itertools.product(*(self.grid[k] for k in keys))) if keys else [()]
        runs = []
        for combo in combos:
            for seed in self.seeds:
                d = {"dataset": self.dataset, **self.fixed, **dict(zip(keys, combo)), "seed": seed,
                     **(overrides or {})}
                try:
                    s = TrainSettings.from_dict(d).validate()
                except ConfigError as e:
                    where = ", ".join(f"{k}={v}" for k, v in zip(keys, combo))
                    raise ConfigError(f"sweep {self.name!r}{' (' + where + ')' if where else ''}: {e}") from None
                runs.append(Run(run_id(s), s))
        return runs


def run_id(settings: TrainSettings) -> str:
    """Stable 16-hex-digit identity of a run's resolved settings."""
    d = {k: v for k, v in settings.to_dict().items() if k not in NOT_IDENTITY}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def parse_config(d: dict, source: str = "config") -> SweepConfig:
    unknown = set(d) - CONFIG_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(CONFIG_KEYS))}")
    for key in ("name", "dataset"):
        if not isinstance(d.get(key), str) or not d[key]:
            raise ConfigError(f"{source}: '{key}' must be a non-empty string")
    seeds = d.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"{source}: 'seeds' must be a non-empty list of non-negative integers")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{source}: 'seeds' has duplicates")
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
    cfg = SweepConfig(d["name"], d["dataset"], seeds, fixed, grid, d.get("claim", {}), d.get("description", ""), source)
    cfg.runs()  # validates every run now, before anything runs
    return cfg


def load_config(path: str | Path) -> SweepConfig:
    return parse_config(read_toml(path, "sweep config", "see experiments/*.toml for examples"), str(path))
