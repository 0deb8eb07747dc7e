"""The training loop: cross-entropy, one optimizer, per-epoch train and test metrics."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.errors import ConfigError
from bnlab.train.augment import Augment


@dataclass
class History:
    """What a run produced. ``status`` is ``done`` or ``diverged``; ``epochs`` holds one dict per
    epoch: ``epoch, train_loss, train_acc, test_loss, test_acc, seconds`` (accuracies in 0..1,
    train metrics counted during the epoch, as the deeplizard run manager counts them)."""

    status: str = "done"
    epochs: list[dict] = field(default_factory=list)
    steps: int = 0
    stop_reason: str | None = None

    def final(self) -> dict:
        return self.epochs[-1] if self.epochs else {}

    def to_dict(self) -> dict:
        return {"status": self.status, "epochs": self.epochs, "steps": self.steps, "stop_reason": self.stop_reason}


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    history: History
    epoch: int = 0
    step: int = 0
    batch_loss: float = 0.0
    stop: bool = False
    stop_reason: str | None = None


def make_optimizer(name: str, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay or 0.01)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}: choose adam, adamw, sgd or momentum")


SCHEDULES = ("constant", "onecycle", "cosine")


def make_schedule(name: str, opt, lr: float, total_steps: int):
    """A per-step learning-rate schedule: ``constant``, ``onecycle`` (warm up to ``lr`` over the
    first 30% of steps, then anneal; Smith 2018) or ``cosine`` (from ``lr`` to 0)."""
    if name == "constant":
        return None
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total_steps, 2))
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    raise ConfigError(f"unknown lr schedule {name!r}: choose one of {', '.join(SCHEDULES)}")


@torch.no_grad()
def predict_logits(model: nn.Module, data, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every example of ``data``, model in eval mode (mode restored)."""
    was = model.training
    model.eval()
    outs, ys = [], []
    for x, y in data.batches(batch_size):
        outs.append(model(x))
        ys.append(y)
    model.train(was)
    return torch.cat(outs), torch.cat(ys)


def evaluate_loss_acc(model: nn.Module, data, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``data`` in eval mode."""
    logits, y = predict_logits(model, data, batch_size)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).double().mean())


def _progress_bar(total: int, desc: str, enabled: bool | None):
    from tqdm.auto import tqdm

    # enabled=None: show the bar only when stderr is a terminal
    disable = not sys.stderr.isatty() if enabled is None else not enabled
    return tqdm(total=total, desc=desc, unit="batch", leave=False, disable=disable, mininterval=0.2,
                dynamic_ncols=True, file=sys.stderr)


def fit(model: nn.Module, train, test=None, *, optimizer: str = "adam", lr: float = 0.01, batch_size: int = 1000,
        epochs: int = 1, seed: int = 0, momentum: float = 0.9, weight_decay: float = 0.0,
        augment: Augment | bool | None = None, callbacks=(), progress: bool | None = None,
        on_epoch=None, schedule: str = "constant") -> History:
    """Train ``model`` on ``train`` (a :class:`bnlab.data.Dataset`) and evaluate on ``test``.

    Same seed, same data and same model state give an identical history on CPU: the seed drives
    shuffling, augmentation and dropout. A non-finite loss ends the run with status ``diverged``.
    ``on_epoch(record)`` is called after each epoch (the CLI prints from it). ``schedule`` sets
    the learning rate per step (see :func:`make_schedule`); ``lr`` is its peak.
    """
    if augment is True:
        augment = Augment()
    torch.manual_seed(seed)
    shuffle_gen = torch.Generator().manual_seed(seed)
    augment_gen = torch.Generator().manual_seed(seed + 1)
    opt = make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr, momentum, weight_decay)
    history = History()
    state = TrainState(model, opt, history)
    # A last batch of one example cannot be batch-normalized; drop it (it changes nothing else).
    drop_last = len(train) % batch_size == 1
    n_batches = train.num_batches(batch_size, drop_last)
    if n_batches == 0:
        raise ConfigError(f"{len(train)} training example(s) with batch size {batch_size} give no training step "
                          "(batch norm cannot use a batch of one): use more training data (--train-limit)")
    callbacks = list(callbacks)
    for cb in callbacks:
        cb.on_train_begin(state)
    scheduler = make_schedule(schedule, opt, lr, n_batches * epochs)
    for epoch in range(1, epochs + 1):
        state.epoch = epoch
        model.train()
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = _progress_bar(n_batches, f"epoch {epoch}/{epochs}", progress)
        diverged = False
        for x, y in train.batches(batch_size, shuffle=True, generator=shuffle_gen, drop_last=drop_last):
            if augment:
                x = augment(x, augment_gen)
            for cb in callbacks:
                cb.on_batch_begin(state)
            out = model(x)
            loss = F.cross_entropy(out, y)
            batch_loss = loss.item()
            if not math.isfinite(batch_loss):
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            loss_sum += batch_loss * len(y)
            correct += int((out.detach().argmax(1) == y).sum())
            seen += len(y)
            state.step += 1
            state.batch_loss = batch_loss
            for cb in callbacks:
                cb.on_batch_end(state)
            if not bar.disable:
                bar.update(1)
                if state.step % 10 == 0:
                    bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}", refresh=False)
        bar.close()
        history.steps = state.step
        if diverged:
            history.status = "diverged"
            history.stop_reason = f"non-finite loss at epoch {epoch}, step {state.step + 1}"
            break
        record = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1)}
        if test is not None:
            record["test_loss"], record["test_acc"] = evaluate_loss_acc(model, test)
        record["seconds"] = time.perf_counter() - t0
        history.epochs.append(record)
        if on_epoch is not None:
            on_epoch(record)
        for cb in callbacks:
            cb.on_epoch_end(state)
        if state.stop:
            history.stop_reason = state.stop_reason
            break
    for cb in callbacks:
        cb.on_train_end(state)
    return history
