"""Checkpoints: everything needed to rebuild, evaluate and use a trained network.

A checkpoint is a dict of plain Python values and tensors (network spec, build options,
state_dict, standardization, class names, settings, history), so it loads with
``torch.load(path, weights_only=True)``: no arbitrary pickled objects. Writes are atomic.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bnlab._files import atomic_path
from bnlab.data import Standardizer
from bnlab.devices import resolve_device
from bnlab.errors import BnlabError, CheckpointError

FORMAT = "bnlab-checkpoint"
VERSION = 1


@dataclass(repr=False)
class Checkpoint:
    """A loaded checkpoint: what :func:`load_checkpoint` returns.

    ``model`` is the rebuilt network in eval mode (folded if the file holds a folded one);
    ``spec`` and ``build`` describe it (the arguments of :func:`bnlab.models.build`; ``build``
    also says whether it is ``folded``); ``standardizer`` maps raw inputs to what the network was
    trained on; ``classes`` are the class names by output index; ``settings`` and ``history`` are
    the run's :class:`~bnlab.train.TrainSettings` and :class:`~bnlab.train.History` as plain
    dicts (empty when not saved); ``path`` is the file it came from; ``extra`` holds what else
    was saved (``activations`` records, the ``fold`` report).

    Example::

        ck = load_checkpoint("model.pt")
        ck.input_shape, ck.classes[:3], ck.history["epochs"][-1]["test_acc"]
        logits = ck.model(ck.standardizer(raw_batch))   # raw_batch: (N, *ck.input_shape), raw units
    """

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
        """One example's shape without the batch, e.g. ``(1, 28, 28)``."""
        return tuple(self.build["input_shape"])

    def __repr__(self) -> str:
        h = self.history or {}
        last = (h.get("epochs") or [{}])[-1]
        acc = f", test_acc {last['test_acc']:.4f}" if last.get("test_acc") is not None else ""
        folded = ", BN folded" if self.build.get("folded") else ""
        return (f"Checkpoint({self.path or 'unsaved'!r}: {self.spec.get('name', '?')} bn={self.build.get('bn')}"
                f"{folded}, input {self.input_shape}, {len(self.classes)} classes, "
                f"{len(h.get('epochs') or [])} epoch(s){acc})")


