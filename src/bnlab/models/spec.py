"""Networks as data: a list of layer specs, and the builder that turns it into ``nn.Sequential``.

A spec is a dict (from Python or a TOML file)::

    {"name": "tiny", "activation": "relu",
     "layers": [{"type": "conv", "out": 8, "kernel": 3},
                {"type": "pool", "size": 2},
                {"type": "flatten"},
                {"type": "dense", "out": 64},
                {"type": "dropout", "p": 0.5},
                {"type": "dense", "out": "classes"}]}

``conv`` and ``dense`` layers are followed by the network's activation, except the last layer
(the logits). A spec may instead write its ``activation`` layers explicitly (then none are
added, and ``bn="before"/"after"`` places BN around those); explicit ``bn`` layers are kept only
with ``bn="tutorial"``. Input channels, features and the class count come
from the dataset, so one spec serves many datasets wherever the spatial sizes allow.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn

from bnlab._toml import read_toml
from bnlab.errors import ConfigError
from bnlab.nn.norms import BN_IMPLS, NORMS, norm_layer

LAYER_KEYS = {
    "conv": {"out", "kernel", "stride", "padding", "bias"},
    "pool": {"kind", "size", "stride"},
    "flatten": set(),
    "dense": {"out", "bias"},
    "dropout": {"p"},
    "activation": {"fn"},
    "bn": set(),
}
SPEC_KEYS = {"name", "description", "activation", "layers", "init", "tutorial_bn", "datasets"}
ACTIVATIONS = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
}
BN_PLACEMENTS = ("none", "before", "after", "tutorial")


def _where(spec: dict, i: int | None = None) -> str:
    name = spec.get("name", "spec")
    return f"{name}: layer {i + 1}" if i is not None else name


def validate_spec(spec: dict) -> dict:
    """Check a layer spec's structure; returns a deep copy with defaults filled in.

    Checks the top-level keys, the activation, and each layer's type, keys, ``out`` (a positive
    integer or ``"classes"``), conv ``kernel``, ``stride``, ``padding``, ``bias``, dropout ``p``, pool
    ``kind`` and ``size`` and activation ``fn``, and
    that the last layer is ``dense``. Sizes that depend on the input (does a conv fit?) and the
    ``tutorial_bn`` layers are checked when the network is built.

    Args:
        spec: a dict as in the module docstring.

    Returns:
        A deep copy with ``name`` (default ``"custom"``) and ``activation`` (default ``"relu"``) set.

    Raises:
        ConfigError: the first problem found, naming the spec and the layer (counted from 1).

    Example::

        spec = validate_spec({"layers": [{"type": "flatten"}, {"type": "dense", "out": "classes"}]})
        spec["name"], spec["activation"]   # ('custom', 'relu')
    """
    if not isinstance(spec, dict):
        raise ConfigError(f"a network spec must be a table/dict, got {type(spec).__name__}")
    spec = copy.deepcopy(spec)
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"{_where(spec)}: unknown spec key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(SPEC_KEYS))}")
    spec.setdefault("name", "custom")
    spec.setdefault("activation", "relu")
    if spec["activation"] not in ACTIVATIONS:
        raise ConfigError(f"{_where(spec)}: unknown activation {spec['activation']!r}; choose one of {', '.join(ACTIVATIONS)}")
    layers = spec.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ConfigError(f"{_where(spec)}: 'layers' must be a non-empty list of layer tables")
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or "type" not in layer:
            raise ConfigError(f"{_where(spec, i)}: each layer needs a 'type' ({', '.join(LAYER_KEYS)})")
        kind = layer["type"]
        if kind not in LAYER_KEYS:
            raise ConfigError(f"{_where(spec, i)}: unknown layer type {kind!r}; choose one of {', '.join(LAYER_KEYS)}")
        bad = set(layer) - LAYER_KEYS[kind] - {"type"}
        if bad:
            raise ConfigError(f"{_where(spec, i)}: {kind} layer has unknown key(s) {', '.join(sorted(bad))}; "
                              f"allowed: {', '.join(sorted(LAYER_KEYS[kind])) or 'none'}")
        if kind in ("conv", "dense"):
            out = layer.get("out")
            if not (out == "classes" or (isinstance(out, int) and out > 0)):
                raise ConfigError(f"{_where(spec, i)}: {kind} 'out' must be a positive integer or \"classes\", got {out!r}")
        if kind == "conv" and not (isinstance(layer.get("kernel"), int) and layer["kernel"] > 0):
            raise ConfigError(f"{_where(spec, i)}: conv needs a positive integer 'kernel'")
        p = layer.get("p", 0.5)
        if kind == "dropout" and not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1):
            raise ConfigError(f"{_where(spec, i)}: dropout p must be a number in [0, 1), got {p!r}")
        for key, minimum in (("stride", 1), ("padding", 0), ("size", 1)):
            value = layer.get(key)
            if key in layer and not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
                raise ConfigError(f"{_where(spec, i)}: {kind} '{key}' must be a whole number >= {minimum}, got {value!r}")
        if "bias" in layer and not isinstance(layer["bias"], bool):
            raise ConfigError(f"{_where(spec, i)}: {kind} 'bias' must be true or false, got {layer['bias']!r}")
        if kind == "activation" and layer.get("fn") not in ACTIVATIONS:
            raise ConfigError(f"{_where(spec, i)}: unknown activation {layer.get('fn')!r}")
        if kind == "pool" and layer.get("kind", "max") not in ("max", "avg"):
            raise ConfigError(f"{_where(spec, i)}: pool kind must be max or avg")
    if layers[-1]["type"] != "dense":
        raise ConfigError(f"{_where(spec)}: the last layer must be a dense layer (the logits)")
    return spec


def load_spec(path: str | Path) -> dict:
    """A spec from a TOML file (top-level keys as in a Python spec, ``[[layers]]`` tables).

    Args:
        path: the ``.toml`` file; its stem is the spec's ``name`` unless the file sets one.

    Returns:
        The validated spec (see :func:`validate_spec`).

    Raises:
        ConfigError: the file is missing, unreadable or not TOML, or the spec is invalid.

    Example::

        # tiny.toml:
        #   activation = "tanh"
        #   [[layers]]
        #   type = "flatten"
        #   [[layers]]
        #   type = "dense"
        #   out = 64
        #   [[layers]]
        #   type = "dense"
        #   out = "classes"
        net = build(load_spec("tiny.toml"), bn="after", input_shape=(1, 28, 28), num_classes=10)
    """
    path = Path(path)
    spec = read_toml(path, "spec file", "use a zoo name (bnlab models list) or a spec .toml")
    spec.setdefault("name", path.stem)
    return validate_spec(spec)


def _init_weights(module: nn.Module, init: dict | None, generator=None) -> None:
    if not init:
        return
    kind = init.get("kind", "normal")
    if kind != "normal":
        raise ConfigError(f"unknown init kind {kind!r}: only 'normal' (with 'std') is supported")
    std = float(init.get("std", 0.01))
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if m.weight.is_meta:  # shapes only (a sweep's check): no values to draw; on meta torch's
                continue          # normal_ goes through code that imports torch._dynamo (~3 s)
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def check_build_options(*, bn: str | None = None, norm: str | None = None, bn_impl: str | None = None,
                        activation: str | None = None) -> None:
    """A :class:`ConfigError` for an unknown ``bn`` placement, ``norm``, ``bn_impl`` or
    ``activation`` (those given): the checks every network builder shares."""
    for what, value, options in (("bn placement", bn, BN_PLACEMENTS), ("norm", norm, NORMS),
                                 ("bn_impl", bn_impl, BN_IMPLS), ("activation", activation, ACTIVATIONS)):
        if value is not None and value not in options:
            raise ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(options)}")


def build_from_spec(spec: dict, *, input_shape, num_classes: int, bn: str = "none", norm: str = "batch",
                    bn_impl: str = "bnlab", activation: str | None = None, dropout: float | None = None,
                    virtual_batch_size: int = 32, norm_groups: int = 32) -> nn.Sequential:
    """Build the ``nn.Sequential`` a spec describes for inputs of ``input_shape`` (without batch).

    The arguments are those of :func:`bnlab.models.build`, which is the entry point to use.
    """
    if norm == "none":  # BN's places without a normalizer: BN built, then removed (a bias where it had one)
        from bnlab.nn.norms import strip_batchnorm

        model = build_from_spec(spec, input_shape=input_shape, num_classes=num_classes, bn=bn, bn_impl=bn_impl,
                                activation=activation, dropout=dropout, virtual_batch_size=virtual_batch_size)
        strip_batchnorm(model)
        return model
    spec = validate_spec(spec)
    act_name = activation or spec["activation"]
    check_build_options(bn=bn, norm=norm, bn_impl=bn_impl, activation=act_name)
    layers = spec["layers"]
    if bn == "tutorial":
        if not spec.get("tutorial_bn"):
            raise ConfigError(f"{spec['name']} has no tutorial BN placement; use --bn before or after")
        layers = validate_spec({"name": spec["name"], "layers": spec["tutorial_bn"]})["layers"]
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")

    shape = tuple(int(s) for s in input_shape)
    mods: list[nn.Module] = []
    last = len(layers) - 1
    explicit_acts = any(layer["type"] == "activation" for layer in layers)

    def add_bn(channels: int, dims: int) -> None:
        try:
            mods.append(norm_layer(norm, channels, dims=2 if dims == 3 else 1, impl=bn_impl, groups=norm_groups,
                                   virtual_batch_size=virtual_batch_size))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    for i, layer in enumerate(layers):
        kind = layer["type"]
        where = _where(spec, i)
        if kind == "conv":
            if len(shape) != 3:
                raise ConfigError(f"{where}: conv needs image input (C, H, W), got shape {shape}")
            out = num_classes if layer["out"] == "classes" else layer["out"]
            k, stride, pad = layer["kernel"], layer.get("stride", 1), layer.get("padding", 0)
            h = (shape[1] + 2 * pad - k) // stride + 1
            w = (shape[2] + 2 * pad - k) // stride + 1
            if h < 1 or w < 1:
                raise ConfigError(f"{where}: a {k}x{k} conv does not fit inputs of {shape[1]}x{shape[2]} "
                                  f"(input shape {tuple(input_shape)} is too small for {spec['name']})")
            mods.append(nn.Conv2d(shape[0], out, k, stride=stride, padding=pad, bias=layer.get("bias", True)))
            shape = (out, h, w)
        elif kind == "dense":
            if len(shape) != 1:
                raise ConfigError(f"{where}: dense needs flat input; add a flatten layer before it (shape is {shape})")
            out = num_classes if layer["out"] == "classes" else layer["out"]
            mods.append(nn.Linear(shape[0], out, bias=layer.get("bias", True)))
            shape = (out,)
        elif kind == "pool":
            if len(shape) != 3:
                raise ConfigError(f"{where}: pooling needs image input, got shape {shape}")
            size = layer.get("size", 2)
            stride = layer.get("stride", size)
            h, w = (shape[1] - size) // stride + 1, (shape[2] - size) // stride + 1
            if h < 1 or w < 1:
                raise ConfigError(f"{where}: {size}x{size} pooling does not fit {shape[1]}x{shape[2]} "
                                  f"(input shape {tuple(input_shape)} is too small for {spec['name']})")
            mods.append((nn.MaxPool2d if layer.get("kind", "max") == "max" else nn.AvgPool2d)(size, stride))
            shape = (shape[0], h, w)
        elif kind == "flatten":
            mods.append(nn.Flatten())
            shape = (math.prod(shape),)
        elif kind == "dropout":
            mods.append(nn.Dropout(dropout if dropout is not None else float(layer.get("p", 0.5))))
        elif kind == "activation":
            if bn == "before":
                add_bn(shape[0], len(shape))
            mods.append(ACTIVATIONS[activation or layer["fn"]]())
            if bn == "after":
                add_bn(shape[0], len(shape))
        elif kind == "bn":
            if bn == "tutorial":
                add_bn(shape[0], len(shape))
            continue
        if kind in ("conv", "dense") and i != last and not explicit_acts:
            if bn == "before":
                add_bn(shape[0], len(shape))
            mods.append(ACTIVATIONS[act_name]())
            if bn == "after":
                add_bn(shape[0], len(shape))
    if shape != (num_classes,):
        raise ConfigError(f"{spec['name']}: the network ends with shape {shape}, expected ({num_classes},) logits")
    model = nn.Sequential(*mods)
    _init_weights(model, spec.get("init"))
    return model


def output_shapes(model: nn.Module, input_shape) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """``(name, layer, output shape without batch)`` of every layer in the order they run, found by
    running a batch of two zero inputs in eval mode: a Sequential's children, or any network's
    leaf modules (each call of a layer used twice appears twice).

    Args:
        model: any network; its mode is restored afterwards.
        input_shape: one example's shape without the batch, e.g. ``(1, 28, 28)``.

    Returns:
        A list of ``(name, module, shape)`` tuples; ``shape`` is ``()`` for a layer whose output
        is not a tensor.

    Example::

        for name, layer, shape in output_shapes(net, (1, 28, 28)):
            print(name, type(layer).__name__, shape)
    """
    layers = dict(model.named_children()) if isinstance(model, nn.Sequential) else \
        {n: m for n, m in model.named_modules() if n and not any(True for _ in m.children())}
    seen: list = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.append((n, m, o))) for n, m in layers.items()]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = next(iter(model.parameters()), None)
            model(torch.zeros((2, *input_shape), device=ref.device if ref is not None else None))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return [(n, m, tuple(o.shape[1:]) if isinstance(o, torch.Tensor) else ()) for n, m, o in seen]


def _brief(m: nn.Module) -> str:
    if isinstance(m, nn.Conv2d):
        pad = f", pad {m.padding[0]}" if m.padding[0] else ""
        return f"{m.in_channels}->{m.out_channels}, {m.kernel_size[0]}x{m.kernel_size[1]}{pad}"
    if isinstance(m, nn.Linear):
        return f"{m.in_features}->{m.out_features}"
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        return f"{m.kernel_size}"
    if isinstance(m, nn.Dropout):
        return f"p={m.p}"
    if hasattr(m, "num_features"):
        return f"{m.num_features}"
    return ""


def summary(model: nn.Module, input_shape) -> dict:
    """Keras-style summary: one row per layer as it runs (name, type, output shape, parameters)
    and totals. Works on any network (its leaf modules), a Sequential by its children.

    Args:
        model: any network (run once on zeros, see :func:`output_shapes`).
        input_shape: one example's shape without the batch.

    Returns:
        ``{"input_shape", "layers", "total_params", "trainable_params", "non_trainable_params",
        "buffers"}``; each of ``layers`` is ``{"name", "layer", "output_shape", "params",
        "detail"}``; ``buffers`` counts the values of every buffer (BN running statistics).
        :func:`format_summary` prints it.

    Example::

        print(format_summary(summary(build("resnet20", bn="tutorial", input_shape=(3, 32, 32), num_classes=10),
                                     (3, 32, 32))))
    """
    rows = []
    for name, m, shape in output_shapes(model, input_shape):
        params = sum(p.numel() for p in m.parameters())
        rows.append({"name": name, "layer": type(m).__name__, "output_shape": list(shape), "params": params,
                     "detail": _brief(m)})
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() for b in model.buffers())
    return {"input_shape": list(input_shape), "layers": rows, "total_params": total, "trainable_params": trainable,
            "non_trainable_params": total - trainable, "buffers": buffers}


def format_summary(s: dict, title: str = "") -> str:
    """A :func:`summary` as a Keras-style text table, one line per layer, totals at the bottom.

    Args:
        s: the dict :func:`summary` returns.
        title: a first line, e.g. the model's name (none when empty).

    Returns:
        The table as one string (no trailing newline): layer name, type with its size (e.g.
        ``Linear(64->256)``), output shape without the batch, parameter count; then total,
        trainable and non-trainable parameters and the number of buffer values (BN running
        statistics and their batch counters).

    Example::

        net = build("keras-mlp", bn="after", input_shape=(1, 8, 8), num_classes=10)
        print(format_summary(summary(net, (1, 8, 8)), title="keras-mlp"))
    """
    lines = [title] if title else []
    width = max([3] + [len(r["name"]) for r in s["layers"]])
    head = f"{'#':>{width}}  {'layer':<34} {'output shape':<16} {'params':>10}"
    lines += [head, "-" * len(head)]
    lines.append(f"{'':>{width}}  {'input':<34} {str(tuple(s['input_shape'])):<16} {'':>10}")
    for r in s["layers"]:
        label = f"{r['layer']}({r['detail']})" if r["detail"] else r["layer"]
        lines.append(f"{r['name']:>{width}}  {label:<34} {str(tuple(r['output_shape'])):<16} {r['params']:>10,}")
    lines.append("-" * len(head))
    lines.append(f"total params {s['total_params']:,} (trainable {s['trainable_params']:,}, "
                 f"non-trainable {s['non_trainable_params']:,}); BN running-stat buffers {s['buffers']:,}")
    return "\n".join(lines)
