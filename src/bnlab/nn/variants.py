"""Batch-norm variants for small or unusual batches. Both share bnlab's BN state and eval path.

Batch Renormalization (Ioffe, 2017). Training normalizes with batch statistics but corrects
towards the running ones, so training and inference see the same transform::

    sigma_B = sqrt(sigma2_B + eps)          sigma = sqrt(running_var + eps)
    r = clip(sigma_B / sigma, 1/rmax, rmax)           (no gradient through r)
    d = clip((mu_B - running_mean) / sigma, -dmax, dmax)  (no gradient through d)
    y = gamma * (xhat * r + d) + beta

which is BN with weight ``gamma * r`` and bias ``gamma * d + beta``; so the analytic BN backward
serves unchanged. rmax = 1, dmax = 0 is plain BN. The paper starts at rmax = 1, dmax = 0 and
relaxes them to 3 and 5; ``warmup_steps=(start, end)`` ramps linearly between those steps.

Ghost Batch Normalization (Hoffer et al., 2017): statistics over "virtual" batches of
``virtual_batch_size`` examples inside each batch (the last one may be smaller), which keeps the
regularizing noise of small batches while training with large ones. The running statistics move
towards the mean of the virtual batches' statistics, once per step. Inference is plain BN.
"""

from __future__ import annotations

import torch

from bnlab.errors import ConfigError
from bnlab.nn import functional as F
from bnlab.nn._backend import unbiased, update_running
from bnlab.nn.batchnorm import _BatchNorm, _Dims1d, _Dims2d


class _BatchRenorm(_BatchNorm):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 rmax: float = 3.0, dmax: float = 5.0, warmup_steps: tuple[int, int] = (0, 0), device=None,
                 dtype=None):
        if rmax < 1 or dmax < 0:
            raise ConfigError(f"batch renorm needs rmax >= 1 and dmax >= 0, got rmax={rmax}, dmax={dmax}")
        start, end = warmup_steps
        if not 0 <= start <= end:
            raise ConfigError(f"warmup_steps must be (start, end) with 0 <= start <= end, got {warmup_steps}")
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.rmax, self.dmax, self.warmup_steps = float(rmax), float(dmax), (int(start), int(end))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}"

    def current_limits(self) -> tuple[float, float]:
        """(rmax, dmax) at the current step of the warm-up schedule."""
        start, end = self.warmup_steps
        step = int(self.num_batches_tracked)
        if end == 0 or step >= end:
            t = 1.0
        elif step < start:
            t = 0.0
        else:
            t = (step - start) / max(end - start, 1)
        return 1.0 + t * (self.rmax - 1.0), t * self.dmax

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training:
            return super().forward(input)
        F.verify_batch_size(input.size())
        rmax, dmax = self.current_limits()
        momentum = self._step_momentum()
        dims = [0] + list(range(2, input.dim()))
        with torch.no_grad():
            var_b, mean_b = torch.var_mean(input, dim=dims, correction=0)
            sigma = torch.sqrt(self.running_var + self.eps)
            r = (torch.sqrt(var_b + self.eps) / sigma).clamp(1.0 / rmax, rmax)
            d = ((mean_b - self.running_mean) / sigma).clamp(-dmax, dmax)
        weight = r if self.weight is None else self.weight * r
        bias = d if self.weight is None else self.weight * d + self.bias
        y = F.batch_norm(input, None, None, weight, bias, True, 0.0, self.eps)
        with torch.no_grad():
            update_running(self.running_mean, self.running_var, mean_b, unbiased(var_b, input), momentum)
        return y


class BatchRenorm1d(_Dims1d, _BatchRenorm):
    """Batch Renormalization over ``(N, C)`` or ``(N, C, L)`` inputs (see the module docstring).

    Eval mode is plain BN with the running statistics, which always exist here.

    Args:
        num_features: ``C``, the number of features or channels.
        eps, momentum, affine, device, dtype: as for :class:`bnlab.nn.BatchNorm1d`.
        rmax: the largest correction of the scale, ``r`` in ``[1/rmax, rmax]``; at least 1.
        dmax: the largest correction of the shift, ``d`` in ``[-dmax, dmax]``, in running
            standard deviations; at least 0.
        warmup_steps: ``(start, end)`` training steps: ``rmax, dmax`` are ``1, 0`` (plain BN)
            until ``start`` and grow linearly to their full values at ``end``. ``(0, 0)``, the
            default: full values from the first step.

    Raises:
        ConfigError: ``rmax < 1``, ``dmax < 0`` or a bad ``warmup_steps``.

    Example::

        bn = BatchRenorm1d(100, rmax=3.0, dmax=5.0, warmup_steps=(5000, 40000))
        bn.current_limits()   # (1.0, 0.0) before step 5000
    """


class BatchRenorm2d(_Dims2d, _BatchRenorm):
    """Batch Renormalization over ``(N, C, H, W)`` inputs: one statistic per channel.

    Args:
        num_features: ``C``, the number of channels.
        eps, momentum, affine, rmax, dmax, warmup_steps, device, dtype: as for :class:`BatchRenorm1d`.
    """


class _GhostBatchNorm(_BatchNorm):
    def __init__(self, num_features: int, virtual_batch_size: int = 32, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, device=None, dtype=None):
        if virtual_batch_size < 2:
            raise ConfigError(f"ghost batch norm needs virtual_batch_size >= 2, got {virtual_batch_size}")
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.virtual_batch_size = int(virtual_batch_size)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training:
            return super().forward(input)
        chunks = input.split(self.virtual_batch_size)
        if len(chunks) > 1 and chunks[-1].numel() // chunks[-1].shape[1] == 1:
            # a last virtual batch of one example has no variance: merge it into the previous one
            chunks = chunks[:-2] + (torch.cat(chunks[-2:]),)
        momentum = self._step_momentum()
        outs, means, vars_ = [], [], []
        for chunk in chunks:
            y, mean, var = F.batch_norm_stats(chunk, None, None, self.weight, self.bias, 0.0, self.eps)
            outs.append(y)
            means.append(mean)
            vars_.append(unbiased(var, chunk))
        with torch.no_grad():
            update_running(self.running_mean, self.running_var, torch.stack(means).mean(0), torch.stack(vars_).mean(0),
                           momentum)
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class GhostBatchNorm1d(_Dims1d, _GhostBatchNorm):
    """Ghost Batch Normalization over ``(N, C)`` or ``(N, C, L)`` inputs (see the module docstring).

    In training, each run of ``virtual_batch_size`` consecutive examples of a batch is normalized
    with its own statistics; eval mode is plain BN with the running statistics.

    Args:
        num_features: ``C``, the number of features or channels.
        virtual_batch_size: examples per virtual batch, at least 2 (the second positional
            argument, unlike torch's layers: pass the others by name).
        eps, momentum, affine, device, dtype: as for :class:`bnlab.nn.BatchNorm1d`.

    Raises:
        ConfigError: ``virtual_batch_size < 2``.

    Example::

        bn = GhostBatchNorm1d(120, virtual_batch_size=32)
        y = bn(torch.randn(1000, 120))   # statistics of 31 virtual batches of 32 and one of 8
    """


class GhostBatchNorm2d(_Dims2d, _GhostBatchNorm):
    """Ghost Batch Normalization over ``(N, C, H, W)`` inputs: statistics per channel and virtual batch.

    Args:
        num_features: ``C``, the number of channels.
        virtual_batch_size, eps, momentum, affine, device, dtype: as for :class:`GhostBatchNorm1d`.
    """
