"""Networks: specs (data), the builder, and the zoo of reference networks.

>>> from bnlab import models
>>> net = models.build("deeplizard-cnn", bn="tutorial", input_shape=(1, 28, 28), num_classes=10)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bnlab.models.spec import (ACTIVATIONS, BN_IMPLS, BN_PLACEMENTS, NORMS, build_from_spec, format_summary,
                               load_spec, output_shapes, summary, validate_spec)
from bnlab.models.zoo import ZOO, get_spec

__all__ = ["build", "resolve_spec", "ZOO", "get_spec", "load_spec", "validate_spec", "summary", "format_summary",
           "output_shapes", "ACTIVATIONS", "BN_PLACEMENTS", "NORMS", "BN_IMPLS"]


def resolve_spec(name_or_spec) -> dict:
    """A validated spec from a zoo name, a ``.toml`` path, or a spec dict."""
    if isinstance(name_or_spec, dict):
        return validate_spec(name_or_spec)
    text = str(name_or_spec)
    if text.endswith(".toml") or Path(text).is_file():
        return load_spec(text)
    return validate_spec(get_spec(text))


def build(name_or_spec, *, input_shape, num_classes: int, bn: str = "none", norm: str = "batch",
          bn_impl: str = "bnlab", activation: str | None = None, dropout: float | None = None,
          virtual_batch_size: int = 32, seed: int | None = None) -> nn.Sequential:
    """Build a network by zoo name, spec file or spec dict, with BN placed as asked.

    Args:
        name_or_spec: a zoo name (``bnlab models list``), a spec ``.toml`` path or a spec dict.
        input_shape: one example's shape without the batch, e.g. ``(1, 28, 28)``.
        num_classes: the number of logits.
        bn: ``none``, ``before``/``after`` (the activation of every conv/dense layer but the
            last), or ``tutorial`` (the zoo entry's own placement).
        norm: ``batch``, ``renorm`` or ``ghost`` (virtual batches of ``virtual_batch_size``).
        bn_impl: ``bnlab`` or ``torch`` layers.
        seed: initialize the weights from ``torch.manual_seed(seed)``, exactly as ``bnlab train
            --seed`` does (``None``: from torch's current random state).

    Example::

        net = build("deeplizard-cnn", bn="tutorial", input_shape=(1, 28, 28), num_classes=10, seed=50)
    """
    if seed is not None:
        torch.manual_seed(seed)
    return build_from_spec(resolve_spec(name_or_spec), input_shape=input_shape, num_classes=num_classes, bn=bn,
                           norm=norm, bn_impl=bn_impl, activation=activation, dropout=dropout,
                           virtual_batch_size=virtual_batch_size)
