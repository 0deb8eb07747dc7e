import gzip

import numpy as np
import pytest

from bnlab.data import load, read_idx, write_idx
from bnlab.errors import DataFormatError, DataNotFoundError
from conftest import make_idx_dataset


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_round_trip(tmp_path, dtype, suffix):
    a = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    p = write_idx(tmp_path / f"a.idx{suffix}", a)
    b = read_idx(p)
    assert b.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(a, b)
    b[0, 0, 0] = 1  # owns writable memory


def test_bad_magic(tmp_path):
    p = tmp_path / "x-images-idx3-ubyte"
    p.write_bytes(b"\x01\x02\x08\x01" + b"\x00\x00\x00\x01" + b"\x00")
    with pytest.raises(DataFormatError, match=r"x-images-idx3-ubyte is not an IDX file: bad magic"):
        read_idx(p)


def test_unknown_dtype_code(tmp_path):
    p = tmp_path / "y"
    p.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataFormatError, match="bad magic"):
        read_idx(p)


def test_short_payload(tmp_path):
    p = write_idx(tmp_path / "s", np.zeros((4, 3, 3), np.uint8))
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(DataFormatError, match=r"payload is too short: dimensions \(4, 3, 3\) need 36 bytes, file has 31"):
        read_idx(p)


def test_long_payload(tmp_path):
    p = write_idx(tmp_path / "l", np.zeros((2,), np.uint8))
    p.write_bytes(p.read_bytes() + b"\x00")
    with pytest.raises(DataFormatError, match="too long"):
        read_idx(p)


def test_truncated_header(tmp_path):
    p = tmp_path / "h"
    p.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(DataFormatError, match="header truncated"):
        read_idx(p)


def test_truncated_gzip(tmp_path):
    p = write_idx(tmp_path / "t.gz", np.random.default_rng(0).integers(0, 255, (50, 28, 28), dtype=np.uint8))
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(DataFormatError, match=r"t\.gz is not a readable gzip file.*truncated"):
        read_idx(p)


def test_not_gzip_but_gz_suffix(tmp_path):
    p = tmp_path / "n.gz"
    p.write_bytes(b"plain bytes, not gzip")
    with pytest.raises(DataFormatError, match="not a readable gzip"):
        read_idx(p)


def test_load_from_data_dir_gz_and_raw(tmp_path):
    for gz in (True, False):
        d = make_idx_dataset(tmp_path / f"m{gz}", n_train=30, n_test=10, gz=gz)
        tr = load("mnist", "train", d)
        te = load("mnist", "test", d)
        assert tr.x.shape == (30, 1, 28, 28) and tr.x.dtype.is_floating_point is False
        assert te.x.shape == (10, 1, 28, 28)
        assert tr.classes == [str(i) for i in range(10)]
        raw = read_idx(next(d.glob("train-images*")))
        assert np.array_equal(tr.x[:, 0].numpy(), raw)


def test_label_count_mismatch(tmp_path):
    d = make_idx_dataset(tmp_path / "m", n_train=30, n_test=10)
    write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8))
    with pytest.raises(DataFormatError, match=r"has 30 images but .*train-labels-idx1-ubyte.gz has 29 labels"):
        load("mnist", "train", d)


def test_label_out_of_range(tmp_path):
    d = make_idx_dataset(tmp_path / "m", n_train=5, n_test=5)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.full(5, 12, np.uint8))
    with pytest.raises(DataFormatError, match=r"labels must be in 0\.\.9"):
        load("mnist", "test", d)


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match=r"empty does not hold mnist.*--data-dir"):
        load("mnist", "train", tmp_path / "empty")


def test_missing_dataset_names_debian_package(monkeypatch, tmp_path):
    import bnlab.data.sources as sources

    monkeypatch.setattr(sources, "search_dirs", lambda name, data_dir=None: [tmp_path / "nothing"])
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load("fashion-mnist", "train")


def test_gzip_corrupt_in_middle(tmp_path):
    d = make_idx_dataset(tmp_path / "m", n_train=100, n_test=10)
    p = d / "train-images-idx3-ubyte.gz"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(DataFormatError, match="train-images-idx3-ubyte.gz"):
        load("mnist", "train", d)


def test_env_data_dir_is_searched(monkeypatch, tmp_path):
    make_idx_dataset(tmp_path / "root" / "mnist", n_train=7, n_test=3)
    monkeypatch.setenv("BNLAB_DATA_DIR", str(tmp_path / "root"))
    assert len(load("mnist", "train")) == 7


def test_gzip_stdlib_used_for_gz(tmp_path):
    d = make_idx_dataset(tmp_path / "m", n_train=3, n_test=2)
    with gzip.open(d / "train-images-idx3-ubyte.gz") as f:
        assert f.read(4) == b"\x00\x00\x08\x03"
