"""The normalizers bnlab compares, one name each, and the swap that puts one into any network.

============  ================================================================  ====================
``norm``      layer (PyTorch's own where PyTorch has it)                         statistics over
============  ================================================================  ====================
``batch``     :class:`bnlab.nn.BatchNorm2d` (or torch's, ``impl="torch"``)       the batch, per channel
``renorm``    :class:`bnlab.nn.BatchRenorm2d` (Ioffe 2017)                       the batch, corrected
``ghost``     :class:`bnlab.nn.GhostBatchNorm2d` (Hoffer et al. 2017)            virtual batches
``ghost-renorm`` :class:`bnlab.nn.BatchRenorm2d` with ``virtual_batch_size``     virtual batches, corrected
``noisy``     :class:`bnlab.nn.NoisyBatchNorm2d` (Santurkar et al. 2018)         the batch, then noise
``group``     ``torch.nn.GroupNorm(G, C)`` (Wu & He 2018), ``G = groups``         each example, G groups
``layer``     ``torch.nn.GroupNorm(1, C)``: LayerNorm over (C, H, W)             each example
``instance``  ``torch.nn.InstanceNorm2d(C, affine=True)``                        each example, channel
``none``      ``torch.nn.Identity`` (the layer before gets a bias if it lacks one)  nothing
============  ================================================================  ====================

``layer`` is Wu & He's definition (their Fig. 2): one group, every channel and position of one
example, with a per-channel scale and shift; ``torch.nn.GroupNorm(1, C)`` computes exactly
``torch.nn.LayerNorm((C, H, W))`` without fixing H and W when the network is built. ``group``,
``layer`` and ``instance`` have no running statistics: they behave the same in training and eval
mode and do not depend on the batch, so they cannot be folded into a neighbouring layer.

Weight Standardization (Qiao et al. 2019), usually paired with ``group``, is a property of the
convolutions, not a normalizer: :class:`WSConv2d` and :func:`standardize_weights`.

Example::

    net = swap_norm(resnet, "group", groups=32)        # every BN of any model -> GroupNorm
    net = standardize_weights(net)                     # and every Conv2d -> WSConv2d
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from bnlab.errors import ConfigError

NORMS = ("batch", "renorm", "ghost", "ghost-renorm", "noisy", "group", "layer", "instance", "none")
BN_IMPLS = ("bnlab", "torch")
PER_EXAMPLE = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def is_per_example_norm(module: nn.Module) -> bool:
    """True for GroupNorm, LayerNorm and InstanceNorm layers: normalizers whose statistics come
    from each example alone (no running statistics, nothing the batch changes)."""
    return isinstance(module, PER_EXAMPLE)


def group_count(channels: int, groups: int) -> tuple[int, str | None]:
    """The number of groups GroupNorm uses for ``channels``: ``groups``, or when that does not
    divide ``channels``, the largest divisor of ``channels`` below it; with a note saying so.

    Example::

        group_count(64, 32)   # (32, None)
        group_count(16, 32)   # (16, 'GroupNorm over 16 channels: 16 groups instead of 32 ...')
    """
    if groups < 1:
        raise ConfigError(f"norm_groups must be at least 1, got {groups}")
    g = min(groups, channels)
    while channels % g:
        g -= 1
    if g == groups:
        return g, None
    why = "fewer channels than groups" if channels < groups else f"{groups} does not divide {channels}"
    return g, f"GroupNorm over {channels} channels: {g} groups instead of {groups} ({why})"


def norm_layer(norm: str, channels: int, *, dims: int = 2, impl: str = "bnlab", groups: int = 32,
               virtual_batch_size: int = 32, device=None, dtype=None) -> nn.Module:
    """One normalization layer of kind ``norm`` for ``channels`` channels.

    Args:
        norm: one of :data:`NORMS`.
        channels: the channels (features) it normalizes.
        dims: the batch-norm flavour it stands for: 1 (``(N, C)`` or ``(N, C, L)``), 2 (images)
            or 3.
        impl: ``bnlab`` or ``torch`` for ``norm="batch"`` (the other kinds exist in one library).
        groups: GroupNorm's groups (see :func:`group_count`; :func:`warn_group_counts` says
            where fewer were used).
        virtual_batch_size: the virtual (micro-) batch of ``ghost`` and ``ghost-renorm``.

    Raises:
        ConfigError: an unknown kind; a bnlab-only kind (``renorm``, ``ghost``, ``ghost-renorm``,
            ``noisy``) with ``impl="torch"``; ``instance``
            with ``dims=1`` (after a dense layer each channel has one value per example).

    Example::

        norm_layer("group", 64, groups=32)      # GroupNorm(32, 64)
    """
    import bnlab.nn as bnn

    kw = {"device": device, "dtype": dtype}
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if impl not in BN_IMPLS:
        raise ConfigError(f"unknown bn_impl {impl!r}; choose one of {', '.join(BN_IMPLS)}")
    if dims not in (1, 2, 3):
        raise ConfigError(f"dims must be 1, 2 or 3, got {dims}")
    if norm == "batch":
        lib = nn if impl == "torch" else bnn
        return getattr(lib, f"BatchNorm{dims}d")(channels, **kw)
    if norm in ("renorm", "ghost", "ghost-renorm", "noisy"):
        if impl == "torch":
            raise ConfigError(f"norm={norm!r} exists only in bnlab: use bn_impl='bnlab'")
        if dims == 3:
            raise ConfigError(f"norm={norm!r} has 1d and 2d layers only")
        if norm == "renorm":
            return getattr(bnn, f"BatchRenorm{dims}d")(channels, **kw)
        if norm == "ghost-renorm":
            return getattr(bnn, f"BatchRenorm{dims}d")(channels, virtual_batch_size=virtual_batch_size, **kw)
        if norm == "noisy":
            return getattr(bnn, f"NoisyBatchNorm{dims}d")(channels, **kw)
        return getattr(bnn, f"GhostBatchNorm{dims}d")(channels, virtual_batch_size=virtual_batch_size, **kw)
    if norm == "group":
        return nn.GroupNorm(group_count(channels, groups)[0], channels, **kw)
    if norm == "layer":
        return nn.GroupNorm(1, channels, **kw)
    if norm == "instance":
        if dims == 1:
            raise ConfigError("norm='instance' needs feature maps: after a dense layer each channel has a single "
                              "value per example, which instance norm would turn into 0; use group or layer")
        return getattr(nn, f"InstanceNorm{dims}d")(channels, affine=True, **kw)
    return nn.Identity()


def warn_group_counts(model: nn.Module, groups: int) -> str | None:
    """One ``UserWarning`` naming the GroupNorm layers of ``model`` that use fewer groups than
    ``groups`` (their channels are fewer, or not divisible), grouped by channel count; returns it."""
    fewer: dict[tuple[int, int], int] = {}
    for m in model.modules():
        if isinstance(m, nn.GroupNorm) and m.num_groups != groups:
            fewer[(m.num_channels, m.num_groups)] = fewer.get((m.num_channels, m.num_groups), 0) + 1
    if not fewer:
        return None
    parts = [f"{n} layer(s) of {c} channels use {g}" for (c, g), n in sorted(fewer.items())]
    note = f"norm_groups={groups} does not fit every layer: {'; '.join(parts)} (the largest divisor of the channels)"
    warnings.warn(note, stacklevel=3)
    return note


def _bn_dims(m: nn.Module) -> int:
    """1, 2 or 3: the flavour of a batch-norm layer (torch's, bnlab's or a bnlab variant); 2 for
    one that says nothing (e.g. torch's SyncBatchNorm)."""
    from bnlab.nn.batchnorm import _Dims1d, _Dims2d, _Dims3d

    for d, mixin in ((1, _Dims1d), (2, _Dims2d), (3, _Dims3d)):
        if isinstance(m, (getattr(nn, f"BatchNorm{d}d"), mixin)):
            return d
    return 2


def swap_norm(model: nn.Module, norm: str, *, impl: str = "bnlab", groups: int = 32,
              virtual_batch_size: int = 32) -> nn.Module:
    """Replace every batch-norm layer of any model, in place, by a ``norm`` layer of the same
    channels (see :func:`norm_layer`); the new layers start fresh (weight 1, bias 0, no
    statistics), on the old layer's device and dtype, in its mode.

    ``norm="none"`` removes them (``nn.Identity``); a Conv/Linear right before one that has no
    bias (as convs before BN usually have not) gets a zero bias, so the network keeps a shift.
    ``norm="batch"`` makes every plain BatchNorm an ``impl`` one (bnlab's or torch's), keeping its
    state (:func:`bnlab.nn.convert`; bnlab's variants and subclasses stay as they are).

    Args:
        model: any ``nn.Module``; a bare BN layer is returned replaced.
        norm, impl, groups, virtual_batch_size: as for :func:`norm_layer`.

    Returns:
        ``model`` (or the replacement of a bare BN layer).

    Raises:
        ConfigError: as :func:`norm_layer`, naming the layer.

    Example::

        net = swap_norm(my_resnet, "group", groups=16)
    """
    from bnlab.nn.batchnorm import convert, is_batchnorm

    if norm == "batch":
        return convert(model, to=impl)

    def replacement(name: str, m: nn.Module) -> nn.Module:
        ref = next(iter(m.parameters()), None)
        if ref is None:
            ref = next(iter(m.buffers()), None)
        kw = {"device": ref.device, "dtype": ref.dtype} if ref is not None and ref.is_floating_point() else {}
        try:
            new = norm_layer(norm, m.num_features, dims=_bn_dims(m), impl=impl, groups=groups,
                             virtual_batch_size=virtual_batch_size, **kw)
        except ConfigError as e:
            raise ConfigError(f"{name or 'the model'} ({type(m).__name__}): {e}") from None
        return new.train(m.training)

    if is_batchnorm(model):
        return replacement("", model)
    if norm == "none":
        strip_batchnorm(model)
        return model
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if is_batchnorm(child):
                setattr(parent, name, replacement(f"{parent_name}.{name}" if parent_name else name, child))
    if norm == "group":
        warn_group_counts(model, groups)  # one warning naming every layer with fewer groups
    return model


def strip_batchnorm(model: nn.Module) -> int:
    """Replace every BN layer of ``model`` by ``nn.Identity`` in place; a Conv/Linear right before
    one (in its parent's order) that has no bias gets a zero bias, so the network keeps a shift
    where BN had one. Returns how many were removed.

    Example::

        strip_batchnorm(net)   # net without BN: what bn=none makes of a model as written
    """
    from bnlab.nn.batchnorm import is_batchnorm

    removed = 0
    for parent in list(model.modules()):
        prev = None
        for name, child in list(parent.named_children()):
            if is_batchnorm(child):
                if isinstance(prev, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and prev.bias is None:
                    prev.bias = nn.Parameter(prev.weight.new_zeros(prev.weight.shape[0]))
                setattr(parent, name, nn.Identity())
                removed += 1
                prev = None
                continue
            prev = child
    return removed


class WSConv2d(nn.Conv2d):
    """A ``torch.nn.Conv2d`` whose weight is standardized per output channel at every call
    (Weight Standardization, Qiao et al. 2019)::

        w_hat = (w - mean(w)) / (std(w) + eps)      over each output channel's in*kh*kw weights

    with the unbiased std and ``eps = 1e-5``, as the paper's code. Same parameters and
    ``state_dict`` as ``Conv2d``. :meth:`standardized_weight` gives ``w_hat`` (what folding and
    export use).
    """

    eps: float = 1e-5

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        flat = w.reshape(w.shape[0], -1)
        mean = flat.mean(dim=1).view(-1, 1, 1, 1)
        std = flat.std(dim=1).view(-1, 1, 1, 1)
        return (w - mean) / (std + self.eps)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.standardized_weight(), self.bias)


def standardize_weights(model: nn.Module) -> nn.Module:
    """Make every ``nn.Conv2d`` of ``model`` a :class:`WSConv2d` in place, keeping its weights
    (a bare Conv2d is returned converted). Convs that are already WS are left, and so are convs
    whose filters have a single weight (a depthwise 1x1 conv: nothing to standardize).

    Example::

        net = standardize_weights(swap_norm(net, "group"))     # GN + WS
    """
    def convert_one(m: nn.Module) -> nn.Module:
        if type(m) is not nn.Conv2d or m.weight[0].numel() < 2:
            return m  # a filter of one weight has no spread to standardize
        new = WSConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                       m.bias is not None, m.padding_mode, device=m.weight.device, dtype=m.weight.dtype)
        new.load_state_dict(m.state_dict())
        return new.train(m.training)

    return replace_modules(model, convert_one)


def replace_modules(model: nn.Module, replace) -> nn.Module:
    """Call ``replace(module)`` on every submodule of ``model`` and on ``model`` itself, and put
    what it returns in the module's place (a module it returns unchanged stays). Returns
    ``model``, or its replacement when ``replace`` replaced it (a bare layer cannot be swapped in
    place). The shared walk of :func:`standardize_weights`, :func:`bnlab.nn.convert` and
    :func:`bnlab.nn.sync.to_sync`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = replace(child)
            if new is not child:
                setattr(parent, name, new)
    return replace(model)


def unstandardize_weights(model: nn.Module) -> int:
    """Replace every :class:`WSConv2d` by a plain ``Conv2d`` holding its standardized weight
    (the same function, frozen): what folding and export do first. Returns how many."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, WSConv2d):
                new = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                                child.dilation, child.groups, child.bias is not None, child.padding_mode,
                                device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    new.weight.copy_(child.standardized_weight())
                    if child.bias is not None:
                        new.bias.copy_(child.bias)
                setattr(parent, name, new.train(child.training))
                n += 1
    return n
