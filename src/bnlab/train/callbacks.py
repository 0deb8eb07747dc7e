"""Hooks into the training loop. Subclass :class:`Callback` and pass instances to ``fit``."""

from __future__ import annotations

import math


class Callback:
    """Override any of these; ``state`` is the loop's :class:`TrainState`.

    Set ``state.stop = True`` (with ``state.stop_reason``) to end training after this epoch.
    """

    def on_train_begin(self, state) -> None: ...

    def on_batch_begin(self, state) -> None:
        """Before the forward pass of step ``state.step + 1``."""

    def on_batch_end(self, state) -> None: ...

    def on_epoch_end(self, state) -> None: ...

    def on_train_end(self, state) -> None: ...


class EarlyStopping(Callback):
    """Stop when the test loss has not improved by ``min_delta`` for ``patience`` epochs."""

    def __init__(self, patience: int = 3, min_delta: float = 0.0, metric: str = "test_loss"):
        self.patience, self.min_delta, self.metric = patience, min_delta, metric
        self.best, self.bad = math.inf, 0

    def on_epoch_end(self, state) -> None:
        value = state.history.epochs[-1].get(self.metric)
        if value is None:
            return
        if value < self.best - self.min_delta:
            self.best, self.bad = value, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            state.stop = True
            state.stop_reason = f"early stopping: {self.metric} did not improve for {self.patience} epoch(s)"
