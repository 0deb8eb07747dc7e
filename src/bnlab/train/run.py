"""One training run from settings: load data, build the network, fit, optionally checkpoint."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from bnlab import data as bdata
from bnlab._files import check_writable, rescue_dir
from bnlab.devices import resolve_device
from bnlab.errors import CheckpointError
from bnlab import models
from bnlab.train.activations import ActivationTracker
from bnlab.train.augment import Augment
from bnlab.train.callbacks import EarlyStopping
from bnlab.train.checkpoint import save_checkpoint
from bnlab.train.loop import History, fit
from bnlab.train.settings import TrainSettings


@dataclass
class RunResult:
    """What :func:`train` returns: the trained ``model`` (eval mode), its ``history``, the
    validated ``settings``, the network ``spec`` and ``build`` options, the data splits, and the
    activation ``tracker``, the landscape ``probe`` (``track_landscape``) and the ``tensorboard``
    directory when the run had them.

    Example::

        res = train(TrainSettings(dataset="digits", model="keras-mlp", bn="after", epochs=2))
        res.history.final()["test_acc"], res.train.standardizer, res.build["input_shape"]
    """

    model: nn.Module
    history: History
    settings: TrainSettings
    spec: dict
    build: dict
    train: bdata.Dataset
    test: bdata.Dataset
    tracker: ActivationTracker | None = None
    tensorboard: Path | None = None
    probe: "LandscapeProbe | None" = None

    def records(self) -> list[dict]:
        """The tracker's and the probe's records, as a sweep stores them (empty without either)."""
        return [*(self.tracker.records if self.tracker else ()), *(self.probe.records if self.probe else ())]

    def summary(self) -> dict:
        """The tracker's and the probe's summaries in one dict (empty without either)."""
        return {**(self.tracker.summary() if self.tracker else {}), **(self.probe.summary() if self.probe else {})}


def load_data(s: TrainSettings) -> tuple[bdata.Dataset, bdata.Dataset]:
    """Train and test splits for the settings (standardized with train statistics, limited if asked).

    The standardizer is fitted on the training examples actually used (after ``train_limit``).

    Args:
        s: the settings; ``dataset``, ``data_dir``, ``standardize``, ``train_limit``,
            ``test_limit``, ``image_size`` and ``channels`` are used.

    Returns:
        ``(train, test)``, two :class:`bnlab.data.Dataset` objects sharing one standardizer.

    Raises:
        DataNotFoundError: the dataset's files are not where bnlab looks.
        DataFormatError: a file is corrupt.
        ConfigError: an unknown dataset or option.

    Example::

        train_ds, test_ds = load_data(TrainSettings(dataset="digits", train_limit=500))
    """
    opts = {k: v for k, v in (("image_size", s.image_size), ("channels", s.channels)) if v is not None}
    train = bdata.load(s.dataset, "train", s.data_dir, **opts)
    if s.train_limit:
        train = train.subset(s.train_limit)
    std = bdata.Standardizer.fit(train, s.standardize)
    test = bdata.load(s.dataset, "test", s.data_dir, standardize=std, **opts)
    if s.test_limit:
        test = test.subset(s.test_limit)
    return train.standardized(std), test


def build_model(s: TrainSettings, input_shape, num_classes: int) -> tuple[nn.Module, dict, dict]:
    """The network for the settings, initialized from ``s.seed`` (as deeplizard seeds both nets).

    Args:
        s: the settings; ``model``, ``seed`` and :meth:`TrainSettings.build_options` are used.
        input_shape: one example's shape, e.g. ``train.input_shape``.
        num_classes: the number of logits.

    Returns:
        ``(model, spec, build)``: the network, its resolved spec and the keyword arguments of
        :func:`bnlab.models.build` that rebuild it (what a checkpoint records).

    Raises:
        ConfigError: see :func:`bnlab.models.build`.

    Example::

        net, spec, build = build_model(settings, train_ds.input_shape, train_ds.num_classes)
    """
    spec = models.resolve_spec(s.model)
    build = {"input_shape": list(input_shape), "num_classes": num_classes, **s.build_options()}
    return models.build(spec, **build, seed=s.seed), spec, build


def check_model(s: TrainSettings, input_shape=None, num_classes: int | None = None) -> None:
    """Fail now, with one line, if the settings' network cannot be built: an unknown name, or a
    Python factory whose file, module or callable is missing (no shapes needed: ``bnlab train``
    checks this before loading any data); with ``input_shape`` and ``num_classes``, a layer spec
    that does not fit the data or lacks the BN placement asked for (built on the ``meta``
    device: no memory, no weights). A Python factory is not built here: it may not run on meta
    tensors, and its real build checks its output."""
    import torch

    spec = models.resolve_spec(s.model)
    if models.is_python_spec(spec):
        models.load_factory(spec)  # a user's factory may not run on meta tensors: it is built for real later
        return
    if input_shape is not None:
        with torch.device("meta"):
            models.build(spec, input_shape=input_shape, num_classes=num_classes, **s.build_options())


def train(settings: TrainSettings, *, callbacks=(), progress: bool | None = None,
          checkpoint: str | Path | None = None, datasets=None, tensorboard: str | Path | None = None,
          name: str = "train", run_id: str | None = None) -> RunResult:
    """One run, composed from its settings: data, network, and the callbacks the settings ask for
    (activation tracking, the landscape probe, early stopping) after ``callbacks``; then the checkpoint.

    Args:
        settings: the run's :class:`TrainSettings` (validated here).
        callbacks: extra :class:`Callback` instances (e.g. :class:`EpochPrinter`).
        progress: progress bar (None: only in a terminal or notebook).
        checkpoint: write the trained network here (checked for writability first); tracked
            activation records are saved in it under ``extra["activations"]``, landscape probe
            records under ``extra["landscape"]``.
        datasets: ``(train, test)`` to skip loading (sweeps reuse data across runs).
        tensorboard: write TensorBoard event files under ``tensorboard/<name>/<run_id>``
            (``run_id`` defaults to the settings' identity hash).

    Returns:
        A :class:`RunResult`.

    Raises:
        ConfigError: invalid settings, a network that does not fit the data, an unwritable
            ``checkpoint`` path, or ``tensorboard`` without the tensorboard package.
        DataNotFoundError: the dataset's files are not where bnlab looks.
        CheckpointError: the checkpoint could not be written (the message says where the
            trained weights were rescued to).

    Example::

        res = train(TrainSettings(dataset="digits", model="keras-mlp", bn="after", epochs=2))
        res.history.test_acc
    """
    s = settings.validate().resolved()  # the checkpoint and the history record where it ran
    import torch.distributed as dist

    if s.nproc > 1 and not (dist.is_available() and dist.is_initialized()):
        from bnlab.errors import ConfigError

        raise ConfigError(f"nproc={s.nproc}: a data-parallel run needs its processes: start it with "
                          f"'bnlab train --nproc {s.nproc} ...', torchrun, a sweep, or from Python with "
                          "bnlab.train.distributed.train_in_processes(settings)")
    if checkpoint is not None:
        check_writable(checkpoint, "checkpoint")  # now, not after an hour of training
    train_ds, test_ds = datasets if datasets is not None else load_data(s)
    model, spec, build = build_model(s, train_ds.input_shape, train_ds.num_classes)
    if s.sync_bn:
        from bnlab.nn import convert

        convert(model, to="sync")  # plain BN in a single process; synchronized under --nproc / torchrun
    cbs = list(callbacks)
    from bnlab.inspect.landscape import LandscapeProbe

    probe = LandscapeProbe.for_settings(s)  # before the tracker: its extra passes come before the tracker arms
    if probe is not None:
        cbs.append(probe)
    tracker = ActivationTracker.for_settings(s, test_ds)
    if tracker is not None:
        cbs.append(tracker)
    tb = None
    if tensorboard:
        from bnlab.train.tensorboard import TensorBoardLogger

        tb = TensorBoardLogger(tensorboard, name, run_id or s.identity(), s.to_dict(), tracker=tracker)
        cbs.append(tb)
    if s.early_stopping:
        cbs.append(EarlyStopping(patience=s.early_stopping))
    history = fit(model, train_ds, test_ds, optimizer=s.optimizer, lr=s.lr, batch_size=s.batch_size,
                  epochs=s.epochs, seed=s.seed, momentum=s.momentum, weight_decay=s.weight_decay,
                  augment=Augment() if s.augment else None, callbacks=cbs, progress=progress, schedule=s.schedule,
                  device=s.device, batch_classes=s.batch_classes)
    if checkpoint is not None:
        _save_or_rescue(checkpoint, model, spec=spec, build=build, standardizer=train_ds.standardizer,
                        classes=train_ds.classes, settings=s.to_dict(), history=history.to_dict(),
                        extra={k: v.records for k, v in (("activations", tracker), ("landscape", probe)) if v} or None)
    return RunResult(model, history, s, spec, build, train_ds, test_ds, tracker, tb.dir if tb is not None else None,
                     probe)


def _save_or_rescue(path, model, **contents) -> None:
    """Write the checkpoint; if that fails after all (disk full, folder removed), the trained
    weights are written to :func:`bnlab._files.rescue_dir` instead and the error says where."""
    try:
        save_checkpoint(path, model, **contents)
    except OSError as e:
        rescued = rescue_dir() / f"{Path(path).stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.pt"
        try:
            save_checkpoint(rescued, model, **contents)
        except OSError as e2:
            raise CheckpointError(f"could not write checkpoint {path} ({e.strerror or e}) nor a rescue copy "
                                  f"{rescued} ({e2.strerror or e2}): the trained weights are lost") from None
        raise CheckpointError(f"could not write checkpoint {path} ({e.strerror or e}); the trained network was "
                              f"saved to {rescued} instead: move it where you want it") from None


def device_text(device: str) -> str:
    """``cpu, 2 torch thread(s)``, ``cuda (NVIDIA ...)`` or ``mps``: the device a setting resolves to."""
    import torch

    dev = resolve_device(device)
    if dev.type == "cpu":
        return f"cpu, {torch.get_num_threads()} torch thread(s)"
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


def describe(s: TrainSettings, train: bdata.Dataset, test: bdata.Dataset) -> str:
    """A run's effective settings, as ``bnlab train`` prints them before training."""
    shown = ["weight_decay", "dropout", "early_stopping", "bn_momentum"]
    shown += ["momentum"] if s.optimizer == "momentum" else []
    shown += ["virtual_batch_size"] if s.norm in ("ghost", "ghost-renorm") else []
    shown += ["norm_groups"] if s.norm == "group" else []
    shown += ["weight_std"]
    extras = [f"{k} {getattr(s, k)}" for k in shown if getattr(s, k) not in (None, 0, 0.0, False)]
    if s.augment:
        extras.append("augment")
    if s.batch_classes:
        extras.append(f"each batch from {s.batch_classes} classes")
    batch = f"batch size {s.batch_size}"
    if s.nproc > 1:
        batch = (f"{s.nproc} processes x batch size {s.batch_size} = {s.nproc * s.batch_size} per step, "
                 + ("BN synchronized" if s.sync_bn else "BN per process"))
    return (f"{s.model} (bn={s.bn}, norm={s.norm}, bn_impl={s.bn_impl}, activation={s.activation or 'as defined'}) on {train.name}: "
            f"{len(train)} train / {len(test)} test examples, standardize={s.standardize}, from {train.source or '?'}\n"
            f"{s.optimizer} lr {s.lr:g} ({s.schedule} schedule), {batch}, {s.epochs} epoch(s), "
            f"seed {s.seed}" + "".join(f", {e}" for e in extras)
            + f"; device {device_text(s.device)}")
