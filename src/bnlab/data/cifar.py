"""CIFAR-10 in its "python version" layout: pickled batches ``data_batch_1..5`` and ``test_batch``.

Pickles can run arbitrary code, so they are read with an unpickler that admits only what the
format needs: numpy arrays and dtypes (plus the codec helper numpy uses for byte strings).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from bnlab.errors import DataFormatError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 of one CIFAR-10 batch file."""
    try:
        with open(path, "rb") as f:
            d = _RestrictedUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataFormatError(f"{path} is not a CIFAR-10 batch: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as e:
        raise DataFormatError(f"{path} is not a readable CIFAR-10 batch (corrupt or truncated: {e})") from None
    if not isinstance(d, dict):
        raise DataFormatError(f"{path} is not a CIFAR-10 batch: expected a dict, found {type(d).__name__}")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise DataFormatError(f"{path} is not a CIFAR-10 batch: keys 'data' and 'labels' are missing")
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataFormatError(f"{path}: 'data' must be uint8 of shape (N, 3072), found {data.dtype} {data.shape}")
    if len(data) != len(labels):
        raise DataFormatError(f"{path}: {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataFormatError(f"{path}: labels must be 0..9, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels
