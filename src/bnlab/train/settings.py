"""Training settings: one validated record of everything that defines a run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from bnlab.data import STANDARDIZE_MODES
from bnlab.errors import ConfigError
from bnlab.models import ACTIVATIONS, BN_IMPLS, BN_PLACEMENTS, NORMS
from bnlab.train.loop import SCHEDULES

OPTIMIZERS = ("adam", "sgd", "momentum", "adamw")



@dataclass
class TrainSettings:
    """Everything a training run depends on. ``validate()`` refuses bad values with a clear error."""

    dataset: str = "fashion-mnist"
    model: str = "deeplizard-cnn"
    bn: str = "none"
    bn_impl: str = "bnlab"
    norm: str = "batch"
    virtual_batch_size: int = 32
    activation: str | None = None
    dropout: float | None = None
    optimizer: str = "adam"
    lr: float = 0.01
    schedule: str = "constant"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 1000
    epochs: int = 1
    seed: int = 0
    standardize: str = "zscore"
    augment: bool = False
    data_dir: str | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    image_size: int | None = None
    channels: int | None = None
    early_stopping: int | None = None
    track_activations: bool = False
    track_every: int = 100
    track_test_acc: bool = False
    extra: dict = field(default_factory=dict)

    def validate(self) -> "TrainSettings":
        from bnlab.data import SOURCES

        def choice(name, value, options):
            if value not in options:
                raise ConfigError(f"{name}={value!r} is not valid: choose one of {', '.join(options)}")

        if self.dataset not in SOURCES:
            raise ConfigError(f"unknown dataset {self.dataset!r}: choose one of {', '.join(SOURCES)}")
        choice("bn", self.bn, BN_PLACEMENTS)
        choice("bn_impl", self.bn_impl, BN_IMPLS)
        choice("norm", self.norm, NORMS)
        choice("optimizer", self.optimizer, OPTIMIZERS)
        choice("schedule", self.schedule, SCHEDULES)
        choice("standardize", self.standardize, STANDARDIZE_MODES)
        if self.activation is not None:
            choice("activation", self.activation, tuple(ACTIVATIONS))
        for name in ("lr",):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
                raise ConfigError(f"{name} must be a positive number, got {v!r}")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        for name in ("train_limit", "test_limit", "early_stopping"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError("weight_decay must be >= 0 and momentum in [0, 1)")
        if not isinstance(self.track_every, int) or self.track_every < 1:
            raise ConfigError(f"track_every must be a positive integer, got {self.track_every!r}")
        if self.virtual_batch_size < 2:
            raise ConfigError(f"virtual_batch_size must be at least 2, got {self.virtual_batch_size}")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSettings":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
        return cls(**d)
