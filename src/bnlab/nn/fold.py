"""Fold batch norm into neighbouring Conv/Linear layers for inference, and recalibrate it.

In eval mode a BN layer is the affine map ``y = s * x + t`` per channel, with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``. An affine map next to
a Conv or Linear layer can be merged into that layer's weights exactly:

- into the preceding layer (``conv/linear -> BN``, nothing between):
  ``W' = s[out] * W``, ``b' = s * b + t``;
- into the following layer (``BN -> linear``, optionally through ``Flatten``; ``BN -> conv`` when
  the conv has no zero padding, because padded zeros would not be transformed):
  ``W' = W * s[in]``, ``b' = b + W @ t`` (summed over the kernel for convs).

Dropout and Identity are transparent in eval mode. Anything else between a layer and its BN
(ReLU, pooling, ...) blocks folding into that side, and the report says so.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from bnlab.errors import ConfigError
from bnlab.nn.batchnorm import is_batchnorm

_TRANSPARENT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(repr=False)
class FoldReport:
    """What ``fold_batchnorm`` did: ``folded`` rows (bn, into, side) and ``left`` rows (bn, reason)."""

    folded: list[dict] = field(default_factory=list)
    left: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} batch-norm layer(s), left {len(self.left)}"]
        lines += [f"  {r['bn']} -> {r['into']} ({r['side']} layer)" for r in self.folded]
        lines += [f"  {r['bn']} left: {r['reason']}" for r in self.left]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"folded": self.folded, "left": self.left}

    def __repr__(self) -> str:
        left = f": {', '.join(r['bn'] for r in self.left[:3])}{', ...' if len(self.left) > 3 else ''}" if self.left else ""
        return f"FoldReport(folded {len(self.folded)}, left {len(self.left)}{left})"


def _flatten(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    items = []
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            items.extend(_flatten(child, full + "."))
        else:
            items.append((full, child))
    return items


def bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(s, t)`` of a BN layer in eval mode, in float64."""
    var = bn.running_var.detach().double()
    s = 1.0 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.detach().double()
    t = -bn.running_mean.detach().double() * s
    if bn.bias is not None:
        t = t + bn.bias.detach().double()
    return s, t


def _set_bias(layer: nn.Module, bias64: torch.Tensor) -> None:
    ref = layer.weight
    layer.bias = nn.Parameter(bias64.to(ref.dtype).to(ref.device), requires_grad=False)


def _fold_into_preceding(layer: nn.Module, bn: nn.Module) -> None:
    s, t = bn_affine(bn)
    w = layer.weight.detach().double()
    shape = [-1] + [1] * (w.dim() - 1)
    layer.weight = nn.Parameter((w * s.view(shape)).to(layer.weight.dtype), requires_grad=False)
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(s)
    _set_bias(layer, b * s + t)


def _fold_into_following(bn: nn.Module, layer: nn.Module, repeat: int = 1) -> None:
    s, t = bn_affine(bn)
    if repeat > 1:  # BN2d -> Flatten -> Linear: channel c covers `repeat` consecutive features
        s, t = s.repeat_interleave(repeat), t.repeat_interleave(repeat)
    w = layer.weight.detach().double()
    shape = [1, -1] + [1] * (w.dim() - 2)
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    b = b + (w * t.view(shape)).sum(dim=tuple(range(1, w.dim())))
    layer.weight = nn.Parameter((w * s.view(shape)).to(layer.weight.dtype), requires_grad=False)
    _set_bias(layer, b)


def _following_blocker(layer: nn.Module, bn: nn.Module) -> str | None:
    if isinstance(layer, nn.Linear):
        return None
    if getattr(layer, "groups", 1) != 1:
        return "the following conv is grouped"
    if any(p != 0 for p in layer.padding) if not isinstance(layer.padding, str) else layer.padding != "valid":
        return "the following conv pads with zeros, which BN's shift would not reach"
    return None


