"""Inputs built to take the machine down: every allocation must be bounded by what the file holds,
and every refusal is one DataFormatError naming the file, never a traceback or a huge buffer."""

import gzip
import io
import pickle
import struct
import time
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from bnlab.data import cifar, load, read_idx, write_idx
from bnlab.data.imagefolder import load_image, read_folder
from bnlab.errors import DataFormatError

MB = 1 << 20


def traced(fn):
    """What ``fn`` returns or its DataFormatError, and the peak memory tracemalloc saw meanwhile
    (numpy's buffers included)."""
    tracemalloc.start()
    try:
        return fn(), tracemalloc.get_traced_memory()[1]
    except DataFormatError as e:
        return e, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def refusal(fn):
    """The DataFormatError ``fn`` raises and the peak memory on the way."""
    err, peak = traced(fn)
    assert isinstance(err, DataFormatError), err
    return err, peak


def idx_header(dims, code=0x08):
    return struct.pack(">HBB", 0, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims)


# ------------------------------------------------------------------ IDX

def test_gzip_that_expands_far_beyond_its_header_is_refused_early(tmp_path):
    p = tmp_path / "bomb-images-idx3-ubyte.gz"
    with gzip.open(p, "wb") as f:  # header: 10x28x28, then 7840 bytes, then 50 MB of zeros (~50 KB compressed)
        f.write(idx_header((10, 28, 28)) + bytes(7840))
        for _ in range(50):
            f.write(bytes(MB))
    assert p.stat().st_size < 200_000
    t = time.perf_counter()
    err, peak = refusal(lambda: read_idx(p))
    assert "bomb-images-idx3-ubyte.gz: payload is too long" in str(err)
    assert peak < 5 * MB, peak
    assert time.perf_counter() - t < 1.0


def test_tiny_gzip_declaring_a_gigabyte_is_refused_without_allocating_it(tmp_path):
    p = tmp_path / "tiny.gz"
    with gzip.open(p, "wb") as f:
        f.write(idx_header((1000, 1000, 1000)) + bytes(100))
    err, peak = refusal(lambda: read_idx(p))
    assert "payload is too short" in str(err) and "cannot hold more" in str(err)
    assert peak < MB, peak


def test_tiny_raw_file_declaring_a_gigabyte_is_refused_without_allocating_it(tmp_path):
    p = tmp_path / "tiny-raw"
    p.write_bytes(idx_header((1000, 1000, 1000)) + bytes(10))
    err, peak = refusal(lambda: read_idx(p))
    assert "need 1000000000 bytes, file has 10" in str(err)
    assert peak < MB, peak


@pytest.mark.parametrize("dims, code", [((65535, 65535, 65535), 0x08), ((1 << 31, 4), 0x0E),
                                        ((0xFFFFFFFF,) * 255, 0x08)])
def test_absurd_declared_size_is_refused_up_front(tmp_path, dims, code):
    p = tmp_path / "absurd.gz"
    with gzip.open(p, "wb") as f:
        f.write(idx_header(dims, code) + bytes(1000))
    with pytest.raises(DataFormatError, match=r"absurd\.gz: header declares dimensions .*MAX_PAYLOAD_BYTES"):
        read_idx(p)


def test_normal_gzip_costs_about_one_payload(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (8000, 28, 28), dtype=np.uint8)  # 6.3 MB, barely compressible
    p = write_idx(tmp_path / "n.gz", a)
    b, peak = traced(lambda: read_idx(p))
    np.testing.assert_array_equal(a, b)
    assert peak < a.nbytes + 2 * MB, (peak, a.nbytes)  # the payload plus one decompression chunk, no copy


def test_multibyte_payload_is_swapped_in_place(tmp_path):
    a = np.arange(-50_000, 50_000, dtype=np.int32).reshape(100, 1000)
    p = write_idx(tmp_path / "i.idx", a)
    b, peak = traced(lambda: read_idx(p))
    np.testing.assert_array_equal(a, b)
    assert b.dtype.isnative and peak < 1.5 * a.nbytes


# ------------------------------------------------------------------ CIFAR pickles

class Reconstructed:
    """Pickles as numpy does (``_reconstruct`` then ``__setstate__``) but with any shape and state."""

    def __init__(self, state, initial_shape=(0,)):
        self.state, self.initial_shape = state, initial_shape

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return _reconstruct, (np.ndarray, self.initial_shape, b"b"), self.state


class CallNdarray:
    def __reduce__(self):
        return np.ndarray, ((10**6, 3072),)


def write_batch(path, obj, protocol=2):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def good_batch(n=4):
    return {b"data": np.zeros((n, 3072), np.uint8), b"labels": [1] * n}


def test_good_batch_still_loads(tmp_path):
    for protocol in (2, 4, 5):
        x, y = cifar.read_batch(write_batch(tmp_path / f"b{protocol}", good_batch(), protocol))
        assert x.shape == (4, 3, 32, 32) and type(x) is np.ndarray and y.tolist() == [1] * 4


@pytest.mark.parametrize("data, needle", [
    (Reconstructed((1, (10**6, 3072), np.dtype("u1"), False, b"\0" * 10)), "declares shape (1000000, 3072)"),
    (Reconstructed((1, (2,), np.dtype("O"), False, [1, 2])), "refusing an array of dtype"),
    (Reconstructed((1, (0,), np.dtype("u1"), False, b""), initial_shape=(10**6, 3072)), "refusing to reconstruct"),
    (CallNdarray(), "refusing to call numpy.ndarray"),
])
def test_arrays_declaring_more_than_they_hold_are_refused_before_allocating(tmp_path, data, needle):
    p = write_batch(tmp_path / "data_batch_1", {b"data": data, b"labels": [0]})
    err, peak = refusal(lambda: cifar.read_batch(p))
    assert str(err).startswith(f"{p} is not a CIFAR-10 batch") and needle in str(err), err
    assert "\n" not in str(err) and peak < MB


