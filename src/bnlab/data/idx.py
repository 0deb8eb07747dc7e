"""The IDX file format of MNIST and Fashion-MNIST, plain or gzip-compressed.

Layout (big-endian): two zero bytes, a dtype code, the number of dimensions ``d``, then ``d``
32-bit sizes, then the payload in C order. Every check failure names the file and what is wrong.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from bnlab.errors import DataFormatError

# IDX dtype code -> big-endian numpy dtype.
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_OF = {dt.str.lstrip("><|"): code for code, dt in IDX_DTYPES.items()}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise DataFormatError(f"cannot read {path}: {e.strerror or e}") from None
        raise DataFormatError(
            f"{path} is not a readable gzip file ({e}); it is probably truncated or corrupt: "
            "delete it and fetch it again"
        ) from None


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a native-endian numpy array."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataFormatError(f"{path} is too short to be an IDX file ({len(raw)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in IDX_DTYPES:
        raise DataFormatError(
            f"{path} is not an IDX file: bad magic number 0x{raw[:4].hex()} "
            "(expected 0x0000 followed by a dtype code 08/09/0B/0C/0D/0E)"
        )
    if ndim == 0:
        raise DataFormatError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataFormatError(f"{path}: header truncated (needs {header_len} bytes, file has {len(raw)})")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header_len
    if got != expected:
        what = "short" if got < expected else "long"
        raise DataFormatError(
            f"{path}: payload is too {what}: dimensions {tuple(dims)} need {expected} bytes, "
            f"file has {got}; the file is corrupt or truncated, fetch it again"
        )
    # astype copies: the array owns writable memory instead of viewing the immutable bytes.
    return np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file; gzip-compressed when ``path`` ends in ``.gz``."""
    path = Path(path)
    array = np.asarray(array)
    key = array.dtype.str.lstrip("><|=")
    if key not in _CODE_OF:
        raise DataFormatError(f"cannot write dtype {array.dtype} as IDX (use uint8, int8, int16, int32, float32, float64)")
    code = _CODE_OF[key]
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path
