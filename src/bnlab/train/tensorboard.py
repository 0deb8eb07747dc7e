"""TensorBoard event files: scalars per epoch and the run's hyperparameters.

Directory names are ``<root>/<sweep>/<run_id>``: the sweep name reduced to safe characters
(at most 40) and a 16-hex-digit run id. They never grow with the settings, unlike the
deeplizard tutorial's names built from every setting, which broke when they got too long.
"""

from __future__ import annotations

import re
from pathlib import Path

from bnlab.errors import ConfigError
from bnlab.train.callbacks import Callback

SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'bnlab[tensorboard]'") from None


def run_dir(root: str | Path, sweep: str, run_id: str) -> Path:
    name = SAFE.sub("-", sweep).strip("-.")[:40] or "runs"
    return Path(root) / name / SAFE.sub("-", run_id)[:32]


def _hparam(v):
    if v is None:
        return "none"
    if isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


class TensorBoardLogger(Callback):
    """A training callback writing ``train/loss``, ``train/acc``, ``test/loss``, ``test/acc``,
    ``epoch/seconds`` per epoch, and at the end the hyperparameters with the final metrics
    (TensorBoard's HPARAMS tab). Given an :class:`~bnlab.train.activations.ActivationTracker`,
    each of its snapshots becomes a histogram ``activations/<layer>`` (drawn from the snapshot's
    1..99% quantiles: each bucket holds 1% of the layer's input).

    Example::

        tb = TensorBoardLogger("runs/tb", "my-sweep", "run-1", settings.to_dict())
        fit(net, train, test, callbacks=[tb])   # then: tensorboard --logdir runs/tb
    """

    def __init__(self, root: str | Path, sweep: str, run_id: str, settings: dict, tracker=None):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir(root, sweep or "runs", run_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.dir))
        self.settings = {k: _hparam(v) for k, v in settings.items() if k not in ("data_dir",)}
        self.tracker, self._drawn = tracker, 0

    def on_batch_end(self, state) -> None:
        if self.tracker is None:
            return
        for r in self.tracker.records[self._drawn:]:
            if "q" in r:
                _quantile_histogram(self.writer, f"activations/{r['layer']}", r, r["step"])
        self._drawn = len(self.tracker.records)

    def on_epoch_end(self, state) -> None:
        w, r = self.writer, state.history.epochs[-1]
        e = r["epoch"]
        w.add_scalar("train/loss", r["train_loss"], e)
        w.add_scalar("train/acc", r["train_acc"], e)
        if r.get("test_acc") is not None:
            w.add_scalar("test/loss", r["test_loss"], e)
            w.add_scalar("test/acc", r["test_acc"], e)
        w.add_scalar("epoch/seconds", r["seconds"], e)
        w.flush()

    def on_train_end(self, state) -> None:
        final, status = state.history.final(), state.history.status
        metrics = {f"hparam/{k}": float(final[k]) for k in ("train_acc", "test_acc", "train_loss", "test_loss")
                   if final.get(k) is not None}
        metrics["hparam/diverged"] = 1.0 if status == "diverged" else 0.0
        # run_name="." keeps the hparams in this run's directory instead of a timestamped child
        self.writer.add_hparams(self.settings, metrics, run_name=".")
        self.writer.close()


def _quantile_histogram(writer, tag: str, snap: dict, step: int) -> None:
    """A histogram from a snapshot's 99 quantiles: 100 buckets of equal mass (1% each; the
    outer two bounded by the 1% and 99% quantiles)."""
    q = snap["q"]
    n = 100.0
    writer.add_histogram_raw(tag, min=q[0], max=q[-1], num=n, sum=snap["mean"] * n,
                             sum_squares=(snap["std"] ** 2 + snap["mean"] ** 2) * n,
                             bucket_limits=list(q) + [q[-1]], bucket_counts=[1.0] * 100, global_step=step)
