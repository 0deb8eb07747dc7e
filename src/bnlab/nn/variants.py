"""Batch-norm variants for small or unusual batches, and a deliberately noisy BN. All share
bnlab's BN state and eval path (so folding, the doctor and export treat them as BN).

Batch Renormalization (Ioffe, 2017). Training normalizes with batch statistics but corrects
towards the running ones, so training and inference see the same transform::

    sigma_B = sqrt(sigma2_B + eps)          sigma = sqrt(running_var + eps)
    r = clip(sigma_B / sigma, 1/rmax, rmax)           (no gradient through r)
    d = clip((mu_B - running_mean) / sigma, -dmax, dmax)  (no gradient through d)
    y = gamma * (xhat * r + d) + beta

which is BN with weight ``gamma * r`` and bias ``gamma * d + beta``; so the analytic BN backward
serves unchanged. rmax = 1, dmax = 0 is plain BN. The paper starts at rmax = 1, dmax = 0 and
relaxes them to 3 and 5; ``warmup_steps=(start, end)`` ramps linearly between those steps.
With ``virtual_batch_size`` (``norm="ghost-renorm"``) each run of that many examples of a batch is
renormalized on its own, as the paper's micro-batches of 4 on separate workers: the corrections
r and d of each micro-batch are relative to the same running statistics, which move towards the
micro-batches' mean statistics once per step.

Ghost Batch Normalization (Hoffer et al., 2017): statistics over "virtual" batches of
``virtual_batch_size`` examples inside each batch (the last one may be smaller), which keeps the
regularizing noise of small batches while training with large ones. The running statistics move
towards the mean of the virtual batches' statistics, once per step. Inference is plain BN.

Noisy BN (Santurkar et al. 2018, Sec. 2.1): BN followed, in training only, by a random change of
every channel's distribution that is drawn anew at every step, "internal covariate shift" made
worse on purpose::

    y = s_c * BN(x) + m_c,   s_c ~ U(1 - noise_scale, 1 + noise_scale),  m_c ~ U(-noise_shift, noise_shift)

one ``(s_c, m_c)`` per channel and step, shared by the batch's examples (the batch's distribution
moves, each example keeps its place in it). The expected transform is the identity, so eval
mode is plain BN with the running statistics (gathered before the noise, as BN's are).
"""

from __future__ import annotations

import torch

from bnlab.errors import ConfigError
from bnlab.nn import functional as F
from bnlab.nn._backend import unbiased, update_running
from bnlab.nn.batchnorm import _BatchNorm, _Dims1d, _Dims2d


def _virtual_batches(input: torch.Tensor, size: int | None) -> tuple[torch.Tensor, ...]:
    """``input`` split into runs of ``size`` examples; a last run of one example (no variance)
    is merged into the one before it."""
    if size is None:
        return (input,)
    chunks = input.split(size)
    if len(chunks) > 1 and chunks[-1].numel() // chunks[-1].shape[1] == 1:
        chunks = chunks[:-2] + (torch.cat(chunks[-2:]),)
    return chunks


