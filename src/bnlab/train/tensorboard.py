"""TensorBoard event files: scalars per epoch and the run's hyperparameters.

Directory names are ``<root>/<sweep>/<run_id>``: the sweep name reduced to safe characters
(at most 40) and a 16-hex-digit run id. They never grow with the settings, unlike the
deeplizard tutorial's names built from every setting, which broke when they got too long.
"""

from __future__ import annotations

import re
from pathlib import Path

from bnlab.errors import ConfigError

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


class TensorBoardLogger:
    """Writes ``train/loss``, ``train/acc``, ``test/loss``, ``test/acc``, ``epoch/seconds`` per
    epoch, and at the end the hyperparameters with the final metrics (TensorBoard's HPARAMS tab)."""

    def __init__(self, root: str | Path, sweep: str, run_id: str, settings: dict):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir(root, sweep or "runs", run_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.dir))
        self.settings = {k: _hparam(v) for k, v in settings.items() if k not in ("data_dir",)}

    def epoch(self, r: dict) -> None:
        w, e = self.writer, r["epoch"]
        w.add_scalar("train/loss", r["train_loss"], e)
        w.add_scalar("train/acc", r["train_acc"], e)
        if r.get("test_acc") is not None:
            w.add_scalar("test/loss", r["test_loss"], e)
            w.add_scalar("test/acc", r["test_acc"], e)
        w.add_scalar("epoch/seconds", r["seconds"], e)
        w.flush()

    def activation(self, step: int, layer: str, values) -> None:
        """A histogram of a tracked layer's input (the ActivationTracker's ``on_record``)."""
        self.writer.add_histogram(f"activations/{layer}", values, step)

    def close(self, status: str, final: dict) -> None:
        metrics = {f"hparam/{k}": float(final[k]) for k in ("train_acc", "test_acc", "train_loss", "test_loss")
                   if final.get(k) is not None}
        metrics["hparam/diverged"] = 1.0 if status == "diverged" else 0.0
        # run_name="." keeps the hparams in this run's directory instead of a timestamped child
        self.writer.add_hparams(self.settings, metrics, run_name=".")
        self.writer.close()
