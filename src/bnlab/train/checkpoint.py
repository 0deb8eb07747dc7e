"""Checkpoints: everything needed to rebuild, evaluate and use a trained network.

A checkpoint is a dict of plain Python values and tensors (network spec, build options,
state_dict, standardization, class names, settings, history), so it loads with
``torch.load(path, weights_only=True)``: no arbitrary pickled objects. Writes are atomic.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bnlab.data import Standardizer
from bnlab.errors import CheckpointError

FORMAT = "bnlab-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    model: nn.Module
    spec: dict
    build: dict
    standardizer: Standardizer
    classes: list[str]
    settings: dict
    history: dict
    path: str = ""
    extra: dict | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.build["input_shape"])


def save_checkpoint(path: str | Path, model: nn.Module, *, spec: dict, build: dict, standardizer: Standardizer,
                    classes: list[str], settings: dict | None = None, history: dict | None = None,
                    extra: dict | None = None) -> Path:
    """Write a checkpoint atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT, "version": VERSION, "spec": spec, "build": build,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "standardizer": standardizer.to_dict(), "classes": list(classes),
        "settings": settings or {}, "history": history or {}, "extra": extra or {},
        "torch_version": str(torch.__version__),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Rebuild the network of a checkpoint in eval mode."""
    from bnlab.models import build_from_spec  # models sit below train; imported here to keep startup light

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: write one with 'bnlab train --checkpoint PATH'")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({msg[:200]})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a bnlab checkpoint (made by 'bnlab train --checkpoint')")
    if d.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer bnlab (format version {d['version']}); upgrade bnlab")
    model = build_from_spec(d["spec"], **d["build"])
    try:
        model.load_state_dict(d["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match its network spec ({str(e).splitlines()[0]})") from None
    model.eval()
    return Checkpoint(model, d["spec"], d["build"], Standardizer.from_dict(d["standardizer"]), d["classes"],
                      d.get("settings", {}), d.get("history", {}), str(path), d.get("extra") or {})
