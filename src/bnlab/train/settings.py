"""Training settings: one validated record of everything that defines a run.

Each setting is declared once, below, with its type, default, one line of help and (where it
has them) its choices or bounds. Validation, the ``bnlab train`` / ``bnlab sweep`` options and
sweep configs are all derived from this one list, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field

from bnlab.data import STANDARDIZE_MODES
from bnlab.devices import DEVICES, resolve_device
from bnlab.errors import ConfigError, suggest
from bnlab.models import ACTIVATIONS, BN_IMPLS, BN_PLACEMENTS, NORMS
from bnlab.train.loop import SCHEDULES

OPTIMIZERS = ("adam", "sgd", "momentum", "adamw")
# the settings models.build takes (the network's shape, not its training)
BUILD_SETTINGS = ("bn", "norm", "bn_impl", "activation", "dropout", "virtual_batch_size", "norm_groups", "weight_std",
                  "bn_momentum")


_ORIGINAL = object()


def setting(default, help: str, *, choices=None, minimum=None, below=None, flag: str | None = None,
            metavar: str | None = None, added=_ORIGINAL):
    """A documented setting. ``minimum`` is inclusive, ``below`` exclusive; ``flag`` overrides the
    CLI option name (default ``--`` + the name with dashes).

    ``added`` marks a setting added after run stores existed: its value before it existed (how
    every older run ran). A run's identity leaves such a setting out while it has that value, so
    the runs of older stores keep their ids, and a sweep stored by an older bnlab resumes instead
    of running everything again.
    """
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum, "below": below,
                                            "flag": flag, "metavar": metavar, "added": added})


NOT_IDENTITY = {"data_dir"}  # settings that say where, not what: left out of a run's identity


def identity_hash(settings: dict) -> str:
    """Stable 16-hex-digit hash of a settings dict, leaving out :data:`NOT_IDENTITY` and the
    later-added settings at the value older runs had (see :func:`setting`)."""
    added = _added()
    d = {k: v for k, v in settings.items()
         if k not in NOT_IDENTITY and not (k in added and v == added[k])}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainSettings:
    """Everything a training run depends on. ``validate()`` refuses bad values with a clear error.

    Each field below is declared with its default and one line of help, which ``bnlab train
    --help`` prints; the CLI flag is the name with dashes (``--batch-size``) unless the field names
    another (``track_every`` is ``--every``). Constructing does not check anything: :meth:`validate`
    does (and :func:`bnlab.train.train` calls it).

    Args:
        dataset: a dataset name (``bnlab data list``), e.g. ``fashion-mnist``, ``digits``.
        model: a zoo name, a spec ``.toml`` file, ``path/to/file.py:factory`` or
            ``package.module:factory``.
        bn, bn_impl, norm, norm_groups, weight_std, virtual_batch_size, activation, dropout: the
            network's normalization and layers, as for :func:`bnlab.models.build`.
        optimizer, lr, schedule, momentum, weight_decay, batch_size, epochs, seed: the training
            loop, as for :func:`bnlab.train.fit` (``lr`` is the schedule's peak).
        standardize, augment, data_dir, train_limit, test_limit, image_size, channels: the data.
        early_stopping: patience in epochs on the test loss (``None``: off).
        track_activations, track_every, track_test_acc: record layer-input statistics every
            ``track_every`` steps (see :class:`~bnlab.train.activations.ActivationTracker`).
        device: ``auto`` (CUDA, then MPS, then the CPU), ``cpu``, ``cuda`` or ``mps``.
        extra: free-form values that are not settings (a dict; not part of the identity).

    Example::

        s = TrainSettings(dataset="digits", model="keras-mlp", bn="after", epochs=2).validate()
    """

    dataset: str = setting("fashion-mnist", "dataset name (see 'bnlab data list')")
    model: str = setting("deeplizard-cnn", "zoo name (bnlab models list), a spec .toml file, or your own network: "
                                            "path/to/file.py:factory or package.module:factory")
    bn: str = setting("none", "where BN goes: none, before/after every activation, or the tutorial's own placement",
                      choices=BN_PLACEMENTS)
    bn_impl: str = setting("bnlab", "bnlab's BN layers or torch's", choices=BN_IMPLS)
    norm: str = setting("batch", "the normalizer at each BN place: batch, renorm (batch renorm), ghost, ghost-renorm "
                                 "(renorm over virtual batches), noisy (BN + per-step noise), group, layer, "
                                 "instance or none", choices=NORMS)
    norm_groups: int = setting(32, "--norm group: groups per layer (capped at a divisor of its channels)", minimum=1,
                               added=32)
    weight_std: bool = setting(False, "weight standardization of every conv (Qiao et al. 2019; with --norm group)",
                               added=False)
    bn_momentum: float | None = setting(None, "the weight of each batch in BN's running averages (torch's momentum; "
                                              "Keras' 1 - momentum); default: the layers' own, 0.1", minimum=0.0,
                                        metavar="RATE", added=None)
    virtual_batch_size: int = setting(32, "the virtual (micro-) batch of --norm ghost and ghost-renorm", minimum=2)
    activation: str | None = setting(None, "override the network's activation", choices=tuple(ACTIVATIONS))
    dropout: float | None = setting(None, "override the probability of the network's dropout layers",
                                    minimum=0.0, below=1.0)
    optimizer: str = setting("adam", "the optimizer", choices=OPTIMIZERS)
    lr: float = setting(0.01, "learning rate (the peak of the schedule), above 0")
    schedule: str = setting("constant", "learning-rate schedule per step", choices=SCHEDULES)
    momentum: float = setting(0.9, "momentum of --optimizer momentum", minimum=0.0, below=1.0)
    weight_decay: float = setting(0.0, "L2 weight decay (adamw: decoupled; 0 means adamw's 0.01)", minimum=0.0)
    batch_size: int = setting(1000, "examples per training step", minimum=1)
    batch_classes: int | None = setting(None, "non-i.i.d. batches: draw each training batch from this many classes "
                                              "(batch size / K examples of each)", minimum=1, metavar="K",
                                        added=None)
    epochs: int = setting(1, "passes over the training data", minimum=1)
    seed: int = setting(0, "seeds initialization, shuffling, augmentation and dropout", minimum=0)
    standardize: str = setting("zscore", "input standardization, statistics from the train split",
                               choices=STANDARDIZE_MODES)
    augment: bool = setting(False, "random flips and 2-pixel shifts of training images")
    data_dir: str | None = setting(None, "directory holding the dataset's files (searched first)")
    train_limit: int | None = setting(None, "use only the first N training examples", minimum=2, metavar="N")
    test_limit: int | None = setting(None, "use only the first N test examples", minimum=1, metavar="N")
    image_size: int | None = setting(None, "image-folder: resize images to this square size (default 32)",
                                     minimum=1)
    channels: int | None = setting(None, "image-folder: 1 = grayscale, 3 = RGB (default 3)", choices=(1, 3))
    early_stopping: int | None = setting(None, "stop when the test loss has not improved for this many epochs",
                                         minimum=1, metavar="PATIENCE")
    track_activations: bool = setting(False, "record the input percentiles of every nonlinearity during training")
    track_every: int = setting(100, "with --track-activations or --track-landscape: a snapshot every K steps", minimum=1, flag="--every",
                               metavar="K")
    track_test_acc: bool = setting(False, "with --track-activations: also the test accuracy at every snapshot")
    track_landscape: bool = setting(False, "every --every steps, probe the loss landscape along the gradient and "
                                           "each layer's gradient shift (Santurkar et al. 2018)", added=False)
    device: str = setting("auto", "where to train: auto picks cuda, then mps, then cpu", choices=DEVICES,
                          added="cpu")
    nproc: int = setting(1, "train this run data-parallel in N processes on this machine (DistributedDataParallel "
                            "over gloo; nccl on CUDA); --batch-size is per process, so each step sees N times "
                            "as many examples", minimum=1, metavar="N", added=1)
    sync_bn: bool = setting(False, "with --nproc: batch statistics over every process's examples (bnlab's "
                                   "SyncBatchNorm); without it each process normalizes its own examples", added=False)
    extra: dict = field(default_factory=dict, metadata={"help": None})

    def validate(self) -> "TrainSettings":
        """Check every value's type, choices and bounds (numbers as numbers: ``"0.1"`` is refused).

        Whole numbers given for float settings become floats (``lr=1`` is ``lr=1.0``).

        Returns:
            ``self``, so ``TrainSettings(...).validate()`` reads as one expression.

        Raises:
            ConfigError: the first invalid value, with the setting's name, the value and the
                choices or bounds; an unknown dataset; a batch size of 1 with BN.
        """
        from bnlab.data import SOURCES

        for f in settings_fields():
            value = getattr(self, f.name)
            kind, optional = setting_type(f)
            if value is None and optional:
                continue
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # lr = 1 in TOML is an int; it is the same run as lr = 1.0
                setattr(self, f.name, value)
            if not _is(value, kind):
                raise ConfigError(f"{f.name} must be {_KIND_NAMES[kind]}, got {value!r} ({type(value).__name__})")
            if kind is float and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
            m = f.metadata
            if m["choices"] is not None and value not in m["choices"]:
                raise ConfigError(f"{f.name}={value!r} is not valid: choose one of "
                                  f"{', '.join(map(str, m['choices']))}{suggest(value, m['choices'])}")
            if m["minimum"] is not None and value < m["minimum"]:
                raise ConfigError(f"{f.name} must be at least {m['minimum']}, got {value!r}")
            if m["below"] is not None and not value < m["below"]:
                raise ConfigError(f"{f.name} must be below {m['below']}, got {value!r}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if self.dataset not in SOURCES:
            raise ConfigError(f"unknown dataset {self.dataset!r}: choose one of {', '.join(SOURCES)}"
                              f"{suggest(self.dataset, SOURCES)}")
        if self.bn != "none" and self.batch_size < 2:
            raise ConfigError(f"batch_size={self.batch_size} with bn={self.bn}: batch norm needs at least 2 values "
                              "per channel in every training batch: use a batch size of 2 or more (or bn=none)")
        if self.batch_classes is not None and self.batch_size % self.batch_classes:
            raise ConfigError(f"batch_classes={self.batch_classes} does not divide batch_size={self.batch_size}: each "
                              "batch takes the same number of examples from each of its classes; pick a batch size "
                              f"that is a multiple of {self.batch_classes}")
        if self.bn_momentum is not None and not 0 < self.bn_momentum <= 1:
            raise ConfigError(f"bn_momentum must be in (0, 1] (the weight of each batch in the running averages), "
                              f"got {self.bn_momentum!r}")
        if self.batch_classes is not None and self.nproc > 1:
            raise ConfigError("batch_classes with nproc > 1: each process would get a part of a class-skewed batch "
                              "(one class each, with 2 classes and 2 processes); run non-i.i.d. batches in one "
                              "process (--nproc 1)")
        if self.track_landscape and self.nproc > 1:
            raise ConfigError("track_landscape with nproc > 1: the landscape probe evaluates the network at other "
                              "weights in one process; probe a single-process run (--nproc 1)")
        resolve_device(self.device)  # a device this machine lacks is refused now, before any data loads
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be a dict, got {type(self.extra).__name__}")
        return self

    def to_dict(self) -> dict:
        """Every setting as plain values (``extra`` left out), as checkpoints and the run store keep them."""
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    def resolved(self) -> "TrainSettings":
        """A copy with ``device="auto"`` replaced by the device it picks here (``cpu``, ``cuda`` or
        ``mps``), and ``nproc`` by the world size of the process group this process is in (under
        ``torchrun``): what a run records, so its stored settings say where and how it ran."""
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else self.nproc
        return dataclasses.replace(self, device=resolve_device(self.device).type, nproc=world)

    def build_options(self) -> dict:
        """The keyword arguments of :func:`bnlab.models.build` these settings ask for (without the
        model, the data's shapes and the seed)."""
        return {k: getattr(self, k) for k in BUILD_SETTINGS}

    def identity(self, threads: int | None = None) -> str:
        """Stable 16-hex-digit identity of these settings (where the data lives left out; for a
        model in your own ``.py`` file or ``.toml`` spec, what the file holds put in, so an edited
        file is a new run) and, when given, of the torch thread count the run uses (CPU kernels sum in another order
        with other thread counts, so results differ in the last digits): a sweep's run id."""
        d = self.resolved().to_dict()  # what runs: auto on a machine without a GPU is the cpu
        d.update(_model_content(self.model))  # your own network's file: an edited file is another network
        if threads is not None:
            d["threads"] = threads
        return identity_hash(d)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSettings":
        """Settings from a dict such as :meth:`to_dict` gives (missing keys take their defaults).

        Raises:
            ConfigError: a key that is not a setting (with a did-you-mean). The values are not
                checked: call :meth:`validate`.
        """
        names = [f.name for f in settings_fields()]
        unknown = set(d) - set(names)
        if unknown:
            hints = "".join(suggest(k, names) for k in sorted(unknown))
            raise ConfigError(f"unknown setting(s) {', '.join(sorted(unknown))}{hints} (known: {', '.join(names)})")
        return cls(**d)


def _model_content(model: str) -> dict:
    """What a model named by a file is, for a run's identity: ``{"model_sha256": ...}``, the
    SHA-256 of the file of a ``path/to/file.py:factory`` model; ``{"model_spec": ...}``, the hash
    of the validated layer spec of a spec file (``.toml``), so comments and formatting do not
    count; ``{}`` for other models, and for a file that is missing or invalid (building reports
    it)."""
    from pathlib import Path

    from bnlab.models import resolve_spec
    from bnlab.models.factory import is_reference, reference_spec

    try:
        if is_reference(model):
            if model.split(":")[0].endswith(".py"):
                return {"model_sha256": reference_spec(model)["python"]["sha256"]}
            return {}
        if model.endswith(".toml") or Path(model).is_file():
            return {"model_spec": identity_hash(resolve_spec(model))}
    except ConfigError:
        pass
    return {}


_KIND_NAMES = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}


def _is(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


@functools.cache
def _fields() -> tuple[dataclasses.Field, ...]:
    return tuple(f for f in dataclasses.fields(TrainSettings) if f.name != "extra")


def settings_fields() -> list[dataclasses.Field]:
    """The declared settings of :class:`TrainSettings`, in order (``extra`` is not a setting)."""
    return list(_fields())


@functools.cache
def added_settings() -> dict:
    """The settings added after run stores existed, with the value every older run had."""
    return dict(_added())


def _added() -> dict:
    return {f.name: f.metadata["added"] for f in _fields() if f.metadata.get("added", _ORIGINAL) is not _ORIGINAL}


@functools.cache
def _types() -> dict[str, tuple[type, bool]]:
    out = {}
    for name, hint in typing.get_type_hints(TrainSettings).items():  # slow: read once, not per validate()
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[name] = ((args[0] if args else hint), bool(typing.get_args(hint)))
    return out


def setting_type(f: dataclasses.Field) -> tuple[type, bool]:
    """``(int|float|str|bool, optional)`` of a setting, from its annotation."""
    return _types()[f.name]
