"""Where the batch-norm arithmetic runs: fused C++ kernels, or plain PyTorch ops.

Both backends compute the same four things (see ``functional.py`` for the math):
``forward_train``, ``backward_train``, ``forward_eval`` and ``backward_eval``.

- ``cpp``: ``csrc/batchnorm.cpp``, compiled on first use with ``torch.utils.cpp_extension``
  (gcc + ninja) into ``~/.cache/bnlab/torch_extensions``; float32/float64 on CPU.
- ``eager``: the same formulas in PyTorch ops; any dtype and device, ~3x slower on CPU.

``BNLAB_BN_BACKEND=auto|cpp|eager`` chooses (default ``auto``: ``cpp`` when it builds, else
``eager`` with one warning).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

from bnlab.errors import ConfigError

_SOURCE = Path(__file__).with_name("csrc") / "batchnorm.cpp"
_cpp: "CppBackend | None" = None
_cpp_error: str | None = None


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view([1, -1] + [1] * (x.dim() - 2))


def update_running(running_mean, running_var, mean, unbiased_var, momentum) -> None:
    """Moving averages ``r = (1 - momentum) * r + momentum * batch`` (the variance unbiased)."""
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    if running_var is not None:
        running_var.mul_(1 - momentum).add_(unbiased_var.to(running_var.dtype), alpha=momentum)


def unbiased(var: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The biased per-channel variance of ``x`` turned unbiased: ``var * M / (M - 1)``."""
    m = x.numel() // x.shape[1]
    return var * (m / (m - 1))


class EagerBackend:
    """The formulas in PyTorch ops (reference and fallback)."""

    name = "eager"

    @staticmethod
    def forward_train(x, weight, bias, running_mean, running_var, momentum, eps):
        var, mean = torch.var_mean(x, dim=_reduce_dims(x), correction=0)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else weight * invstd
        shift = -mean * scale if bias is None else bias - mean * scale
        y = torch.addcmul(_channel_view(shift, x), x, _channel_view(scale, x))
        update_running(running_mean, running_var, mean, unbiased(var, x), momentum)
        return y, mean, var, invstd

    @staticmethod
    def backward_train(dy, x, weight, mean, invstd, need_dx):
        dims, m = _reduce_dims(x), x.numel() // x.shape[1]
        xmu = x - _channel_view(mean, x)
        sum_dy = dy.sum(dims)
        dot = (dy * xmu).sum(dims)
        dgamma, dbeta = dot * invstd, sum_dy
        dx = None
        if need_dx:
            a = invstd if weight is None else weight * invstd
            # dx = a/M * (M*dy - sum_dy - xhat * sum(dy * xhat))
            dx = (dy - _channel_view(sum_dy / m, x) - xmu * _channel_view(invstd * invstd * dot / m, x)) * _channel_view(a, x)
        return dx, dgamma, dbeta

    @staticmethod
    def forward_eval(x, running_mean, running_var, weight, bias, eps):
        invstd = torch.rsqrt(running_var.to(x.dtype) + eps)
        scale = invstd if weight is None else weight * invstd
        shift = -running_mean.to(x.dtype) * scale if bias is None else bias - running_mean.to(x.dtype) * scale
        return torch.addcmul(_channel_view(shift, x), x, _channel_view(scale, x))

    @staticmethod
    def backward_eval(dy, x, weight, running_mean, running_var, eps, need_dx):
        dims = _reduce_dims(x)
        invstd = torch.rsqrt(running_var.to(x.dtype) + eps)
        dgamma = (dy * (x - _channel_view(running_mean.to(x.dtype), x))).sum(dims) * invstd
        dbeta = dy.sum(dims)
        a = invstd if weight is None else weight * invstd
        dx = dy * _channel_view(a, x) if need_dx else None
        return dx, dgamma, dbeta


