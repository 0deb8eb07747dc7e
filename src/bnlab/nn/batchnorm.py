"""Batch normalization layers (Ioffe & Szegedy, 2015), interchangeable with ``torch.nn.BatchNorm*``.

Training (Alg. 1): each channel is normalized with the mean and biased variance of the current
mini-batch, ``y = gamma * (x - mu_B) / sqrt(sigma2_B + eps) + beta``, and the running averages
move towards the batch statistics::

    running_mean = (1 - momentum) * running_mean + momentum * mu_B
    running_var  = (1 - momentum) * running_var  + momentum * sigma2_B * M / (M - 1)

``momentum=None`` makes them cumulative averages (momentum = 1 / num_batches_tracked).

Inference (Alg. 2, ``model.eval()``): the running averages replace the batch statistics, so the
layer is a fixed affine map per channel. With ``track_running_stats=False`` there are no running
averages and batch statistics are used in eval mode too.

``gamma`` (``weight``) and ``beta`` (``bias``) are learned when ``affine=True``: they let a layer
undo the normalization if that is what the loss prefers. Conv inputs ``(N, C, H, W)`` have one
statistic and one gamma/beta per channel, over N, H and W; dense inputs ``(N, C)`` one per feature.

State-dict keys are torch's (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``), so ``load_state_dict`` works both ways.
"""

from __future__ import annotations

import torch
from torch import nn

from bnlab.nn import functional as F


class _BatchNorm(nn.Module):
    """State and running-statistics logic shared by every bnlab batch-norm layer."""

    _version = 2

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            # bias=False learns gamma only (as torch >= 2.13 allows)
            self.weight = nn.Parameter(torch.empty(num_features, **kw))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **kw))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **kw))
            self.register_buffer("running_var", torch.ones(num_features, **kw))
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, **{k: v for k, v in kw.items() if k != "dtype"}))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batches tracked (as a new layer)."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics and set gamma to 1 and beta to 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ("{num_features}, eps={eps}, momentum={momentum}, affine={affine}, "
                "bias={use_bias}, track_running_stats={track_running_stats}".format(
                    **self.__dict__, use_bias=self.bias is not None))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # State dicts saved before num_batches_tracked existed (version < 2) load with 0.
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = torch.tensor(0, dtype=torch.long, device=self.running_mean.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _step_momentum(self) -> float:
        """Count this training step and return the averaging factor for the running statistics."""
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if self.training and self.track_running_stats and self.running_mean is not None:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, True,
                                self._step_momentum(), self.eps)
        if self.training or self.running_mean is None:  # batch statistics, nothing to update
            return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class _Dims1d:
    def _check_input_dim(self, input):
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class _Dims2d:
    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class _Dims3d:
    def _check_input_dim(self, input):
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


class BatchNorm1d(_Dims1d, _BatchNorm):
    """Batch norm over ``(N, C)`` or ``(N, C, L)`` inputs: one statistic per feature/channel.

    Same arguments, state dict and results as ``torch.nn.BatchNorm1d`` (see the module docstring
    for the math).

    Args:
        num_features: ``C``, the number of features or channels.
        eps: added to the variance before the square root, for numerical stability.
        momentum: weight of the current batch in the running averages; ``None``: cumulative
            averages over all batches seen.
        affine: learn a per-channel scale gamma (``weight``, init 1) and shift beta (``bias``, init 0).
        track_running_stats: keep running averages for eval mode; ``False``: eval mode uses the
            batch's own statistics too.
        device, dtype: of the parameters and buffers.
        bias: with ``affine``, learn beta too (keyword only); ``False``: gamma only.

    Example::

        bn = BatchNorm1d(120)
        y = bn(torch.randn(64, 120))      # training mode: batch statistics, running ones updated
        bn.eval()                         # now the fixed affine map of Alg. 2
    """


