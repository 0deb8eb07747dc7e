"""The training loop: cross-entropy, one optimizer, per-epoch train and test metrics."""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.devices import model_device, resolve_device, to_device
from bnlab.errors import ConfigError
from bnlab.train.augment import Augment


@dataclass
class History:
    """What a run produced: ``status`` (``done`` or ``diverged``), the number of ``steps``, why it
    stopped early (``stop_reason``) and one record per epoch: ``epoch, train_loss, train_acc,
    test_loss, test_acc, seconds`` (accuracies in 0..1, train metrics counted during the epoch,
    as the deeplizard run manager counts them).

    Records are indexable (``h[-1]`` is the last epoch's dict) and each metric reads as a column
    (``h.test_acc`` is a list over epochs); ``h.to_frame()`` gives a pandas DataFrame. When
    training raises, ``status`` is ``failed`` (what ``on_train_end`` callbacks then see).

    Example::

        h = fit(net, train, test, epochs=3)
        h[-1]["test_acc"], max(h.test_acc), h.to_frame().plot(y=["train_acc", "test_acc"])
    """

    status: str = "done"
    epochs: list[dict] = field(default_factory=list)
    steps: int = 0
    stop_reason: str | None = None

    COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds")

    def __len__(self) -> int:
        return len(self.epochs)

    def __getitem__(self, i):
        return self.epochs[i]

    def __iter__(self):
        return iter(self.epochs)

    def column(self, name: str) -> list:
        """One metric over epochs (``None`` where an epoch lacks it)."""
        return [e.get(name) for e in self.epochs]

    epoch = property(lambda self: self.column("epoch"), doc="epoch numbers, from 1")
    train_loss = property(lambda self: self.column("train_loss"), doc="mean training loss per epoch")
    train_acc = property(lambda self: self.column("train_acc"), doc="training accuracy per epoch (0..1)")
    test_loss = property(lambda self: self.column("test_loss"), doc="held-out loss per epoch")
    test_acc = property(lambda self: self.column("test_acc"), doc="held-out accuracy per epoch (0..1)")
    seconds = property(lambda self: self.column("seconds"), doc="wall-clock seconds per epoch")

    def final(self) -> dict:
        """The last epoch's record (``{}`` before the first epoch ends)."""
        return self.epochs[-1] if self.epochs else {}

    def to_frame(self):
        """The epoch records as a ``pandas.DataFrame`` indexed by epoch."""
        import pandas as pd

        return pd.DataFrame(self.epochs, columns=[c for c in self.COLUMNS if any(c in e for e in self.epochs)]
                            or list(self.COLUMNS)).set_index("epoch")

    def to_dict(self) -> dict:
        """Plain values (``status``, ``epochs``, ``steps``, ``stop_reason``), as a checkpoint stores them."""
        return {"status": self.status, "epochs": self.epochs, "steps": self.steps, "stop_reason": self.stop_reason}

    def __repr__(self) -> str:
        last = self.final()
        metrics = ", ".join(f"{k} {last[k]:.4f}" for k in ("train_acc", "test_acc") if last.get(k) is not None)
        stop = f", stopped: {self.stop_reason}" if self.stop_reason else ""
        return (f"History({self.status}, {len(self.epochs)} epoch(s), {self.steps} steps"
                + (f", final {metrics}" if metrics else "") + stop + ")")


@dataclass
class TrainState:
    """What :func:`fit` passes to every :class:`~bnlab.train.callbacks.Callback` method.

    ``model`` and ``optimizer`` are the live objects being trained; ``history`` the run's
    :class:`History` so far; ``epoch`` the current epoch (from 1; 0 in ``on_train_begin``);
    ``step`` the optimizer steps taken so far; ``batch_loss`` the last batch's loss; ``batch`` the
    ``(inputs, labels)`` of the current step, on the training device. A callback
    sets ``stop = True`` (and ``stop_reason``, a sentence for the history) to end training after
    the current epoch.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    history: History
    epoch: int = 0
    step: int = 0
    batch_loss: float = 0.0
    batch: tuple | None = None
    stop: bool = False
    stop_reason: str | None = None


def make_optimizer(name: str, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
    """The ``torch.optim`` optimizer that ``--optimizer name`` means, as :func:`fit` makes it.

    Args:
        name: ``adam``, ``adamw`` (decoupled weight decay; ``weight_decay=0`` means AdamW's
            usual 0.01), ``sgd`` (plain, no momentum) or ``momentum`` (SGD with ``momentum``).
        params: the parameters (or parameter groups) to optimize.
        lr: the learning rate.
        momentum: used by ``momentum`` only.
        weight_decay: L2 penalty (``adamw``: decoupled).

    Returns:
        A ``torch.optim.Optimizer``.

    Raises:
        ConfigError: an unknown ``name``.

    Example::

        opt = make_optimizer("momentum", net.parameters(), lr=0.1, momentum=0.9)
    """
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
def predict_logits(model: nn.Module, data, batch_size: int = 1000, *, limit: int | None = None,
                   bn_batch_stats: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of the examples of ``data`` (the first ``limit`` of them if given), with
    the model in eval mode (its mode is restored). ``bn_batch_stats=True`` lets every BN layer
    normalize with each batch's own statistics instead (on a copy: running statistics untouched)
    — what the doctor compares eval mode against. Every accuracy in bnlab comes from here."""
    from bnlab.nn import is_batchnorm

    if limit is not None:
        data = data.subset(limit)
    device = model_device(model)
    was = model.training
    if bn_batch_stats:
        model = copy.deepcopy(model)
    model.eval()
    if bn_batch_stats:
        for m in model.modules():
            if is_batchnorm(m):
                m.train()
                m.momentum = 0.0  # batch statistics, running ones left as they are
    outs, ys = [], []
    try:
        for x, y in data.batches(batch_size):
            outs.append(model(to_device(x, device)).float().cpu())
            ys.append(y)
    finally:
        model.train(was)
    return torch.cat(outs), torch.cat(ys)


