"""Evaluation reports and single-image prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bnlab.errors import ConfigError, DataFormatError
from bnlab.train.loop import predict_logits


def evaluate(model, data, batch_size: int = 1000) -> dict:
    """Accuracy, mean loss, per-class precision/recall/F1/support and the confusion matrix
    (rows: true class, columns: predicted), computed with ``sklearn.metrics``."""
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


def format_report(rep: dict) -> str:
    lines = [f"{rep['dataset']} {rep['split']}: {rep['examples']} examples, accuracy {rep['accuracy']:.4f}, "
             f"loss {rep['loss']:.4f}, macro F1 {rep['macro_f1']:.4f}",
             f"{'class':<16} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    for row in rep["per_class"]:
        lines.append(f"{row['class'][:16]:<16} {row['precision']:>9.4f} {row['recall']:>7.4f} {row['f1']:>7.4f} {row['support']:>8}")
    return "\n".join(lines)


def load_image_for(ckpt, path: str | Path, invert: bool = False) -> torch.Tensor:
    """One image file as a standardized ``(1, C, H, W)`` batch matching the checkpoint's input.

    ``invert`` turns dark-on-light pictures (a photo of a shirt on a table) into the light-on-dark
    look of MNIST-style training data (pixel -> 255 - pixel) before standardizing.
    """
    from bnlab.data.imagefolder import load_image

    shape = ckpt.input_shape
    if len(shape) != 3:
        raise ConfigError(f"this model takes feature vectors of shape {shape}, not images")
    c, h, w = shape
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"image {path} does not exist")
    try:
        arr = load_image(path, h, c) if h == w else None
        if arr is None:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im.convert("L" if c == 1 else "RGB").resize((w, h)), dtype=np.uint8)
            arr = arr[None] if c == 1 else arr.transpose(2, 0, 1)
    except (OSError, ValueError, SyntaxError):
        raise DataFormatError(f"{path} is not an image Pillow can read (PNG, JPEG, BMP, ...)") from None
    if invert:
        arr = 255 - arr
    return ckpt.standardizer(torch.from_numpy(np.ascontiguousarray(arr))[None])


@torch.no_grad()
def predict_images(ckpt, paths, top_k: int = 3, invert: bool = False) -> list[dict]:
    """Top-k classes with probabilities for each image file (``invert``: see :func:`load_image_for`)."""
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    k = min(top_k, len(ckpt.classes))
    results = []
    for p in paths:
        x = load_image_for(ckpt, p, invert)
        probs = F.softmax(ckpt.model(x), dim=1)[0]
        val, idx = probs.topk(k)
        results.append({"image": str(p), "top": [{"class": ckpt.classes[i], "index": int(i), "probability": float(v)}
                                                 for v, i in zip(val.tolist(), idx.tolist())]})
    return results