def save_checkpoint(path: str | Path, model: nn.Module, *, spec: dict, build: dict, standardizer: Standardizer,
                    classes: list[str], settings: dict | None = None, history: dict | None = None,
                    extra: dict | None = None) -> Path:
    """Write a checkpoint atomically (temporary file in the same directory, then rename).

    ``model`` is the network ``spec``/``build`` describe, or its folded copy from
    :func:`bnlab.nn.fold_batchnorm` (recognized by its weights and recorded as ``folded``, so
    :func:`load_checkpoint` rebuilds the folded network).

    Args:
        path: the file to write (missing folders are created).
        model: the trained network; its weights are saved on the CPU.
        spec, build: the network's spec and the keyword arguments of
            :func:`bnlab.models.build` it was built with (see :func:`bnlab.train.build_model`).
        standardizer: the training data's :class:`~bnlab.data.Standardizer`.
        classes: class names by output index.
        settings, history, extra: plain dicts kept as they are (``settings.to_dict()``,
            ``history.to_dict()``); ``None`` saves ``{}``.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        CheckpointError: ``model`` is neither the network ``spec``/``build`` describe nor its folded copy.
        OSError: the file could not be written (nothing is left half-written).

    Example::

        res = train(TrainSettings(dataset="digits", model="keras-mlp", bn="after"))
        save_checkpoint("model.pt", res.model, spec=res.spec, build=res.build,
                        standardizer=res.train.standardizer, classes=res.train.classes,
                        settings=res.settings.to_dict(), history=res.history.to_dict())
    """
    path = Path(path)
    build = dict(build, folded=_is_folded(model, spec, build))
    payload = {
        "format": FORMAT, "version": VERSION, "spec": spec, "build": build,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "standardizer": standardizer.to_dict(), "classes": list(classes),
        "settings": settings or {}, "history": history or {}, "extra": extra or {},
        "torch_version": str(torch.__version__),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def fold_checkpoint(ck: Checkpoint, output: str | Path):
    """Fold the BN layers of a loaded checkpoint into their neighbours and save the result (with
    the same standardization, classes, settings and history) to ``output``; returns the
    :class:`bnlab.nn.FoldReport`. ``load_checkpoint(output)`` gives the folded network.

    Args:
        ck: a :class:`Checkpoint` from :func:`load_checkpoint` (not changed).
        output: the checkpoint file to write; the fold report is kept in its ``extra["fold"]``.

    Returns:
        The :class:`bnlab.nn.FoldReport`: which BN layers were folded into which layer, and which
        were left and why.

    Raises:
        ConfigError: the network cannot be traced for folding (see :func:`bnlab.nn.fold_batchnorm`).
        OSError: ``output`` could not be written.

    Example::

        report = fold_checkpoint(load_checkpoint("model.pt"), "model-folded.pt")
        load_checkpoint("model-folded.pt")   # Checkpoint('model-folded.pt': ... BN folded, ...)
    """
    from bnlab.nn import fold_batchnorm

    folded, report = fold_batchnorm(ck.model)
    save_checkpoint(output, folded, spec=ck.spec, build=ck.build, standardizer=ck.standardizer, classes=ck.classes,
                    settings=ck.settings, history=ck.history, extra={**(ck.extra or {}), "fold": report.to_dict()})
    return report


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the network of a checkpoint in eval mode.

    The file is read with ``torch.load(weights_only=True)`` (no pickled code runs), and the
    network's shapes are checked against the stored weights before anything real is allocated.
    A network from your own Python file is rebuilt by calling its factory again: the file must
    still be where it was, unchanged (same SHA-256).

    Args:
        path: a file written by :func:`save_checkpoint` (``bnlab train -o PATH``).
        device: where the network goes: ``cpu`` (default), ``auto``, ``cuda`` or ``mps``
            (checkpoints hold CPU tensors, so one written anywhere loads anywhere).

    Returns:
        A :class:`Checkpoint`.

    Raises:
        CheckpointError: the file is missing, unreadable, not a bnlab checkpoint, written by a
            newer bnlab, incomplete or damaged, or its network can no longer be built.

    Example::

        ck = load_checkpoint("model.pt")
        test = bnlab.data.load(ck.settings["dataset"], "test", standardize=ck.standardizer)
        evaluate(ck.model, test)["accuracy"]
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: write one with 'bnlab train -o PATH'")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        # torch's message is advice to turn the check off; keep only the line that says what it met
        lines = [ln.split("WeightsUnpickler error:")[-1].strip() for ln in text.splitlines()
                 if ln.strip() and not ln.startswith(("Weights only load failed", "Check the documentation"))]
        reason = next((ln for ln in lines if ln), type(e).__name__)
        if "global" in text.lower():  # a reference to a Python function or class: code
            raise CheckpointError(
                f"{path} was refused: it holds pickled Python objects (code), which bnlab never loads (it reads "
                "checkpoints with torch.load(weights_only=True)); bnlab checkpoints hold only tensors and plain "
                "values: re-save the model with 'bnlab train -o PATH' or bnlab.train.save_checkpoint") from None
        raise CheckpointError(f"{path} is not a readable checkpoint (unpickling failed: {reason[:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({_first_line(e)})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a bnlab checkpoint (made by 'bnlab train -o PATH')")
    if d.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer bnlab (format version {d['version']}); upgrade bnlab")
    missing = [k for k in ("spec", "build", "state_dict", "standardizer", "classes") if k not in d]
    if missing:
        raise CheckpointError(f"{path} is an incomplete bnlab checkpoint (missing {', '.join(missing)}): train it again")
    dev = resolve_device(device)
    model = _rebuild(path, d["spec"], d["build"], d["state_dict"])
    model.to(dev).eval()
    try:
        standardizer = Standardizer.from_dict(d["standardizer"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its standardization record is damaged ({_first_line(e)})") from None
    return Checkpoint(model, d["spec"], d["build"], standardizer, list(d["classes"]),
                      d.get("settings", {}), d.get("history", {}), str(path), d.get("extra") or {})


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _network(spec: dict, build: dict, folded: bool) -> nn.Module:
    """The network a spec describes (folded with :func:`bnlab.nn.fold_batchnorm` if asked)."""
    from bnlab.models import build as build_network  # models sit below train; imported here to keep startup light
    from bnlab.nn import fold_batchnorm

    model = build_network(spec, **{k: v for k, v in build.items() if k != "folded"})
    return fold_batchnorm(model)[0] if folded else model


def _shapes(model: nn.Module) -> tuple:
    """What tells a network from its folded self: its weights' shapes, and whether its convs are
    weight-standardized (folding freezes them as plain convs with the same shapes)."""
    from bnlab.nn.norms import WSConv2d

    return ({k: tuple(v.shape) for k, v in model.state_dict().items()},
            any(isinstance(m, WSConv2d) for m in model.modules()))


def _is_folded(model: nn.Module, spec: dict, build: dict) -> bool:
    with torch.device("meta"):
        if _shapes(model) == _shapes(_network(spec, build, False)):
            return False
        if _shapes(model) == _shapes(_network(spec, build, True)):
            return True
    raise CheckpointError("the model to save is not the network its spec describes (nor that network folded): "
                          "save the model that was built from this spec")


def _rebuild(path: Path, spec: dict, build: dict, state_dict: dict) -> nn.Module:
    """The checkpoint's network with its weights, checked before anything real is allocated.

    The spec is built first on the ``meta`` device (shapes only, no memory), and every parameter
    and buffer shape is compared with the stored tensors: a spec that disagrees with its own
    weights (or asks for absurd sizes) is refused before it could cost memory. Only then is the
    network built for real, so its size is bounded by the weights actually in the file.
    """
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: its weights are not a state dict of tensors")
    if not isinstance(spec, dict) or not isinstance(build, dict):
        raise CheckpointError(f"{path}: its network spec is damaged (spec and build options must be tables)")
    folded = bool(build.get("folded"))
    try:
        with torch.device("meta"):
            skeleton = _network(spec, build, folded)
    except BnlabError as e:
        raise CheckpointError(f"{path}: its network spec is invalid ({e})") from None
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError, OverflowError) as e:
        raise CheckpointError(f"{path}: its network spec cannot be built ({_first_line(e)})") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in state_dict.items()}
    if expected != stored:
        wrong = sorted(k for k in expected.keys() & stored.keys() if expected[k] != stored[k])
        detail = "; ".join(filter(None, [
            f"missing {', '.join(sorted(expected.keys() - stored.keys())[:3])}" if expected.keys() - stored.keys() else "",
            f"unexpected {', '.join(sorted(stored.keys() - expected.keys())[:3])}" if stored.keys() - expected.keys() else "",
            ", ".join(f"{k} is {stored[k]} but the spec needs {expected[k]}" for k in wrong[:3])]))
        raise CheckpointError(f"{path}: weights do not match its network spec ({detail}); the file is damaged or "
                              "was edited: train it again")
    model = _network(spec, build, folded)
    model.load_state_dict(state_dict)
    return model
