"""One training run from settings: load data, build the network, fit, optionally checkpoint."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from bnlab import data as bdata
from bnlab._files import check_writable, rescue_dir
from bnlab.errors import CheckpointError
from bnlab import models
from bnlab.train.augment import Augment
from bnlab.train.callbacks import EarlyStopping
from bnlab.train.checkpoint import save_checkpoint
from bnlab.train.loop import History, fit
from bnlab.train.settings import TrainSettings


@dataclass
class RunResult:
    model: nn.Module
    history: History
    settings: TrainSettings
    spec: dict
    build: dict
    train: bdata.Dataset
    test: bdata.Dataset


def load_data(s: TrainSettings) -> tuple[bdata.Dataset, bdata.Dataset]:
    """Train and test splits for the settings (standardized with train statistics, limited if asked)."""
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
    """The network for the settings, initialized from ``s.seed`` (as deeplizard seeds both nets)."""
    spec = models.resolve_spec(s.model)
    build = {"input_shape": list(input_shape), "num_classes": num_classes, "bn": s.bn, "norm": s.norm,
             "bn_impl": s.bn_impl, "activation": s.activation, "dropout": s.dropout,
             "virtual_batch_size": s.virtual_batch_size}
    return models.build(spec, **build, seed=s.seed), spec, build


def train(settings: TrainSettings, *, callbacks=(), progress: bool | None = None, on_epoch=None,
          checkpoint: str | Path | None = None, datasets=None, checkpoint_extra: dict | None = None) -> RunResult:
    """Run the settings end to end. ``datasets=(train, test)`` skips loading (sweeps reuse data);
    ``checkpoint_extra`` (plain values) is saved in the checkpoint under ``extra``."""
    s = settings.validate()
    if checkpoint is not None:
        check_writable(checkpoint, "checkpoint")  # now, not after an hour of training
    train_ds, test_ds = datasets if datasets is not None else load_data(s)
    model, spec, build = build_model(s, train_ds.input_shape, train_ds.num_classes)
    cbs = list(callbacks)
    if s.early_stopping:
        cbs.append(EarlyStopping(patience=s.early_stopping))
    history = fit(model, train_ds, test_ds, optimizer=s.optimizer, lr=s.lr, batch_size=s.batch_size,
                  epochs=s.epochs, seed=s.seed, momentum=s.momentum, weight_decay=s.weight_decay,
                  augment=Augment() if s.augment else None, callbacks=cbs, progress=progress, on_epoch=on_epoch,
                  schedule=s.schedule)
    if checkpoint is not None:
        _save_or_rescue(checkpoint, model, spec=spec, build=build, standardizer=train_ds.standardizer,
                        classes=train_ds.classes, settings=s.to_dict(), history=history.to_dict(),
                        extra=checkpoint_extra)
    return RunResult(model, history, s, spec, build, train_ds, test_ds)


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
