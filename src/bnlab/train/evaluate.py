"""Evaluation reports, and prediction on image files that says what it did and when not to trust it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bnlab.devices import model_device, to_device
from bnlab.errors import BnlabError, ConfigError, DataFormatError
from bnlab.train.loop import predict_logits


def evaluate(model, data, batch_size: int = 1000) -> dict:
    """Accuracy, mean loss, per-class precision/recall/F1/support and the confusion matrix
    (rows: true class, columns: predicted), computed with ``sklearn.metrics``.

    Args:
        model: the network (evaluated in eval mode; its mode is restored).
        data: a :class:`bnlab.data.Dataset`, standardized as the training data was.
        batch_size: examples per forward pass.

    Returns:
        ``{"dataset", "split", "examples", "accuracy", "loss", "per_class", "macro_f1",
        "confusion"}``: accuracy in 0..1, mean cross-entropy, one ``{"class", "precision",
        "recall", "f1", "support"}`` row per class, and the confusion matrix as a list of rows.
        :func:`format_evaluation` prints it.

    Example::

        rep = evaluate(net, test)
        rep["accuracy"], rep["confusion"][0]   # row 0: how examples of class 0 were classified
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    logits, y = predict_logits(model, data, batch_size)
    pred = logits.argmax(1)
    labels = list(range(len(data.classes)))
    p, r, f, s = precision_recall_fscore_support(y.numpy(), pred.numpy(), labels=labels, zero_division=0)
    cm = confusion_matrix(y.numpy(), pred.numpy(), labels=labels)
    return {
        "dataset": data.name, "split": data.split, "examples": len(data),
        "accuracy": float((pred == y).double().mean()),
        "loss": float(F.cross_entropy(logits, y)),
        "per_class": [{"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                       "support": int(s[i])} for i, c in enumerate(data.classes)],
        "macro_f1": float(np.mean(f)),
        "confusion": cm.tolist(),
    }


def format_evaluation(rep: dict) -> str:
    """An :func:`evaluate` report as text: a headline (dataset, split, examples, accuracy, loss,
    macro F1) and one line of precision, recall, F1 and support per class.

    Args:
        rep: the dict :func:`evaluate` returns.

    Returns:
        The lines as one string (the confusion matrix is not included).

    Example::

        ck = load_checkpoint("model.pt")
        test = bnlab.data.load(ck.settings["dataset"], "test", standardize=ck.standardizer)
        print(format_evaluation(evaluate(ck.model, test)))
    """
    lines = [f"{rep['dataset']} {rep['split']}: {rep['examples']} examples, accuracy {rep['accuracy']:.4f}, "
             f"loss {rep['loss']:.4f}, macro F1 {rep['macro_f1']:.4f}",
             f"{'class':<16} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    for row in rep["per_class"]:
        lines.append(f"{row['class'][:16]:<16} {row['precision']:>9.4f} {row['recall']:>7.4f} {row['f1']:>7.4f} {row['support']:>8}")
    return "\n".join(lines)


# ---------------------------------------------------------------- prediction on image files

INVERT_CHOICES = ("auto", "yes", "no")
# invert="auto" inverts when the training images are dark (mean below this fraction of the pixel
# range: MNIST 0.13, Fashion-MNIST 0.29) and the picture's background is light (its border
# median above LIGHT_BACKGROUND): dark objects on paper versus light objects on black.
DARK_TRAINING_MEAN = 0.4
LIGHT_BACKGROUND = 0.6
# A standardized picture whose mean or std falls outside these bounds is far from the training
# data. No Fashion-MNIST training image has |mean| > 1.4; 0.03% have std below 0.25.
FAR_MEAN = 1.5
FAR_STD = (0.25, 3.0)
# Without zscore statistics only a flat picture is detectable: pixel std below this fraction of 255.
FLAT_STD = 0.025


def prepare_image(ckpt, path: str | Path, invert: str | bool = "auto") -> tuple[torch.Tensor, dict, list[str]]:
    """One image file as a standardized ``(1, C, H, W)`` batch matching the checkpoint's input,
    what was done to it and warnings about the result.

    The picture is converted to the checkpoint's channels and scaled to fit its input size,
    keeping the aspect ratio and padding with the picture's own background (stretched instead
    for checkpoints trained on an image folder, whose images were stretched). ``invert``
    (``"yes"``/``True``, ``"no"``/``False`` or ``"auto"``) maps pixel -> 255 - pixel, turning a dark
    object on a light background into the light-on-dark look of MNIST-style training data;
    ``"auto"`` does so when the training images are dark and the picture's border is light.
    """
    from bnlab.data.imagefolder import load_image

    invert = _invert_choice(invert)
    shape = ckpt.input_shape
    if len(shape) != 3:
        raise ConfigError(f"this model takes feature vectors of shape {shape}, not images")
    c, h, w = shape
    img = load_image(path, (h, w), c, keep_aspect=ckpt.settings.get("dataset") != "image-folder")
    inverted, reason = _should_invert(ckpt.standardizer, img.background, invert)
    pixels = 255 - img.pixels if inverted else img.pixels
    x = ckpt.standardizer(torch.from_numpy(pixels)[None])
    steps = {**img.steps(), "inverted": inverted, "invert_reason": reason}
    return x, steps, _far_from_training(ckpt.standardizer, x, img.background, inverted)


def _invert_choice(invert: str | bool) -> str:
    if isinstance(invert, bool):
        return "yes" if invert else "no"
    if invert not in INVERT_CHOICES:
        raise ConfigError(f"invert must be one of {', '.join(INVERT_CHOICES)}, got {invert!r}")
    return invert


def _should_invert(standardizer, background: tuple[float, ...], invert: str) -> tuple[bool, str]:
    """Whether to invert and why, in words."""
    if invert != "auto":
        return invert == "yes", f"requested: invert={invert}"
    if standardizer.mode != "zscore":
        return False, (f"the checkpoint does not record the training mean (standardize={standardizer.mode}): "
                       "not inverted; use invert=yes for dark objects on a light background")
    train = float(np.mean(standardizer.mean)) / 255
    border = float(np.mean(background)) / 255
    if train >= DARK_TRAINING_MEAN:
        return False, f"the training images are not dark (mean {train:.2f})"
    if border <= LIGHT_BACKGROUND:
        return False, f"not a light background (border median {border:.2f})"
    return True, f"light background (border median {border:.2f}) unlike the dark training images (mean {train:.2f})"


def _far_from_training(standardizer, x: torch.Tensor, background: tuple[float, ...], inverted: bool) -> list[str]:
    """A warning if the standardized picture's mean/std are far from the training data's (0 and 1
    for zscore; for other standardizations only a flat picture is detectable)."""
    mean, std = float(x.mean()), float(x.std(unbiased=False))
    flat = std * float(np.mean(standardizer.std)) < FLAT_STD * 255  # std back in pixel units
    if standardizer.mode == "zscore":
        far = abs(mean) > FAR_MEAN or not FAR_STD[0] <= std <= FAR_STD[1]
    else:
        far = flat
    if not far:
        return []
    if flat or std < FAR_STD[0]:
        hint = " (a plain, nearly uniform image?)"
    elif not inverted and float(np.mean(background)) / 255 > LIGHT_BACKGROUND:
        hint = " (a dark object on a light background? try --invert yes)"
    else:
        hint = ""
    return [f"far from the training data: standardized mean {mean:.2f}, std {std:.2f}{hint}; "
            "the prediction is unreliable"]


@torch.no_grad()
def predict_images(ckpt, paths, top_k: int = 3, invert: str | bool = "auto", errors: str = "raise") -> list[dict]:
    """Top-k classes with probabilities for each image, with what was done to it and warnings.

    ``paths`` are files, directories (their image files, sorted, not recursive) or glob patterns.
    Each result is ``{"image", "top": [{"class", "index", "probability"}], "preprocess": {...},
    "warnings": [...]}``; ``invert``: see :func:`prepare_image`. ``errors="raise"`` stops at the
    first unreadable file or empty pattern with its :class:`BnlabError`; ``errors="report"``
    records it as ``{"image", "error"}`` in its place and goes on with the others.

    Args:
        ckpt: a :class:`~bnlab.train.Checkpoint` of an image model (its model, standardizer,
            input shape and class names are used).
        paths: image files, directories or glob patterns.
        top_k: how many classes per image (at most the number of classes).
        invert: ``"auto"``, ``"yes"``/``True`` or ``"no"``/``False``.
        errors: ``"raise"`` or ``"report"``.

    Returns:
        One result dict per image, in the order of ``paths``.

    Raises:
        ConfigError: ``top_k`` below 1, an unknown ``invert`` or ``errors``, or a checkpoint whose
            network takes feature vectors, not images.
        DataFormatError: with ``errors="raise"``, a missing or unreadable image file.
        DataNotFoundError: with ``errors="raise"``, a directory or pattern without images.

    Example::

        for r in predict_images(load_checkpoint("model.pt"), ["photos/*.png"], top_k=1):
            print(r["image"], r["top"][0]["class"], f"{r['top'][0]['probability']:.2f}", *r["warnings"])
    """
    from bnlab.data.imagefolder import image_paths

    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    if errors not in ("raise", "report"):
        raise ConfigError(f"errors must be 'raise' or 'report', got {errors!r}")
    invert = _invert_choice(invert)
    k = min(top_k, len(ckpt.classes))
    results = []
    for arg in paths:
        try:
            files = image_paths(arg)
        except BnlabError as e:
            if errors == "raise":
                raise
            results.append({"image": str(arg), "error": str(e)})
            continue
        for p in files:
            try:
                x, steps, warns = prepare_image(ckpt, p, invert)
            except DataFormatError as e:
                if errors == "raise":
                    raise
                results.append({"image": str(p), "error": str(e)})
                continue
            probs = F.softmax(ckpt.model(to_device(x, model_device(ckpt.model))), dim=1)[0].cpu()
            val, idx = probs.topk(k)
            top = [{"class": ckpt.classes[i], "index": int(i), "probability": float(v)}
                   for v, i in zip(val.tolist(), idx.tolist())]
            results.append({"image": str(p), "top": top, "preprocess": steps, "warnings": warns})
    return results


def format_preprocess(steps: dict) -> str:
    """One short line saying what :func:`prepare_image` did, e.g.
    ``100x40 RGB -> L, resized to 28x11, padded to 28x28, inverted (light background ...)``."""
    parts = [f"{steps['original_size'][0]}x{steps['original_size'][1]} {steps['mode']}"]
    if steps["converted_to"]:
        parts[0] += f" -> {steps['converted_to']}"
    if steps["resized_to"]:
        parts.append(f"resized to {steps['resized_to'][0]}x{steps['resized_to'][1]}")
    if steps["padded_to"]:
        parts.append(f"padded to {steps['padded_to'][0]}x{steps['padded_to'][1]}")
    parts.append(f"{'inverted' if steps['inverted'] else 'not inverted'} ({steps['invert_reason']})")
    return ", ".join(parts)