def evaluate_loss_acc(model: nn.Module, data, batch_size: int = 1000, **options) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``data`` in eval mode (``options``: see
    :func:`predict_logits`).

    Args:
        model: the network; its mode is restored afterwards.
        data: a :class:`bnlab.data.Dataset` (standardized as the model was trained).
        batch_size: examples per forward pass; with ``bn_batch_stats`` also the batch whose
            statistics BN uses.
        **options: ``limit`` (only the first ``limit`` examples) and ``bn_batch_stats`` (every
            BN layer normalizes with each batch's own statistics, on a copy of the model).

    Returns:
        ``(loss, accuracy)``: the mean cross-entropy in nats and the accuracy in 0..1.

    Example::

        loss, acc = evaluate_loss_acc(net, test)
        _, acc_batch_stats = evaluate_loss_acc(net, test, bn_batch_stats=True)
    """
    logits, y = predict_logits(model, data, batch_size, **options)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).double().mean())


def interactive() -> bool:
    """True in a terminal or a Jupyter kernel (where a progress bar helps), false in logs and pipes."""
    if sys.stderr.isatty():
        return True
    shell = sys.modules.get("IPython")
    return bool(shell and getattr(shell, "get_ipython", lambda: None)() is not None)


def _progress_bar(total: int, desc: str, enabled: bool | None):
    # enabled=None: show the bar only where someone watches (terminal or notebook)
    disable = not interactive() if enabled is None else not enabled
    if disable:
        from tqdm import tqdm
    else:
        try:  # a widget in notebooks that have ipywidgets, else text (tqdm.auto would warn)
            import ipywidgets  # noqa: F401
            from tqdm.auto import tqdm
        except ImportError:
            from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="batch", leave=False, disable=disable, mininterval=0.2,
                dynamic_ncols=True, file=sys.stderr)


def _rank_world() -> tuple[int, int]:
    """This process's rank and the world size of its ``torch.distributed`` group ((0, 1) without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_finite(loss: float, world: int) -> bool:
    """Whether every process's loss is finite (all processes stop together, or none does)."""
    if world == 1:
        return math.isfinite(loss)
    import torch.distributed as dist

    bad = torch.tensor([0.0 if math.isfinite(loss) else 1.0])
    dist.all_reduce(bad)
    return bad.item() == 0


def _broadcast_buffers(model: nn.Module) -> None:
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b, 0)