def test_huge_declared_bytes_in_an_extra_key(tmp_path):
    body = pickle.dumps(good_batch(), protocol=4)
    # a dict entry whose BINBYTES8 declares 1 TB but carries 8 bytes
    evil = (b"\x80\x04}(" + b"\x8c\x05extra" + b"\x8e" + struct.pack("<Q", 1 << 40) + b"12345678" + b"u.")
    p = tmp_path / "data_batch_2"
    p.write_bytes(evil)
    err, peak = refusal(lambda: cifar.read_batch(p))
    assert "data_batch_2 is not a readable CIFAR-10 batch" in str(err) and peak < MB
    p.write_bytes(body)
    assert cifar.read_batch(p)[0].shape == (4, 3, 32, 32)


@pytest.mark.parametrize("batch, needle", [
    ({b"data": np.zeros((2, 3072)), b"labels": [0, 1]}, "'data' must be uint8 of shape (N, 3072), found float64"),
    ({b"data": [[0] * 3072] * 2, b"labels": [0, 1]}, "'data' must be uint8 of shape (N, 3072), found list"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": "01"}, "'labels' must be a list of ints, found str"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, "1"]}, "'labels' must be a list of ints"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10**30]}, "labels must be 0..9"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but 1 labels"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, "keys 'data' and 'labels' are missing"),
    ({b"\xff\xfe": 1, b"data": np.zeros((1, 3072), np.uint8), b"labels": [3]}, None),  # odd extra keys are ignored
])
def test_batch_contents_are_validated(tmp_path, batch, needle):
    p = write_batch(tmp_path / "test_batch", batch)
    if needle is None:
        assert cifar.read_batch(p)[1].tolist() == [3]
        return
    with pytest.raises(DataFormatError) as e:
        cifar.read_batch(p)
    assert str(e.value).startswith(f"{p}") and needle in str(e.value)


def test_oversized_batch_file_is_refused_before_reading(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    write_batch(root / "data_batch_1", good_batch())
    p = root / "test_batch"
    with open(p, "wb") as f:
        f.truncate(cifar.MAX_BATCH_BYTES + 1)  # sparse: no disk space used
    err, peak = refusal(lambda: load("cifar10", "test", root))
    assert "more than a CIFAR-10 batch can be" in str(err) and peak < MB


def test_codecs_other_than_latin1_are_refused(tmp_path):
    p = tmp_path / "data_batch_1"
    p.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x06\x00\x00\x00utf-16\x86R.")
    with pytest.raises(DataFormatError, match="refusing _codecs.encode"):
        cifar.read_batch(p)


# ------------------------------------------------------------------ images

def png_declaring(width, height):
    """A PNG whose header declares ``width x height`` pixels and holds almost nothing."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
            + chunk(b"IEND", b""))


def test_png_declaring_a_huge_size_is_refused_with_one_line(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(png_declaring(100_000, 100_000))
    err, peak = refusal(lambda: load_image(p, 28, 1))
    assert str(err).startswith(f"{p} is too large to decode safely") and peak < MB
    assert "MAX_IMAGE_PIXELS" in str(err)


def test_decompression_bombs_are_skipped_and_counted_in_a_folder(tmp_path, monkeypatch):
    root = tmp_path / "pets"
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        Image.fromarray(np.full((20, 20, 3), 99, np.uint8)).save(root / c / "ok.png")
    (root / "cats" / "bomb.png").write_bytes(png_declaring(100_000, 100_000))  # Pillow's error
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(root / "dogs" / "big.png")  # Pillow's warning, below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x50 = 2000: over the limit, not over twice it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, y, classes = read_folder(root, 8, 3)
    assert x.shape == (2, 3, 8, 8) and classes == ["cats", "dogs"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "skipped 2 unreadable file(s)" in messages[0], messages
    assert "bomb.png" in messages[0] and "big.png" in messages[0]


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path, monkeypatch):
    arr = np.zeros((3000, 4000, 3), np.uint8)
    arr[:, :2000] = 255  # left half white
    p = tmp_path / "photo.jpg"
    Image.fromarray(arr).save(p, quality=90)
    del arr
    drafted = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = real_draft(self, mode, size)
        drafted.append((mode, self.size))
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    t = time.perf_counter()
    img = load_image(p, 28, 1, keep_aspect=True)
    assert time.perf_counter() - t < 1.0
    assert drafted == [("L", (500, 375))]  # decoded at 1/8 scale, straight to grayscale
    assert img.original_size == (4000, 3000) and img.mode == "RGB" and img.resized_to == (28, 21)
    assert img.pixels.shape == (1, 28, 28)
    assert img.pixels[0, 14, :10].min() > 240 and img.pixels[0, 14, -10:].max() < 15


def test_palette_and_16_bit_images_load(tmp_path):
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)).save(tmp_path / "sixteen.png")
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).convert("P").save(tmp_path / "palette.png")
    for name in ("sixteen.png", "palette.png"):
        img = load_image(tmp_path / name, 16, 3)
        assert img.pixels.shape == (3, 16, 16) and img.converted_to == "RGB"
    assert load_image(tmp_path / "palette.png", 16, 1).pixels.min() > 150
