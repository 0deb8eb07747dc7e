"""Fold batch norm into neighbouring Conv/Linear layers for inference, and recalibrate it.

In eval mode a BN layer is the affine map ``y = s * x + t`` per channel, with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``. An affine map next to
a Conv or Linear layer can be merged into that layer's weights exactly:

- into the preceding layer (``conv/linear -> BN``, nothing between):
  ``W' = s[out] * W``, ``b' = s * b + t``;
- into the following layer (``BN -> linear``, optionally through ``Flatten``; ``BN -> conv`` when
  the conv has no zero padding, because padded zeros would not be transformed; reflect, replicate
  and circular padding copy transformed values and are fine):
  ``W' = W * s[in]``, ``b' = b + W @ t`` (summed over the kernel for convs).

Dropout and Identity are transparent in eval mode. Anything else between a layer and its BN
(ReLU, pooling, an addition, ...) blocks folding into that side, and the report says so.

Two ways of finding the neighbours:

- an ``nn.Sequential`` (nested Sequentials flattened) is read as a list of layers and the result is
  an ``nn.Sequential`` again;
- any other network is traced with ``torch.fx`` (BN layers, bnlab's included, stay single
  ``call_module`` nodes) and the result is an ``fx.GraphModule``. A neighbour is then a node of
  the dataflow graph, so a tensor read by two nodes (a residual branch and its shortcut) is not a
  neighbour of either: folding BN into a conv whose output is also read elsewhere, or into a
  layer after a BN whose output is also read elsewhere, would change what the other reader sees.

Folding uses the running statistics whatever the BN's mode, so the result computes what the
original computes in eval mode (BN in training mode is folded too; the folded copy is in eval
mode). BN without running statistics (``track_running_stats=False``) is left in place.
"""

from __future__ import annotations

import copy
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from bnlab.devices import model_device, to_device
from bnlab.errors import ConfigError
from bnlab.nn.batchnorm import _Dims1d, is_batchnorm

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


def _f64(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.cpu() if t.device.type == "mps" else t).double()  # MPS has no float64


def bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(s, t)`` of a BN layer in eval mode, in float64 (on the CPU for an MPS model)."""
    s = 1.0 / torch.sqrt(_f64(bn.running_var) + bn.eps)
    if bn.weight is not None:
        s = s * _f64(bn.weight)
    t = -_f64(bn.running_mean) * s
    if bn.bias is not None:
        t = t + _f64(bn.bias)
    return s, t


def _param(value64: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value64.to(like.dtype).to(like.device), requires_grad=False)


def _fold_into_preceding(layer: nn.Module, bn: nn.Module) -> None:
    s, t = bn_affine(bn)
    w = _f64(layer.weight)
    shape = [-1] + [1] * (w.dim() - 1)
    b = _f64(layer.bias) if layer.bias is not None else torch.zeros_like(s)
    layer.bias = _param(b * s + t, layer.weight)
    layer.weight = _param(w * s.view(shape), layer.weight)


def _fold_into_following(bn: nn.Module, layer: nn.Module, repeat: int = 1) -> None:
    s, t = bn_affine(bn)
    if repeat > 1:  # BN2d -> Flatten -> Linear: channel c covers `repeat` consecutive features
        s, t = s.repeat_interleave(repeat), t.repeat_interleave(repeat)
    w = _f64(layer.weight)
    shape = [1, -1] + [1] * (w.dim() - 2)
    b = _f64(layer.bias) if layer.bias is not None else w.new_zeros(w.shape[0])
    b = b + (w * t.view(shape)).sum(dim=tuple(range(1, w.dim())))
    layer.bias = _param(b, layer.weight)
    layer.weight = _param(w * s.view(shape), layer.weight)


def _zero_padded(conv: nn.Module) -> bool:
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        return False  # reflect/replicate/circular pad with (transformed) input values
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p != 0 for p in conv.padding)


def _following_check(bn: nn.Module, layer: nn.Module, flatten: bool) -> tuple[int, str | None]:
    """Whether ``bn`` (optionally through a Flatten) can fold into the ``layer`` it feeds:
    ``(repeat, None)``, where each BN channel covers ``repeat`` consecutive inputs of the layer, or
    ``(0, reason)``."""
    in_features = layer.weight.shape[1]
    if isinstance(layer, nn.Linear):
        repeat = in_features // bn.num_features
        if in_features % bn.num_features or (repeat > 1 and not flatten):
            return 0, f"{type(layer).__name__} expects {in_features} inputs, BN has {bn.num_features} channels"
        if not flatten and not isinstance(bn, (nn.BatchNorm1d, _Dims1d)):
            return 0, "a Linear right after a 2d/3d BN acts on the last (spatial) dim, not on BN's channels"
        return repeat, None
    if flatten or in_features * getattr(layer, "groups", 1) != bn.num_features:
        return 0, "channel counts do not line up"
    if getattr(layer, "groups", 1) != 1:
        return 0, "the following conv is grouped"
    if _zero_padded(layer):
        return 0, "the following conv pads with zeros, which BN's shift would not reach"
    return 1, None


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, FoldReport]:
    """An eval-mode copy of ``model`` with every foldable BN merged into a Conv/Linear neighbour.

    ``model`` is an ``nn.Sequential`` of layers (nested Sequentials are flattened, names kept;
    returns an ``nn.Sequential``) or any network ``torch.fx`` can trace (returns an
    ``fx.GraphModule`` whose ``state_dict`` holds the folded weights under the original names).
    The original is not changed. In eval mode the folded copy computes what ``model`` computes.
    The :class:`FoldReport` names each BN folded, into which layer, and each BN left with the
    reason; GroupNorm, LayerNorm and InstanceNorm layers are left (they cannot be folded) and
    reported. Weight-standardized convs become plain convs holding the standardized weights. Raises :class:`~bnlab.errors.ConfigError` for a bare layer, or a model torch.fx
    cannot trace (naming the module where tracing stopped).
    """
    if next(model.children(), None) is None:
        raise ConfigError(f"fold_batchnorm works on networks (an nn.Sequential, or an nn.Module torch.fx can trace), "
                          f"got a bare {type(model).__name__} layer")
    from bnlab.nn.norms import WSConv2d, is_per_example_norm, unstandardize_weights

    if any(isinstance(m, WSConv2d) for m in model.modules()):
        # a weight-standardized conv recomputes its weight from the stored one at every call:
        # freeze it as a plain conv holding the standardized weight first (the same function)
        model = copy.deepcopy(model)
        unstandardize_weights(model)
    if not isinstance(model, nn.Sequential) or _hides_batchnorm(model):
        folded, report = _fold_graph(model)
    else:
        folded, report = _fold_sequential(model)
    for name, m in model.named_modules():
        if is_per_example_norm(m):
            report.left.append({"bn": name, "reason": f"{type(m).__name__} normalizes each example with its own "
                                "statistics (it has no running ones): not a fixed per-channel scale and shift, so "
                                "it cannot be folded"})
    return folded, report


def _hides_batchnorm(model: nn.Sequential) -> bool:
    """True if a BN sits inside a layer that is not a Sequential (e.g. a residual block): the
    list view of the Sequential cannot see its neighbours, the traced graph can."""
    return any(not is_batchnorm(m) and any(is_batchnorm(sub) for sub in m.modules()) for _, m in _flatten(model))


def _fold_sequential(model: nn.Sequential) -> tuple[nn.Sequential, FoldReport]:
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
            repeat, blocker = _following_check(bn, layer, flatten)
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


# ------------------------------------------------------------------ any torch.fx-traceable network

class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping every BN layer (bnlab's too) as one ``call_module`` node and
    remembering the innermost module whose forward could not be traced."""

    def __init__(self):
        super().__init__()
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_batchnorm(m) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module sees the exception first
                try:
                    self.failed_in = f"module '{self.path_of_module(m)}' ({type(m).__name__})"
                except NameError:
                    self.failed_in = f"a {type(m).__name__} that is not a registered submodule"
            raise


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # user code: anything may go wrong, and the message must say where and why
        where = tracer.failed_in or f"{type(model).__name__}.forward itself"
        text = str(e).strip()
        reason = f"{type(e).__name__}: {text.splitlines()[0] if text else 'no message'}"
        raise ConfigError(f"fold_batchnorm cannot trace {type(model).__name__} with torch.fx: tracing stopped in "
                          f"{where}: {reason[:300]}; folding a non-Sequential network needs a forward without "
                          "Python control flow on tensor values") from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _describe(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} '{node.target}'"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', node.target)}()"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "placeholder":
        return f"the model input '{node.target}'"
    if node.op == "output":
        return "the model output"
    return f"'{node.target}'"


def _is_flatten(node: fx.Node, modules: dict) -> bool:
    """``nn.Flatten()``, ``torch.flatten(x, 1)`` or ``x.flatten(1)``: channels become feature blocks."""
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if (node.op, node.target) in (("call_function", torch.flatten), ("call_method", "flatten")):
        defaults = [node.kwargs.get("start_dim", 0), node.kwargs.get("end_dim", -1)]
        return list(node.args[1:]) + defaults[len(node.args) - 1:] == [1, -1]
    return False


