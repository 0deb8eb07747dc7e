"""Where tensors live: ``--device auto|cpu|cuda|mps`` resolved once, batches moved per step.

Datasets stay in memory on the CPU as uint8; each batch is standardized there and moved to the
model's device as it is used (through pinned memory on CUDA, so the copy can overlap compute).
Checkpoints are always written with CPU tensors, so they load anywhere.

Example::

    dev = resolve_device("auto")        # cuda if there is one, else mps, else cpu
    net.to(dev)
    x = to_device(x, dev)
"""

from __future__ import annotations

import torch
from torch import nn

from bnlab.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available(kind: str) -> bool:
    """Whether this machine's PyTorch can use a device of this kind (``cpu``, ``cuda`` or ``mps``)."""
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return _mps_available()
    return False


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The device to use: ``auto`` (or None) picks CUDA, then MPS, then the CPU.

    Args:
        device: ``auto``, ``cpu``, ``cuda``, ``mps``, or from Python ``cuda:N`` or a
            :class:`torch.device`.

    Returns:
        a :class:`torch.device`.

    Raises:
        ConfigError: an unknown device name, or a device this machine does not have (the
            message says what PyTorch build is installed and what to use instead).

    Example::

        resolve_device("auto")   # device(type='cpu') on a machine without a GPU
    """
    if device is None or device == "auto":
        for kind in ("cuda", "mps"):
            if available(kind):
                return torch.device(kind)
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}") from None
    if dev.type not in DEVICES:
        raise ConfigError(f"device {device!r} is not supported by bnlab: choose one of {', '.join(DEVICES)}")
    if not available(dev.type):
        build = f"torch {torch.__version__}"
        if dev.type == "cuda" and torch.version.cuda is None:
            why = f"{build} is a CPU-only build"
        elif dev.type == "cuda":
            why = f"{build} (CUDA {torch.version.cuda}) finds no CUDA GPU"
        else:
            why = f"{build} finds no Apple MPS device"
        raise ConfigError(f"device {dev.type}: {why} on this machine: use --device cpu (or auto, which picks "
                          "the best device there is)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return dev


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); the CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``; on CUDA through pinned memory with a non-blocking copy.

    A tensor already there is returned as it is (no copy on the CPU).
    """
    if x.device == device or (device.type == x.device.type and device.index is None):
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
