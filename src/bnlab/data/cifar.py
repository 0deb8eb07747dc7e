"""CIFAR-10 in its "python version" layout: pickled batches ``data_batch_1..5`` and ``test_batch``.

Pickles can run arbitrary code, so they are read with an unpickler that admits only what the
format needs: numpy arrays and dtypes (plus the codec helper numpy uses for byte strings). A
pickle can also ask for memory it does not hold (an array header declaring a huge shape, a
byte string longer than the file), so nothing is expanded beyond what the file can justify:
the file must be at most ``MAX_BATCH_BYTES``; every length the pickle declares for a byte or
text string must fit in the file (checked by a pure-Python pass over the opcodes, because the C
unpickler allocates a declared length before it reads); every array's declared size must match
the bytes that come with it; and the result must be exactly a batch: ``data`` uint8
``(N, 3072)``, ``labels`` N ints in 0..9.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
from pathlib import Path

import numpy as np

from bnlab.errors import DataFormatError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]

# A real batch is 10000 images, about 31 MB. Larger files are refused before they are read.
MAX_BATCH_BYTES = 200 << 20
MAX_BATCH_IMAGES = 60000  # the whole training set in one file
_FETCH_AGAIN = "replace it with the file from the CIFAR-10 python archive (cifar-10-python.tar.gz)"


class _Array(np.ndarray):
    """Stands in for ``numpy.ndarray`` while unpickling: checks the state before numpy sees it.

    numpy pickles an array as ``_reconstruct(ndarray, (0,), b"b")`` followed by
    ``__setstate__((version, shape, dtype, is_fortran, rawdata))``; the shape is only a claim
    until it is compared with ``rawdata``.
    """

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("refusing to call numpy.ndarray directly (it allocates before any data is read)")

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("malformed array state")
        shape, dtype, _, raw = state[-4:]
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise pickle.UnpicklingError(f"refusing an array of dtype {dtype!r} (only plain numbers are allowed)")
        if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise pickle.UnpicklingError(f"malformed array shape {shape!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != nbytes:
            size = len(raw) if isinstance(raw, (bytes, bytearray)) else type(raw).__name__
            raise pickle.UnpicklingError(f"an array declares shape {shape} of {dtype} ({nbytes} bytes) "
                                         f"but holds {size} bytes")
        super().__setstate__(state)


def _reconstruct(subtype, shape, dtype):
    if subtype is not _Array or shape != (0,):
        raise pickle.UnpicklingError(f"refusing to reconstruct an array of shape {shape!r} from {subtype!r}")
    return np.ndarray.__new__(_Array, shape, dtype)


def _encode(text, encoding="utf-8"):
    # numpy's pickles carry byte strings as latin-1 text; no other codec is needed
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with {encoding!r}")
    return text.encode("latin1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _Array,
    ("numpy.core.multiarray", "scalar"): None,
    ("numpy._core.multiarray", "scalar"): None,
    ("numpy.core.numeric", "_frombuffer"): None,  # a view of bytes already read: allocates nothing
    ("numpy._core.numeric", "_frombuffer"): None,
    ("numpy", "dtype"): None,
    ("_codecs", "encode"): _encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only the names in ``_ALLOWED`` (``None``: the real one, else the checked stand-in)."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return _ALLOWED[module, name] or super().find_class(module, name)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 of one CIFAR-10 batch file."""
    try:
        size = path.stat().st_size
        if size > MAX_BATCH_BYTES:
            raise DataFormatError(f"{path} is {size} bytes, more than a CIFAR-10 batch can be ({MAX_BATCH_BYTES}, "
                                  f"bnlab.data.cifar.MAX_BATCH_BYTES): {_FETCH_AGAIN}")
        raw = path.read_bytes()
    except OSError as e:
        raise DataFormatError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        for _ in pickletools.genops(raw):  # ValueError if a declared length runs past the end
            pass
        d = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataFormatError(f"{path} is not a CIFAR-10 batch: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, KeyError,
            OverflowError) as e:
        raise DataFormatError(f"{path} is not a readable CIFAR-10 batch (corrupt or truncated: {e}): "
                              f"{_FETCH_AGAIN}") from None
    if not isinstance(d, dict):
        raise DataFormatError(f"{path} is not a CIFAR-10 batch: expected a dict, found {type(d).__name__}")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise DataFormatError(f"{path} is not a CIFAR-10 batch: keys 'data' and 'labels' are missing")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataFormatError(f"{path}: 'data' must be uint8 of shape (N, 3072), found {found}: {_FETCH_AGAIN}")
    if len(data) > MAX_BATCH_IMAGES:
        raise DataFormatError(f"{path}: {len(data)} images, more than CIFAR-10 has ({MAX_BATCH_IMAGES})")
    if isinstance(labels, np.ndarray):
        labels = labels.tolist() if labels.ndim == 1 else labels
    if not isinstance(labels, (list, tuple)) or not all(_is_int(v) for v in labels):
        raise DataFormatError(f"{path}: 'labels' must be a list of ints, found {type(labels).__name__}: {_FETCH_AGAIN}")
    if len(data) != len(labels):
        raise DataFormatError(f"{path}: {len(data)} images but {len(labels)} labels")
    if labels and (min(labels) < 0 or max(labels) > 9):
        raise DataFormatError(f"{path}: labels must be 0..9, found {min(labels)}..{max(labels)}")
    return np.asarray(data).reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)