def _sum_over_ranks(*values: float) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def fit(model: nn.Module, train, test=None, *, optimizer: str = "adam", lr: float = 0.01, batch_size: int = 1000,
        epochs: int = 1, seed: int = 0, momentum: float = 0.9, weight_decay: float = 0.0,
        augment: Augment | bool | None = None, callbacks=(), progress: bool | None = None,
        schedule: str = "constant", device: str | torch.device | None = None,
        batch_classes: int | None = None) -> History:
    """Train ``model`` on ``train`` (a :class:`bnlab.data.Dataset`) and evaluate on ``test``.

    Same seed, same data and same model state give an identical history on CPU: the seed drives
    shuffling, augmentation and dropout. A non-finite loss ends the run with status ``diverged``.
    ``schedule`` sets the learning rate per step (see :func:`make_schedule`); ``lr`` is its peak.

    Everything that watches training is a :class:`~bnlab.train.callbacks.Callback` (printing
    epochs, activation tracking, TensorBoard, early stopping, the sweep store). Their
    ``on_train_end`` runs even when training raises (``history.status`` is then ``failed``), so
    files they hold are closed.

    The model is left in **eval mode** (BN uses its running statistics), ready to evaluate or
    fold. ``progress=None`` shows a bar only in a terminal or notebook.

    Args:
        model: any ``nn.Module`` mapping a batch to logits.
        train, test: :class:`bnlab.data.Dataset` splits (``test`` may be ``None``).
        optimizer: ``adam``, ``adamw``, ``sgd`` or ``momentum``.
        lr, batch_size, epochs, seed, momentum, weight_decay: as in :class:`TrainSettings`.
        augment: an :class:`Augment` (or True for the default one) applied to training batches.
        callbacks: :class:`Callback` instances, called in order.
        progress: show a progress bar (None: only in a terminal or notebook).
        schedule: the learning-rate schedule (see :func:`make_schedule`).
        device: where to train: ``auto``, ``cpu``, ``cuda``, ``mps`` (the model is moved there
            first) or None (where the model already is). Batches move there one at a time;
            augmentation runs on the CPU before the move, so results do not depend on the device's
            random number generator.
        batch_classes: non-i.i.d. batches, each drawn from at most this many classes
            (:func:`bnlab.data.dataset.class_index_batches`); ``None``: shuffled i.i.d. batches.

    In a ``torch.distributed`` process group of W processes (``bnlab train --nproc W`` or
    ``torchrun``), every process calls ``fit`` with the same arguments: the model is wrapped in
    ``DistributedDataParallel``, each step's batch of ``batch_size * W`` examples (the same
    seeded order everywhere) is cut into W contiguous parts, one per process, and the epoch's
    training loss and accuracy are summed over the processes. Before each evaluation every process
    takes rank 0's buffers (its running statistics, which the checkpoint keeps), and when a
    callback on any process stops training, all stop. The parts of a last, smaller step may be
    unequal; each process's mean loss counts equally there.

    Returns:
        the run's :class:`History`.

    Example::

        tr, te = bnlab.data.load_splits("digits")
        net = bnlab.models.build("keras-mlp", bn="after", input_shape=tr.input_shape, num_classes=10, seed=0)
        h = fit(net, tr, te, batch_size=64, epochs=3)
        h[-1]["test_acc"]
    """
    if augment is True:
        augment = Augment()
    if device is None:
        device = model_device(model)
    else:
        device = resolve_device(device)
        model.to(device)
    torch.manual_seed(seed)
    shuffle_gen = torch.Generator().manual_seed(seed)
    augment_gen = torch.Generator().manual_seed(seed + 1)
    opt = make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr, momentum, weight_decay)
    history = History()
    state = TrainState(model, opt, history)
    rank, world = _rank_world()
    net = model
    if world > 1:  # data parallel: each process takes its part of every step's batch of batch_size * world
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)
    step_batch = batch_size * world
    # A last batch (or a process's part of it) of one example cannot be batch-normalized; drop it.
    left = len(train) % step_batch
    drop_last = bool(left) and left // world < 2
    shard = (rank, world) if world > 1 else None
    n_batches = train.num_batches(step_batch, drop_last, classes=batch_classes)
    if n_batches == 0:
        raise ConfigError(f"{len(train)} training example(s) with batch size {step_batch} give no training step "
                          "(batch norm cannot use a batch of one): use more training data (--train-limit)")
    callbacks = list(callbacks)
    began = []
    try:
        for cb in callbacks:
            cb.on_train_begin(state)
            began.append(cb)
        scheduler = make_schedule(schedule, opt, lr, n_batches * epochs)
        for epoch in range(1, epochs + 1):
            state.epoch = epoch
            model.train()
            t0 = time.perf_counter()
            loss_sum, correct, seen = 0.0, 0, 0
            bar = _progress_bar(n_batches, f"epoch {epoch}/{epochs}", progress)
            diverged = False
            for x, y in train.batches(step_batch, shuffle=True, generator=shuffle_gen, drop_last=drop_last,
                                      classes=batch_classes, shard=shard):
                if augment:
                    x = augment(x, augment_gen)
                x, y = to_device(x, device), to_device(y, device)
                state.batch = (x, y)
                for cb in callbacks:
                    cb.on_batch_begin(state)
                out = net(x)
                loss = F.cross_entropy(out, y)
                batch_loss = loss.item()
                if not _all_finite(batch_loss, world):
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
            if world > 1:  # the epoch's training figures over every process's examples
                loss_sum, correct, seen = _sum_over_ranks(loss_sum, correct, seen)
            record = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1)}
            if world > 1:  # every process evaluates rank 0's model: its running statistics (the checkpoint's)
                _broadcast_buffers(model)
            if test is not None:
                record["test_loss"], record["test_acc"] = evaluate_loss_acc(model, test)
            record["seconds"] = time.perf_counter() - t0
            history.epochs.append(record)
            for cb in callbacks:
                cb.on_epoch_end(state)
            if world > 1 and _sum_over_ranks(float(state.stop))[0] > 0:  # one stops, all stop
                state.stop = True
                state.stop_reason = state.stop_reason or "another process's callback stopped training"
            if state.stop:
                history.stop_reason = state.stop_reason
                break
    except BaseException:
        history.status = "failed"
        raise
    finally:
        model.eval()
        for cb in began:
            cb.on_train_end(state)
    return history
