"""Hooks into the training loop. Subclass :class:`Callback` and pass instances to ``fit``.

Everything that watches a run is one: :class:`EarlyStopping`, :class:`EpochPrinter` (the CLI's
per-epoch lines), :class:`bnlab.train.activations.ActivationTracker`,
:class:`bnlab.train.tensorboard.TensorBoardLogger`, and the sweep store's writer.
"""

from __future__ import annotations

import math


class Callback:
    """Override any of these; ``state`` is the loop's :class:`TrainState`.

    Set ``state.stop = True`` (with ``state.stop_reason``) to end training after this epoch.
    Callbacks run in the order they were passed to :func:`~bnlab.train.fit`.

    Example::

        class StopAt(Callback):
            def __init__(self, acc):
                self.acc = acc

            def on_epoch_end(self, state):
                if state.history[-1].get("test_acc", 0) >= self.acc:
                    state.stop, state.stop_reason = True, f"test_acc reached {self.acc}"

        fit(net, train, test, epochs=20, callbacks=[StopAt(0.95), EpochPrinter()])
    """

    def on_train_begin(self, state) -> None:
        """Before the first epoch (``state.epoch`` and ``state.step`` are 0)."""

    def on_batch_begin(self, state) -> None:
        """Before the forward pass of step ``state.step + 1``."""

    def on_batch_end(self, state) -> None:
        """After the optimizer step (``state.step`` counts it, ``state.batch_loss`` is its loss)."""

    def on_epoch_end(self, state) -> None:
        """After the epoch's record (train and test metrics) is in ``state.history``."""

    def on_train_end(self, state) -> None:
        """After the last epoch, and also when training raised (``state.history.status`` is then
        ``failed``): release what you hold here."""


class EarlyStopping(Callback):
    """Stop when the watched metric has not improved by ``min_delta`` for ``patience`` epochs.

    Args:
        patience: epochs in a row without improvement before training stops.
        min_delta: how much lower than the best value so far a value must be to count as an
            improvement.
        metric: the epoch record's key to watch (default the test loss). Accuracies (``*_acc``)
            improve upwards, everything else (losses) downwards; ``mode`` overrides. Epochs
            without it (no test data) are ignored.
        mode: ``min``, ``max`` or None (from the metric's name).

    Example::

        fit(net, train, test, epochs=50, callbacks=[EarlyStopping(patience=3)])
    """

    def __init__(self, patience: int = 3, min_delta: float = 0.0, metric: str = "test_loss", mode: str | None = None):
        if mode not in (None, "min", "max"):
            from bnlab.errors import ConfigError

            raise ConfigError(f"EarlyStopping(mode={mode!r}): use 'min', 'max' or None")
        self.patience, self.min_delta, self.metric = patience, min_delta, metric
        self.sign = -1.0 if (mode or ("max" if metric.endswith("acc") else "min")) == "max" else 1.0
        self.best, self.bad = math.inf, 0

    def on_epoch_end(self, state) -> None:
        value = state.history.epochs[-1].get(self.metric)
        if value is None:
            return
        value = self.sign * value  # compared as a loss: lower is better
        if value < self.best - self.min_delta:
            self.best, self.bad = value, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            state.stop = True
            state.stop_reason = f"early stopping: {self.metric} did not improve for {self.patience} epoch(s)"


def epoch_line(r: dict) -> str:
    """One epoch record as a line: ``epoch   1  train loss 0.5123 acc 0.8123  test loss ...``."""
    test = f"  test loss {r['test_loss']:.4f} acc {r['test_acc']:.4f}" if r.get("test_acc") is not None else ""
    return f"epoch {r['epoch']:>3}  train loss {r['train_loss']:.4f} acc {r['train_acc']:.4f}{test}  {r['seconds']:.1f}s"


class EpochPrinter(Callback):
    """Print each epoch's metrics as it ends (``print_fn`` defaults to ``print``, flushed).

    Args:
        print_fn: called with one line per epoch, e.g.
            ``epoch   1  train loss 0.5123 acc 0.8123  test loss 0.4012 acc 0.8561  3.2s``.

    Example::

        lines = []
        fit(net, train, test, epochs=2, callbacks=[EpochPrinter(lines.append)])
    """

    def __init__(self, print_fn=None):
        self.print_fn = print_fn or (lambda line: print(line, flush=True))

    def on_epoch_end(self, state) -> None:
        self.print_fn(epoch_line(state.history.epochs[-1]))
