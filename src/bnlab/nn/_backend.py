"""Where the batch-norm arithmetic runs: fused C++ kernels, or plain PyTorch ops.

Both backends offer the same interface (see ``functional.py`` for the math): the four kernels
``forward_train``, ``backward_train``, ``forward_eval`` and ``backward_eval``, and the two
differentiable steps built on them, ``train`` (returns the output and the batch mean and biased
variance) and ``eval``. Callers never ask which backend they hold.

- ``cpp``: ``csrc/batchnorm.cpp``, compiled on first use with ``torch.utils.cpp_extension``
  (gcc + ninja) into ``~/.cache/bnlab/torch_extensions``; float32/float64 on CPU.
- ``eager``: the same formulas in PyTorch ops; any dtype and device, ~3x slower on CPU.

The backend is chosen once, on first use, from ``BNLAB_BN_BACKEND=auto|cpp|eager`` (default
``auto``: ``cpp`` when it builds, else ``eager`` with one warning), or explicitly with
:func:`set_backend`. Inputs the compiled kernels do not handle (other dtypes, non-CPU devices)
use ``eager`` whatever the choice.
"""

from __future__ import annotations

import contextlib
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


def _needs_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class EagerBackend:
    """The formulas in PyTorch ops (reference and fallback); any dtype and device."""

    name = "eager"

    @staticmethod
    def supports(x: torch.Tensor) -> bool:
        return True

    def train(self, x, weight, bias, running_mean, running_var, momentum, eps):
        """Alg. 1, differentiable: ``(y, batch mean, biased batch variance)``; running stats updated."""
        if _needs_graph(x, weight, bias):
            from bnlab.nn.functional import BatchNormTrain

            return BatchNormTrain.apply(x, weight, bias, running_mean, running_var, momentum, eps, self)
        return self.forward_train(x, weight, bias, running_mean, running_var, momentum, eps)[:3]

    def eval(self, x, running_mean, running_var, weight, bias, eps):
        """Alg. 2, differentiable."""
        if _needs_graph(x, weight, bias):
            from bnlab.nn.functional import BatchNormEval

            return BatchNormEval.apply(x, running_mean, running_var, weight, bias, eps, self)
        return self.forward_eval(x, running_mean, running_var, weight, bias, eps)

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
    """Fused single-pass kernels from ``csrc/batchnorm.cpp``; float32/float64 on CPU."""

    name = "cpp"
    DTYPES = (torch.float32, torch.float64)

    def __init__(self, module):
        self.m = module

    def supports(self, x: torch.Tensor) -> bool:
        return x.dtype in self.DTYPES and x.device.type == "cpu"

    # train/eval run the C++ twins of functional.BatchNormTrain / BatchNormEval (same math, no
    # Python per call) when a graph is needed, else the plain kernels.
    def train(self, x, weight, bias, running_mean, running_var, momentum, eps):
        kernel = self.m.train_autograd if _needs_graph(x, weight, bias) else self.m.forward_train
        return self._with_running(kernel, x, weight, bias, running_mean, running_var, momentum, eps)[:3]

    def eval(self, x, running_mean, running_var, weight, bias, eps):
        kernel = self.m.eval_autograd if _needs_graph(x, weight, bias) else self.m.forward_eval
        return kernel(x, running_mean, running_var, weight, bias, eps)

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


def build_dir() -> Path:
    """Where the compiled kernels for this source, torch, Python, CPU and environment live."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bnlab" / "torch_extensions"
    return cache / _build_key()


@contextlib.contextmanager
def _build_lock(directory: Path):
    """Hold an exclusive ``flock`` on ``directory/bnlab.lock`` (Unix; elsewhere nothing).

    The kernel releases a flock when its process dies, however it dies, unlike torch's own
    build lock (see :func:`_build_cpp`)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(directory / "bnlab.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_cpp():
    from torch.utils import cpp_extension

    try:
        import ninja  # the pip package carries the binary torch's builder needs

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    name = f"bnlab_bn_{directory.name}"
    with _build_lock(directory):
        # torch's builder takes a lock file (FileBaton) on every load, built or not, and a
        # process waiting for it waits until the file is gone. A process SIGKILLed while holding
        # it (seen: a sweep worker killed during start-up) left the file behind, and every later
        # bnlab process hung forever. Under our flock no other bnlab process is in torch's
        # builder, so a lock file now is a dead process's.
        (directory / "lock").unlink(missing_ok=True)
        if (directory / f"{name}{getattr(cpp_extension, 'LIB_EXT', '.so')}").exists():
            try:  # built: load it without running the builder (~0.1 s less start-up)
                return cpp_extension._import_module_from_library(name, str(directory), True)
            except Exception:  # noqa: BLE001 - damaged or foreign: build it again below
                pass
        # -march=native is safe because the build key includes this CPU's feature flags.
        return cpp_extension.load(
            name=name,
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
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


EAGER = EagerBackend()
_chosen: "EagerBackend | CppBackend | None" = None
CHOICES = ("auto", "cpp", "eager")


def set_backend(choice: str = "auto"):
    """Choose where BN runs from now on, in this process (overrides ``BNLAB_BN_BACKEND``).

    Args:
        choice: ``auto`` (the compiled kernels if they build, else ``eager`` with a warning),
            ``cpp`` (the compiled kernels or an error) or ``eager`` (PyTorch ops). The first
            ``auto`` or ``cpp`` compiles the kernels (~30 s once, then cached).

    Returns:
        The backend in effect; its ``name`` is ``cpp`` or ``eager``.

    Raises:
        ConfigError: an unknown choice, or ``cpp`` when the kernels cannot be built.

    Example::

        set_backend("eager").name   # 'eager': plain PyTorch ops from now on
    """
    global _chosen
    if choice not in CHOICES:
        raise ConfigError(f"BN backend {choice!r} does not exist: use auto, cpp or eager "
                          "(BNLAB_BN_BACKEND or bnlab.nn.set_backend)")
    if choice == "eager":
        _chosen = EAGER
        return _chosen
    cpp = cpp_backend()
    if cpp is None:
        if choice == "cpp":
            raise ConfigError(f"BN backend cpp was asked for but the C++ kernels could not be built ({_cpp_error}); "
                              "install gcc and ninja, or use BNLAB_BN_BACKEND=eager")
        warnings.warn(f"could not build bnlab's fused BN kernels ({_cpp_error}); using the slower PyTorch-ops path")
        _chosen = EAGER
    else:
        _chosen = cpp
    return _chosen


def get_backend(x: torch.Tensor | None = None):
    """The backend for input ``x``: the chosen one (see :func:`set_backend`; on first use, from
    ``BNLAB_BN_BACKEND``) if it handles ``x``, else the eager one."""
    backend = _chosen or set_backend(os.environ.get("BNLAB_BN_BACKEND", "auto"))
    return backend if x is None or backend.supports(x) else EAGER


def backend_name() -> str:
    """``cpp`` or ``eager``: which backend float32 CPU inputs use right now.

    On first use this chooses the backend (see :func:`set_backend`), which may compile the kernels.

    Example::

        backend_name()   # 'cpp' where gcc and ninja built the kernels
    """
    return get_backend(torch.empty(0)).name