class _BatchRenorm(_BatchNorm):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 rmax: float = 3.0, dmax: float = 5.0, warmup_steps: tuple[int, int] = (0, 0),
                 virtual_batch_size: int | None = None, device=None, dtype=None):
        if rmax < 1 or dmax < 0:
            raise ConfigError(f"batch renorm needs rmax >= 1 and dmax >= 0, got rmax={rmax}, dmax={dmax}")
        start, end = warmup_steps
        if not 0 <= start <= end:
            raise ConfigError(f"warmup_steps must be (start, end) with 0 <= start <= end, got {warmup_steps}")
        if virtual_batch_size is not None and virtual_batch_size < 2:
            raise ConfigError(f"batch renorm over micro-batches needs virtual_batch_size >= 2, got {virtual_batch_size}")
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.rmax, self.dmax, self.warmup_steps = float(rmax), float(dmax), (int(start), int(end))
        self.virtual_batch_size = None if virtual_batch_size is None else int(virtual_batch_size)

    def extra_repr(self) -> str:
        vb = "" if self.virtual_batch_size is None else f", virtual_batch_size={self.virtual_batch_size}"
        return super().extra_repr() + f", rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}{vb}"

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
        sigma = torch.sqrt(self.running_var + self.eps)
        outs, means, vars_ = [], [], []
        for chunk in _virtual_batches(input, self.virtual_batch_size):
            with torch.no_grad():
                var_b, mean_b = torch.var_mean(chunk, dim=dims, correction=0)
                r = (torch.sqrt(var_b + self.eps) / sigma).clamp(1.0 / rmax, rmax)
                d = ((mean_b - self.running_mean) / sigma).clamp(-dmax, dmax)
            weight = r if self.weight is None else self.weight * r
            bias = d if self.weight is None else self.weight * d + self.bias
            outs.append(F.batch_norm(chunk, None, None, weight, bias, True, 0.0, self.eps))
            means.append(mean_b)
            vars_.append(unbiased(var_b, chunk))
        with torch.no_grad():
            update_running(self.running_mean, self.running_var, torch.stack(means).mean(0), torch.stack(vars_).mean(0),
                           momentum)
        return outs[0] if len(outs) == 1 else torch.cat(outs)


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
        virtual_batch_size: renormalize each run of this many examples of a batch separately
            (micro-batches, at least 2); ``None``, the default: the whole batch.

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
        eps, momentum, affine, rmax, dmax, warmup_steps, virtual_batch_size, device, dtype: as for
            :class:`BatchRenorm1d`.
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
        chunks = _virtual_batches(input, self.virtual_batch_size)
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


class _NoisyBatchNorm(_BatchNorm):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 noise_shift: float = 0.5, noise_scale: float = 0.5, device=None, dtype=None):
        if noise_shift < 0 or not 0 <= noise_scale < 1:
            raise ConfigError(f"noisy BN needs noise_shift >= 0 and 0 <= noise_scale < 1, got noise_shift={noise_shift}, "
                              f"noise_scale={noise_scale}")
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.noise_shift, self.noise_scale = float(noise_shift), float(noise_scale)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", noise_shift={self.noise_shift}, noise_scale={self.noise_scale}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        y = super().forward(input)
        if not self.training:
            return y
        shape = [1, y.shape[1]] + [1] * (y.dim() - 2)
        u = torch.rand(2, y.shape[1], device=y.device, dtype=y.dtype)  # the global RNG: seeded runs repeat
        scale = 1 + self.noise_scale * (2 * u[0] - 1)
        shift = self.noise_shift * (2 * u[1] - 1)
        return y * scale.view(shape) + shift.view(shape)


class NoisyBatchNorm1d(_Dims1d, _NoisyBatchNorm):
    """BN followed in training by a random per-channel scale and shift drawn at every step
    (Santurkar et al. 2018's "noisy BN"; see the module docstring). Eval mode is plain BN.

    Args:
        num_features: ``C``, the number of features or channels.
        eps, momentum, affine, device, dtype: as for :class:`bnlab.nn.BatchNorm1d`.
        noise_shift: shifts are drawn from ``U(-noise_shift, noise_shift)``; at least 0.
        noise_scale: scales from ``U(1 - noise_scale, 1 + noise_scale)``; in ``[0, 1)``.

    Raises:
        ConfigError: a noise parameter out of range.

    Example::

        bn = NoisyBatchNorm1d(100, noise_shift=1.0)
        bn(torch.randn(64, 100)).mean(0)    # about a different U(-1, 1) shift per feature, every call
    """


class NoisyBatchNorm2d(_Dims2d, _NoisyBatchNorm):
    """:class:`NoisyBatchNorm1d` over ``(N, C, H, W)`` inputs: one scale and shift per channel and step.

    Args:
        num_features: ``C``, the number of channels.
        eps, momentum, affine, noise_shift, noise_scale, device, dtype: as for :class:`NoisyBatchNorm1d`.
    """