def fold_batchnorm(model: nn.Module) -> tuple[nn.Sequential, FoldReport]:
    """An eval-mode copy of ``model`` with every foldable BN merged into a Conv/Linear neighbour.

    ``model`` must be an ``nn.Sequential`` (nested Sequentials are flattened, names kept). The
    original is not changed. Outputs of the folded copy equal the unfolded model's in eval mode.
    """
    if not isinstance(model, nn.Sequential):
        raise ConfigError(f"fold_batchnorm works on nn.Sequential models, got {type(model).__name__}")
    items = [(name, copy.deepcopy(m)) for name, m in _flatten(model)]
    report = FoldReport()
    removed: set[int] = set()
    for i, (name, bn) in enumerate(items):
        if not is_batchnorm(bn):
            continue
        if bn.running_mean is None:
            report.left.append({"bn": name, "reason": "track_running_stats=False: eval uses batch statistics"})
            continue
        # preceding side
        j = i - 1
        while j >= 0 and (isinstance(items[j][1], _TRANSPARENT) or j in removed):
            j -= 1
        if j >= 0 and isinstance(items[j][1], _FOLDABLE) and items[j][1].weight.shape[0] == bn.num_features:
            _fold_into_preceding(items[j][1], bn)
            report.folded.append({"bn": name, "into": items[j][0], "side": "preceding"})
            removed.add(i)
            continue
        before = type(items[j][1]).__name__ if j >= 0 else "the input"
        # following side
        k, flatten = i + 1, False
        while k < len(items) and (isinstance(items[k][1], _TRANSPARENT) or isinstance(items[k][1], nn.Flatten)):
            flatten = flatten or isinstance(items[k][1], nn.Flatten)
            k += 1
        after = type(items[k][1]).__name__ if k < len(items) else "the output"
        if k < len(items) and isinstance(items[k][1], _FOLDABLE):
            layer = items[k][1]
            in_features = layer.weight.shape[1]
            repeat = in_features // bn.num_features if isinstance(layer, nn.Linear) else 1
            if isinstance(layer, nn.Linear) and (in_features % bn.num_features or (repeat > 1 and not flatten)):
                blocker = f"{after} expects {in_features} inputs, BN has {bn.num_features} channels"
            elif not isinstance(layer, nn.Linear) and (flatten or in_features != bn.num_features):
                blocker = "channel counts do not line up"
            else:
                blocker = _following_blocker(layer, bn)
            if blocker is None:
                _fold_into_following(bn, layer, repeat)
                report.folded.append({"bn": name, "into": items[k][0], "side": "following"})
                removed.add(i)
                continue
            reason = f"preceded by {before}; {blocker}"
        else:
            reason = f"preceded by {before} and followed by {after}: no adjacent Conv/Linear"
        report.left.append({"bn": name, "reason": reason})
    folded = nn.Sequential(OrderedDict((name.replace(".", "_"), m) for i, (name, m) in enumerate(items) if i not in removed))
    folded.eval()
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded, report


@torch.no_grad()
def population_statistics(model: nn.Module, batches) -> dict:
    """Exact per-channel mean and unbiased variance of every BN layer's input over ``batches``.

    The model runs forward without gradients with its BN layers in training mode (each sees the
    activations it saw during training) and every other layer in eval mode (no dropout noise).
    Sums are accumulated in float64. Returns ``{bn_module: (mean, var)}``; nothing in the model
    changes (modes, running statistics and ``num_batches_tracked`` are restored).
    """
    bns = [m for m in model.modules() if is_batchnorm(m)]
    if not bns:
        return {}
    modes = {m: m.training for m in model.modules()}
    saved = {bn: (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for bn in bns if bn.running_mean is not None}
    sums = {bn: [0, None, None] for bn in bns}

    def hook(bn, args):
        x = args[0].detach().double()
        dims = [0] + list(range(2, x.dim()))
        acc = sums[bn]
        acc[0] += x.numel() // x.shape[1]
        s1, s2 = x.sum(dims), (x * x).sum(dims)
        acc[1] = s1 if acc[1] is None else acc[1] + s1
        acc[2] = s2 if acc[2] is None else acc[2] + s2

    handles = [bn.register_forward_pre_hook(hook) for bn in bns]
    try:
        model.eval()
        for bn in bns:
            bn.train()
        seen = 0
        for batch in batches:
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            seen += 1
        if seen == 0:
            raise ConfigError("no batches to compute BN statistics from")
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
        for bn, (rm, rv, nbt) in saved.items():
            bn.running_mean.copy_(rm)
            bn.running_var.copy_(rv)
            bn.num_batches_tracked.copy_(nbt)
    out = {}
    for bn in bns:
        n, s1, s2 = sums[bn]
        if s1 is None:
            continue  # not reached by the forward pass
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0) * (n / max(n - 1, 1))
        out[bn] = (mean, var)
    return out


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches) -> nn.Module:
    """Replace every BN layer's running statistics by exact population statistics ("precise BN").

    ``batches`` is an iterable of input tensors or ``(inputs, labels)`` pairs; see
    :func:`population_statistics` for how they are computed. ``running_mean`` becomes the
    population mean and ``running_var`` the unbiased population variance; modes, momentum and
    ``num_batches_tracked`` are left as they were.
    """
    for bn, (mean, var) in population_statistics(model, batches).items():
        if bn.running_mean is None:
            continue
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))
    return model