def _sole_module_call(node: fx.Node, calls: Counter) -> bool:
    # a module called from two places would change at both when its weights change
    return calls[node.target] == 1 and len(node.args) == 1 and not node.kwargs


def _fold_graph(model: nn.Module) -> tuple[fx.GraphModule, FoldReport]:
    # eval: a forward that branches on self.training is traced along its inference branch
    gm = _trace(copy.deepcopy(model).eval())
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    report = FoldReport()
    folded_bns: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.nn.functional.batch_norm:
            report.left.append({"bn": node.name, "reason": "a functional batch_norm call, not a BN layer"})
            continue
        if node.op != "call_module" or not is_batchnorm(modules[node.target]):
            continue
        bn, name = modules[node.target], node.target
        if bn.running_mean is None:
            report.left.append({"bn": name, "reason": "track_running_stats=False: eval uses batch statistics"})
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            report.left.append({"bn": name, "reason": "called with other than one positional input"})
            continue
        src = node.args[0]

        # preceding side: conv/linear -> (dropout/identity ...) -> BN, each output read once
        path = [src]  # from BN's input back to the candidate layer
        while (path[-1].op == "call_module" and isinstance(modules[path[-1].target], _TRANSPARENT)
               and len(path[-1].args) == 1 and isinstance(path[-1].args[0], fx.Node)):
            path.append(path[-1].args[0])
        prev = path[-1]
        shared = next((i for i, n in enumerate(path) if len(n.users) > 1), None)
        layer = modules.get(prev.target) if prev.op == "call_module" else None
        if isinstance(layer, _FOLDABLE) and shared is None and _sole_module_call(prev, calls) \
                and layer.weight.shape[0] == bn.num_features:
            _fold_into_preceding(layer, bn)
            report.folded.append({"bn": name, "into": prev.target, "side": "preceding"})
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            folded_bns.add(name)
            continue
        before = _describe(prev, modules)
        if not isinstance(layer, _FOLDABLE):
            pre_reason = f"preceded by {before}"
        elif shared is not None:
            toward_bn = path[shared - 1] if shared else node
            others = ", ".join(_describe(u, modules) for u in path[shared].users if u is not toward_bn)
            whose = "whose" if shared == len(path) - 1 else f"through {_describe(path[shared], modules)}, whose"
            pre_reason = f"preceded by {before}, {whose} output is also read by {others}"
        elif not _sole_module_call(prev, calls):
            pre_reason = f"preceded by {before}, which is called more than once"
        else:
            pre_reason = f"preceded by {before} with {layer.weight.shape[0]} outputs for {bn.num_features} channels"

        # following side: BN -> (dropout/identity/flatten ...) -> conv/linear, each output read once
        nxt, flatten = node, False
        while len(nxt.users) == 1:
            user = next(iter(nxt.users))
            transparent = user.op == "call_module" and isinstance(modules[user.target], _TRANSPARENT)
            if not (transparent or _is_flatten(user, modules)) or user.args[0] is not nxt:
                break
            flatten = flatten or not transparent
            nxt = user
        if len(nxt.users) != 1:
            readers = ", ".join(_describe(u, modules) for u in nxt.users) or "nothing"
            whose = "its" if nxt is node else f"{_describe(nxt, modules)}'s"
            post_reason = f"{whose} output is read by {len(nxt.users)} nodes ({readers})"
        else:
            user = next(iter(nxt.users))
            after = _describe(user, modules)
            layer = modules.get(user.target) if user.op == "call_module" else None
            if not isinstance(layer, _FOLDABLE):
                post_reason = f"followed by {after}"
            elif not _sole_module_call(user, calls):
                post_reason = f"followed by {after}, which is called more than once"
            else:
                repeat, blocker = _following_check(bn, layer, flatten)
                if blocker is None:
                    _fold_into_following(bn, layer, repeat)
                    report.folded.append({"bn": name, "into": user.target, "side": "following"})
                    node.replace_all_uses_with(src)
                    gm.graph.erase_node(node)
                    folded_bns.add(name)
                    continue
                post_reason = f"followed by {after}: {blocker}"
        report.left.append({"bn": name, "reason": f"{pre_reason}; {post_reason}"})

    still_called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name in sorted(folded_bns - still_called):
        gm.delete_submodule(name)
    gm.graph.lint()
    gm.recompile()
    gm.eval()
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm, report


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
        x = args[0].detach()
        x = (x.cpu() if x.device.type == "mps" else x).double()  # MPS has no float64
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
        device = model_device(model)
        for batch in batches:
            model(to_device(batch[0] if isinstance(batch, (tuple, list)) else batch, device))
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
