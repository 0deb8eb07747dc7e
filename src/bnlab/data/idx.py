"""The IDX file format of MNIST and Fashion-MNIST, plain or gzip-compressed.

Layout (big-endian): two zero bytes, a dtype code, the number of dimensions ``d``, then ``d``
32-bit sizes, then the payload in C order. Every check failure names the file and what is wrong.

Reading trusts nothing the header says until the bytes are there: the header is read first and
the payload size it declares is checked against what the file can hold (its size for a raw
file; at most ``MAX_DEFLATE_RATIO`` times its size for a gzip file) before any buffer is
allocated; then the payload is streamed into that one buffer, and one more byte in the stream
is a refusal. A small file can therefore never make us allocate much, and a normal file costs
its payload once (no copy of the whole file next to the array).
"""

from __future__ import annotations

import gzip
import math
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

# The largest payload read_idx accepts, in bytes (Fashion-MNIST's training images are 47 MB).
# A header declaring more is taken as corrupt; set bnlab.data.idx.MAX_PAYLOAD_BYTES to read more.
MAX_PAYLOAD_BYTES = 4 << 30
# Deflate cannot expand a byte of compressed data into more than 1032 bytes.
MAX_DEFLATE_RATIO = 1032
_CHUNK = 1 << 20  # bytes decompressed per read: bounds gzip's temporary buffers


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_into(f, buf: memoryview) -> int:
    """Fill ``buf`` from ``f`` in chunks; the number of bytes read (less than ``len(buf)`` at end of file)."""
    pos = 0
    while pos < len(buf):
        n = f.readinto(buf[pos:pos + _CHUNK])
        if not n:
            break
        pos += n
    return pos


def _size_error(path: Path, dims, expected: int, got: str, short: bool) -> DataFormatError:
    return DataFormatError(
        f"{path}: payload is too {'short' if short else 'long'}: dimensions {tuple(dims)} need {expected} bytes, "
        f"file has {got}; the file is corrupt or truncated, fetch it again"
    )


def _read_payload(path: Path, f, file_size: int, header_len: int, dims, dtype: np.dtype) -> np.ndarray:
    expected = math.prod(dims) * dtype.itemsize
    if expected > MAX_PAYLOAD_BYTES:
        raise DataFormatError(
            f"{path}: header declares dimensions {tuple(dims)}, {expected} bytes, more than the "
            f"{MAX_PAYLOAD_BYTES} bytes bnlab reads (bnlab.data.idx.MAX_PAYLOAD_BYTES); the header is corrupt, "
            "fetch the file again"
        )
    if path.suffix != ".gz":
        got = file_size - header_len
        if got != expected:
            raise _size_error(path, dims, expected, str(got), short=got < expected)
    elif expected > file_size * MAX_DEFLATE_RATIO:
        raise _size_error(path, dims, expected, f"at most {file_size * MAX_DEFLATE_RATIO} "
                          f"(a {file_size}-byte gzip file cannot hold more)", short=True)
    buf = np.empty(expected, dtype=np.uint8)
    got = _read_into(f, memoryview(buf))
    if got < expected:
        raise _size_error(path, dims, expected, str(got), short=True)
    if f.read(1):
        raise _size_error(path, dims, expected, f"more than {expected}", short=False)
    out = buf.view(dtype)
    if not dtype.isnative and dtype.itemsize > 1:
        out.byteswap(inplace=True)  # in place: no second copy of the payload
    return out.view(dtype.newbyteorder("=")).reshape(dims)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a writable native-endian numpy array shared with nothing else.

    Nothing is allocated beyond what the file can hold (see the module docstring).

    Args:
        path: an IDX file; gzip-compressed when the name ends in ``.gz``.

    Returns:
        An array with the file's dimensions and dtype (uint8 for MNIST images and labels).

    Raises:
        DataFormatError: the file is missing, unreadable, not IDX, truncated, longer than its
            header says, or declares more than ``MAX_PAYLOAD_BYTES``.

    Example::

        images = read_idx("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
        images.shape, images.dtype   # ((60000, 28, 28), dtype('uint8'))
    """
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with _open(path) as f:
            head = f.read(4)
            if len(head) < 4:
                raise DataFormatError(f"{path} is too short to be an IDX file ({len(head)} bytes)")
            zero, code, ndim = struct.unpack(">HBB", head)
            if zero != 0 or code not in IDX_DTYPES:
                raise DataFormatError(
                    f"{path} is not an IDX file: bad magic number 0x{head.hex()} "
                    "(expected 0x0000 followed by a dtype code 08/09/0B/0C/0D/0E)"
                )
            if ndim == 0:
                raise DataFormatError(f"{path}: IDX header declares 0 dimensions")
            header_len = 4 + 4 * ndim
            sizes = f.read(4 * ndim)
            if len(sizes) < 4 * ndim:
                raise DataFormatError(
                    f"{path}: header truncated (needs {header_len} bytes, file has {4 + len(sizes)})")
            dims = struct.unpack(f">{ndim}I", sizes)
            return _read_payload(path, f, file_size, header_len, dims, IDX_DTYPES[code])
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise DataFormatError(f"cannot read {path}: {e.strerror or e}") from None
        raise DataFormatError(
            f"{path} is not a readable gzip file ({e}); it is probably truncated or corrupt: "
            "delete it and fetch it again"
        ) from None


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file; gzip-compressed when ``path`` ends in ``.gz``.

    Args:
        path: the file to write (replaced if it exists).
        array: uint8, int8, int16, int32, float32 or float64 data of any shape.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        DataFormatError: a dtype IDX cannot hold (e.g. int64: convert it first).

    Example::

        write_idx("labels-idx1-ubyte.gz", np.array([3, 1, 4], dtype=np.uint8))
        read_idx("labels-idx1-ubyte.gz")   # array([3, 1, 4], dtype=uint8)
    """
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
