"""Batch normalization as a function, with an analytic backward pass.

Algorithm 1 (training) of Ioffe & Szegedy (2015), for each channel over the mini-batch B of
M = N * H * W values (N for dense layers)::

    mu_B      = 1/M * sum_i x_i                           batch mean
    sigma2_B  = 1/M * sum_i (x_i - mu_B)^2                batch variance (biased)
    xhat_i    = (x_i - mu_B) / sqrt(sigma2_B + eps)       normalize
    y_i       = gamma * xhat_i + beta                     scale and shift

and the moving averages used at inference, ``r = (1 - momentum) * r + momentum * stat`` with the
*unbiased* variance ``sigma2_B * M / (M - 1)`` (exactly as ``torch.nn.BatchNorm*``).

Algorithm 2 (inference) replaces mu_B, sigma2_B by the running averages: an affine map per channel.

Backward (training). With invstd = 1/sqrt(sigma2_B + eps) and xhat as above, the chain rule
through mu_B and sigma2_B gives::

    dbeta  = sum_i dy_i
    dgamma = sum_i dy_i * xhat_i
    dx_i   = gamma * invstd / M * (M * dy_i - sum_j dy_j - xhat_i * sum_j dy_j * xhat_j)

(d/dx_i of mu_B is 1/M; of sigma2_B is 2 (x_i - mu_B)/M; the two terms after M*dy_i are those
paths.) The kernels compute dx as a*dy + b*(x - mu_B) + k per channel in one pass
(csrc/batchnorm.cpp). With the compiled backend the two Functions below run as their C++ twins
(same math, no per-call Python); the eager backend runs them as written here.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from bnlab.nn._backend import get_backend


class BatchNormTrain(torch.autograd.Function):
    """Alg. 1 with batch statistics: returns ``(y, batch mean, biased batch variance)``; the
    statistics are outputs without gradient. Running averages passed in are updated in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, backend):
        y, mean, var, invstd = backend.forward_train(x, weight, bias, running_mean, running_var, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.backend = backend
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dgamma, dbeta = ctx.backend.backward_train(dy, x, weight, mean, invstd, need_x)
        return dx, dgamma if need_w else None, dbeta if need_b else None, None, None, None, None, None


class BatchNormEval(torch.autograd.Function):
    """Alg. 2: the per-channel affine map given by the running statistics."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps, backend):
        ctx.save_for_backward(x, weight, running_mean, running_var)
        ctx.eps, ctx.backend = eps, backend
        return backend.forward_eval(x, running_mean, running_var, weight, bias, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, running_mean, running_var = ctx.saved_tensors
        need_x, _, _, need_w, need_b = ctx.needs_input_grad[:5]
        dx, dgamma, dbeta = ctx.backend.backward_eval(dy, x, weight, running_mean, running_var, ctx.eps, need_x)
        return dx, None, None, dgamma if need_w else None, dbeta if need_b else None, None, None


def verify_batch_size(size: torch.Size) -> None:
    """Batch statistics need more than one value per channel (as torch checks).

    Args:
        size: the input's size ``(N, C, ...)``.

    Raises:
        ValueError: ``N`` times the spatial sizes is 1 (e.g. a batch of one dense example).
    """
    values = size[0]
    for d in size[2:]:
        values *= d
    if values == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def batch_norm_stats(input, running_mean, running_var, weight=None, bias=None, momentum=0.1, eps=1e-5):
    """Training-mode batch norm returning ``(y, batch_mean, batch_var)`` (biased variance).

    Args:
        input: ``(N, C, ...)``.
        running_mean, running_var: ``(C,)`` tensors updated in place (the variance unbiased), or
            ``None`` for none.
        weight, bias: gamma and beta, ``(C,)`` or ``None`` (1 and 0).
        momentum: weight of this batch in the running averages.
        eps: added to the variance before the square root.

    Returns:
        ``y`` shaped like ``input`` (differentiable), and the batch mean and biased batch
        variance per channel, ``(C,)`` each (without gradient).
    """
    verify_batch_size(input.size())
    return get_backend(input).train(input, weight, bias, running_mean, running_var, momentum, eps)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Drop-in for ``torch.nn.functional.batch_norm`` (same arguments, same results).

    Args:
        input: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``.
        running_mean, running_var: ``(C,)`` running statistics; required when ``training=False``.
        weight, bias: gamma and beta, ``(C,)`` or ``None`` (1 and 0).
        training: ``True``: normalize with the batch's statistics (Alg. 1) and, when running
            tensors are given, update them in place; ``False``: use the running ones (Alg. 2).
        momentum: weight of this batch in the running averages.
        eps: added to the variance before the square root.

    Returns:
        The normalized tensor, shaped like ``input``.

    Raises:
        ValueError: ``training=False`` without running statistics, or ``training=True`` with one
            value per channel.

    Example::

        x = torch.randn(8, 3)
        rm, rv = torch.zeros(3), torch.ones(3)
        y = batch_norm(x, rm, rv, training=True)   # == torch.nn.functional.batch_norm(...); rm, rv updated
    """
    if training:
        return batch_norm_stats(input, running_mean, running_var, weight, bias, momentum, eps)[0]
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required when training=False")
    return get_backend(input).eval(input, running_mean, running_var, weight, bias, eps)