class CppBackend:
    """Fused single-pass kernels from ``csrc/batchnorm.cpp``."""

    name = "cpp"
    DTYPES = (torch.float32, torch.float64)

    def __init__(self, module):
        self.m = module

    @staticmethod
    def _with_running(kernel, x, weight, bias, running_mean, running_var, momentum, eps):
        """Call a training kernel so the running statistics get updated: inside the kernel when
        they are contiguous tensors of the input's dtype, otherwise here from its batch stats."""
        if all(t is None or (t.dtype == x.dtype and t.is_contiguous()) for t in (running_mean, running_var)):
            return tuple(kernel(x, weight, bias, running_mean, running_var, momentum, eps))
        out = tuple(kernel(x, weight, bias, None, None, momentum, eps))
        update_running(running_mean, running_var, out[1], unbiased(out[2], x), momentum)
        return out

    def forward_train(self, x, weight, bias, running_mean, running_var, momentum, eps):
        return self._with_running(self.m.forward_train, x, weight, bias, running_mean, running_var, momentum, eps)

    def backward_train(self, dy, x, weight, mean, invstd, need_dx):
        return tuple(self.m.backward_train(dy, x, weight, mean, invstd, need_dx))

    def forward_eval(self, x, running_mean, running_var, weight, bias, eps):
        return self.m.forward_eval(x, running_mean, running_var, weight, bias, eps)

    def backward_eval(self, dy, x, weight, running_mean, running_var, eps, need_dx):
        return tuple(self.m.backward_eval(dy, x, weight, running_mean, running_var, eps, need_dx))

    # The C++ twins of functional.BatchNormTrain / BatchNormEval (same math, no Python per call).
    def train_autograd(self, x, weight, bias, running_mean, running_var, momentum, eps):
        return self._with_running(self.m.train_autograd, x, weight, bias, running_mean, running_var, momentum, eps)

    def eval_autograd(self, x, running_mean, running_var, weight, bias, eps):
        return self.m.eval_autograd(x, running_mean, running_var, weight, bias, eps)


def _build_key() -> str:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                cpu = line
                break
    except OSError:
        cpu = platform.processor()
    h = hashlib.sha256()
    # sys.prefix: torch's builder rebuilds when include paths change, so each venv gets its own build
    for part in (_SOURCE.read_bytes(), torch.__version__.encode(), sys.version.encode(), cpu.encode(),
                 platform.machine().encode(), sys.prefix.encode()):
        h.update(part)
    return h.hexdigest()[:12]


def _build_cpp():
    from torch.utils import cpp_extension

    try:
        import ninja  # the pip package carries the binary torch's builder needs

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bnlab" / "torch_extensions"
    key = _build_key()
    build_dir = cache / key
    build_dir.mkdir(parents=True, exist_ok=True)
    # -march=native is safe because the build key includes this CPU's feature flags.
    return cpp_extension.load(
        name=f"bnlab_bn_{key}",
        sources=[str(_SOURCE)],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        verbose=False,
    )


def cpp_backend() -> CppBackend | None:
    """The compiled backend, building it on first call; ``None`` if it cannot be built."""
    global _cpp, _cpp_error
    if _cpp is None and _cpp_error is None:
        try:
            _cpp = CppBackend(_build_cpp())
        except Exception as e:  # noqa: BLE001 - any build failure means: use the eager path
            _cpp_error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    return _cpp


_warned = False


def get_backend(x: torch.Tensor | None = None):
    """The backend for input ``x`` according to ``BNLAB_BN_BACKEND``."""
    global _warned
    choice = os.environ.get("BNLAB_BN_BACKEND", "auto")
    if choice == "eager":
        return EagerBackend
    if choice not in ("auto", "cpp"):
        raise ConfigError(f"BNLAB_BN_BACKEND={choice!r} is not a backend: use auto, cpp or eager")
    cpp = cpp_backend()
    if cpp is None:
        if choice == "cpp":
            raise ConfigError(f"BNLAB_BN_BACKEND=cpp but the C++ kernels could not be built ({_cpp_error}); "
                              "install gcc and ninja, or set BNLAB_BN_BACKEND=eager")
        if not _warned:
            warnings.warn(f"could not build bnlab's fused BN kernels ({_cpp_error}); using the slower PyTorch-ops path")
            _warned = True
        return EagerBackend
    if x is not None and (x.dtype not in CppBackend.DTYPES or x.device.type != "cpu"):
        return EagerBackend
    return cpp


def backend_name() -> str:
    """``cpp`` or ``eager``: which backend float32 CPU inputs use right now."""
    return get_backend(torch.empty(0)).name