class BatchNorm2d(_Dims2d, _BatchNorm):
    """Batch norm over ``(N, C, H, W)`` inputs: one statistic per channel, over N, H, W.

    Args:
        num_features: ``C``, the number of channels.
        eps, momentum, affine, track_running_stats, device, dtype, bias: as for
            :class:`BatchNorm1d` (and ``torch.nn.BatchNorm2d``).

    Example::

        bn = BatchNorm2d(16)
        y = bn(torch.randn(8, 16, 28, 28))
        bn.load_state_dict(torch.nn.BatchNorm2d(16).state_dict())   # state dicts interchangeable
    """


class BatchNorm3d(_Dims3d, _BatchNorm):
    """Batch norm over ``(N, C, D, H, W)`` inputs: one statistic per channel, over N, D, H, W.

    Args:
        num_features: ``C``, the number of channels.
        eps, momentum, affine, track_running_stats, device, dtype, bias: as for
            :class:`BatchNorm1d` (and ``torch.nn.BatchNorm3d``).
    """


TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
BNLAB_BN = (BatchNorm1d, BatchNorm2d, BatchNorm3d)


def is_batchnorm(module: nn.Module) -> bool:
    """True for any bnlab or torch batch-norm layer (variants included).

    Args:
        module: any ``nn.Module``.

    Example::

        [name for name, m in net.named_modules() if is_batchnorm(m)]   # the BN layers of net
    """
    return isinstance(module, (_BatchNorm, nn.modules.batchnorm._BatchNorm))


def convert(model: nn.Module, to: str = "bnlab", **options) -> nn.Module:
    """Swap the batch-norm layers of any model in place: between torch's and bnlab's (keeping
    config, state and mode), or for another normalizer.

    Only the exact classes are swapped between libraries: subclasses and bnlab's variants (which
    have no torch counterpart) stay as they are.

    Args:
        model: any module; its children are replaced recursively.
        to: ``bnlab`` replaces ``torch.nn.BatchNorm1d/2d/3d`` by bnlab's; ``torch`` the reverse;
            a normalizer name (``renorm``, ``ghost``, ``group``, ``layer``, ``instance``,
            ``none``; see :mod:`bnlab.nn.norms`) replaces every BN layer by a fresh one of that
            kind (:func:`bnlab.nn.norms.swap_norm`); ``sync`` makes every plain BN a
            :class:`bnlab.nn.SyncBatchNorm` keeping its state (for data-parallel training).
        **options: for a normalizer: ``impl``, ``groups``, ``virtual_batch_size``; for ``sync``:
            ``process_group``.

    Returns:
        ``model``, changed in place; a bare BN module is returned converted, since it cannot be
        replaced in place.

    Raises:
        ConfigError: an unknown ``to``, or a layer the normalizer does not fit.

    Example::

        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU())
        convert(net)              # net[1] is now a bnlab.nn.BatchNorm1d with the same state
        convert(net, to="torch")  # and back
        convert(net, to="group", groups=4)   # GroupNorm(4, 8)
    """
    from bnlab.nn.norms import NORMS, swap_norm

    if to in NORMS:
        return swap_norm(model, to, **options)
    if to == "sync":
        from bnlab.nn.sync import to_sync

        return to_sync(model, **options)
    if options:
        from bnlab.errors import ConfigError

        raise ConfigError(f"convert(to={to!r}) takes no options ({', '.join(options)}): they are for a normalizer")
    if to not in ("bnlab", "torch"):
        from bnlab.errors import ConfigError

        raise ConfigError(f"convert(to={to!r}): use 'bnlab', 'torch', 'sync' or a normalizer: {', '.join(NORMS)}")
    src, dst = (TORCH_BN, BNLAB_BN) if to == "bnlab" else (BNLAB_BN, TORCH_BN)

    def swap(m: nn.Module) -> nn.Module:
        for cls_from, cls_to in zip(src, dst):
            if type(m) is cls_from:
                ref = m.running_mean if m.running_mean is not None else (m.weight if m.affine else None)
                kw = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
                if m.affine and m.bias is None:
                    kw["bias"] = False  # torch < 2.13 has no bias flag and refuses this, as it should
                new = cls_to(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                             track_running_stats=m.track_running_stats, **kw)
                new.load_state_dict(m.state_dict())
                new.train(m.training)
                return new
        return m

    from bnlab.nn.norms import replace_modules

    return replace_modules(model, swap)
