"""Synchronized batch normalization over ``torch.distributed`` on any device, CPU and gloo included.

Data-parallel training gives each process (rank) a slice of the batch. Plain BN then normalizes
every slice with its own statistics: with 2 ranks of 32 examples it is Ghost BN with virtual
batches of 32, not BN over 64. :class:`SyncBatchNorm` normalizes with the statistics of the whole
distributed batch, so W ranks x B examples train exactly as one process with W*B (PyTorch's
``nn.SyncBatchNorm`` does the same on CUDA only; it refuses CPU tensors).

Forward, per channel: each rank computes its count, mean and sum of squared deviations ``M2``
(``torch.var_mean``, stable), all ranks all-gather them, and every rank merges them with Chan et
al.'s pairwise formula, ``M2 = M2_a + M2_b + delta^2 * n_a n_b / (n_a + n_b)``: no sum of squares
of raw values, so a channel with a large mean keeps its small variance (the naive
``E[x^2] - E[x]^2`` in float32 loses it entirely at mean 1e4). Ranks may hold different numbers
of examples; a rank with none contributes nothing.

Backward: with ``xhat = (x - mean) / sqrt(var + eps)`` and the global count ``n``,
``dx = gamma / sqrt(var + eps) * (dy - sum(dy) / n - xhat * sum(dy * xhat) / n)`` where both sums
run over the whole distributed batch: one all-reduce of the two per-channel sums. The weight and
bias gradients are each rank's own sums; ``DistributedDataParallel`` averages them over ranks
like every other parameter gradient, which is what makes the result equal the single process
(whose loss is the mean over all W*B examples).

Eval mode, ``track_running_stats=False`` without training, a process group of one, or no
process group at all: plain BN (bnlab's), so the same model runs in one process unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bnlab.nn._backend import update_running
from bnlab.nn.batchnorm import _BatchNorm


def merge_moments(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor):
    """Chan et al.'s merge of per-part statistics: ``(count, mean, M2)`` of the union.

    Args:
        counts: ``(P,)`` examples per part (zeros allowed).
        means: ``(P, C)`` each part's per-channel mean.
        m2s: ``(P, C)`` each part's per-channel sum of squared deviations from its mean.

    Returns:
        ``(n, mean, M2)``: the total count (a float tensor), and ``(C,)`` mean and M2.

    Example::

        n, mean, m2 = merge_moments(torch.tensor([3., 5.]), means, m2s)   # var = m2 / n
    """
    n = counts.new_zeros(())
    mean = means.new_zeros(means.shape[1])
    m2 = m2s.new_zeros(m2s.shape[1])
    for c, mu, s in zip(counts, means, m2s):
        if c <= 0:
            continue
        total = n + c
        delta = mu - mean
        mean = mean + delta * (c / total)
        m2 = m2 + s + delta * delta * (n * c / total)
        n = total
    return n, mean, m2


def _group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class _SyncBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        dims = [0] + list(range(2, x.dim()))
        count = x.numel() // x.shape[1]
        xd = x.detach()
        if count:
            var, mean = torch.var_mean(xd, dim=dims, correction=0)
        else:
            var = mean = xd.new_zeros(x.shape[1])
        local = torch.cat([xd.new_tensor([float(count)]), mean, var * count]).to(torch.float64)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        table = torch.stack(parts)
        n, gmean, m2 = merge_moments(table[:, 0], table[:, 1:1 + x.shape[1]], table[:, 1 + x.shape[1]:])
        if n < 2:
            raise ValueError(f"SyncBatchNorm: {int(n)} value(s) per channel over all ranks; batch norm needs at least 2")
        gvar = (m2 / n)
        if running_mean is not None:
            update_running(running_mean, running_var, gmean, m2 / (n - 1), momentum)
        gmean, gvar = gmean.to(x.dtype), gvar.to(x.dtype)
        shape = [1, -1] + [1] * (x.dim() - 2)
        invstd = torch.rsqrt(gvar + eps)
        xhat = (xd - gmean.view(shape)) * invstd.view(shape)
        y = xhat
        if weight is not None:
            y = xhat * weight.detach().view(shape) + (bias.detach().view(shape) if bias is not None else 0)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.group, ctx.n, ctx.has_bias = group, float(n), bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        xhat, invstd, weight = ctx.saved_tensors
        dims = [0] + list(range(2, dy.dim()))
        shape = [1, -1] + [1] * (dy.dim() - 2)
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)
        both = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(both, group=ctx.group)
        g_sum_dy, g_sum_dy_xhat = both.split(sum_dy.shape[0])
        scale = invstd if weight is None else invstd * weight.detach()
        dx = scale.view(shape) * (dy - g_sum_dy.view(shape) / ctx.n - xhat * (g_sum_dy_xhat / ctx.n).view(shape))
        dweight = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        dbias = sum_dy if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics span every rank of a ``torch.distributed`` process
    group (see the module docstring); any input of shape ``(N, C, ...)``, any device and backend.

    Args:
        num_features: ``C``.
        eps, momentum, affine, track_running_stats, device, dtype, bias: as for
            :class:`bnlab.nn.BatchNorm2d`.
        process_group: the ranks to synchronize over (``None``: the default group).

    Example::

        net = bnlab.nn.convert(net, to="sync")          # every BN of any model
        ddp = torch.nn.parallel.DistributedDataParallel(net)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training or _group_size(self.process_group) == 1:
            return super().forward(input)
        tracking = self.track_running_stats and self.running_mean is not None
        momentum = self._step_momentum() if tracking else 0.0
        return _SyncBatchNormFn.apply(input, self.weight, self.bias, self.running_mean if tracking else None,
                                      self.running_var if tracking else None, self.eps, momentum,
                                      self.process_group or dist.group.WORLD)


def to_sync(model: torch.nn.Module, process_group=None) -> torch.nn.Module:
    """Every BN layer of ``model`` (torch's or bnlab's plain BN) replaced by a
    :class:`SyncBatchNorm` with its state, in place (a bare BN layer is returned converted).
    bnlab's variants (renorm, ghost, noisy) are left: their statistics are their own design."""
    from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

    plain = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, BatchNorm1d, BatchNorm2d, BatchNorm3d)

    from bnlab.nn.norms import replace_modules

    def one(m):
        if type(m) not in plain:
            return m
        ref = m.weight if m.weight is not None else m.running_mean
        new = SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, process_group,
                            bias=not m.affine or m.bias is not None,
                            **({"device": ref.device, "dtype": ref.dtype} if ref is not None else {}))
        new.load_state_dict(m.state_dict())
        return new.train(m.training)

    return replace_modules(model, one)
