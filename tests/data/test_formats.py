import http.server
import os
import pickle
import threading
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from bnlab.data import load
from bnlab.data import fetch as fetch_mod
from bnlab.data.fetch import fetch, md5sum
from bnlab.errors import ChecksumError, DataFormatError, DataNotFoundError, DownloadError


# ------------------------------------------------------------------ CIFAR-10

def write_cifar(root, n=20, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": b"x", b"data": data, b"labels": labels, b"filenames": [b"f"] * n}, f, protocol=2)
        batches[name] = (data, labels)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in "abcdefghij"]}, f)
    return batches


def test_cifar_loads_batches(tmp_path):
    b = write_cifar(tmp_path / "cifar-10-batches-py")
    train = load("cifar10", "train", tmp_path)  # parent directory works too
    test = load("cifar10", "test", tmp_path / "cifar-10-batches-py")
    assert train.x.shape == (100, 3, 32, 32) and test.x.shape == (20, 3, 32, 32)
    assert train.classes == list("abcdefghij")
    np.testing.assert_array_equal(test.x.reshape(20, -1).numpy(), b["test_batch"][0])
    assert test.y.tolist() == b["test_batch"][1]
    # channel-major layout: the first 1024 bytes are the red plane
    np.testing.assert_array_equal(train.x[0, 0].reshape(-1).numpy(), b["data_batch_1"][0][0, :1024])


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_refuses_arbitrary_pickles(tmp_path):
    root = tmp_path / "c"
    write_cifar(root)
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(DataFormatError, match=r"data_batch_3 is not a CIFAR-10 batch: refusing to load posix.system"):
        load("cifar10", "train", root)


def test_cifar_truncated(tmp_path):
    root = tmp_path / "c"
    write_cifar(root)
    p = root / "test_batch"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(DataFormatError, match="test_batch is not a readable CIFAR-10 batch"):
        load("cifar10", "test", root)


def test_cifar_missing(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not hold cifar10.*data_batch_1"):
        load("cifar10", "train", tmp_path)


# ------------------------------------------------------------------ image folders

def write_folder(root, classes=("cats", "dogs"), per_class=5, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_image_folder_resizes_and_splits(tmp_path):
    root = write_folder(tmp_path / "pets", per_class=10)
    (root / "dogs" / "broken.jpg").write_bytes(b"not an image at all")
    (root / "cats" / "notes.txt").write_text("hello")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable file\(s\)"):
        train = load("image-folder", "train", root, image_size=16, channels=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        test = load("image-folder", "test", root, image_size=16, channels=1)
    assert train.x.shape[1:] == (1, 16, 16) and train.x.dtype == torch.uint8
    assert train.classes == ["cats", "dogs"]
    assert len(train) + len(test) == 20
    assert test.class_counts() == [2, 2]  # stratified 20% of each class


def test_image_folder_rgb_and_explicit_splits(tmp_path):
    write_folder(tmp_path / "f" / "train", per_class=3)
    write_folder(tmp_path / "f" / "test", per_class=2, seed=1)
    tr = load("image-folder", "train", tmp_path / "f", image_size=8, channels=3)
    te = load("image-folder", "test", tmp_path / "f", image_size=8, channels=3)
    assert tr.x.shape == (6, 3, 8, 8) and te.x.shape == (4, 3, 8, 8)
    img = Image.open(tmp_path / "f" / "train" / "cats" / "1.png").convert("RGB").resize((8, 8), Image.BILINEAR)
    np.testing.assert_array_equal(tr.x[1].permute(1, 2, 0).numpy(), np.asarray(img))


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="needs --data-dir"):
        load("image-folder", "train")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataNotFoundError, match="no class sub-folders"):
        load("image-folder", "train", tmp_path / "flat")
    (tmp_path / "flat" / "a").mkdir()
    (tmp_path / "flat" / "a" / "x.jpg").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(DataNotFoundError, match="no readable images"):
        load("image-folder", "train", tmp_path / "flat")


# ------------------------------------------------------------------ fetch

@pytest.fixture
def http_dir(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_fetch_verifies_and_is_atomic(http_dir, tmp_path, monkeypatch):
    from conftest import make_idx_dataset

    served, url = http_dir
    make_idx_dataset(served, n_train=12, n_test=4)
    sums = {f.name: md5sum(f) for f in served.iterdir()}
    monkeypatch.setitem(fetch_mod.CANONICAL, "mnist", ("http://unused.invalid/", sums))
    out = fetch("mnist", tmp_path / "dl", mirror=url)
    assert sorted(p.name for p in out.iterdir()) == sorted(sums)
    assert len(load("mnist", "train", out)) == 12
    # a second fetch keeps verified files
    msgs = []
    fetch("mnist", out, mirror=url, progress=msgs.append)
    assert all("already present" in m for m in msgs)


def test_fetch_wrong_checksum_leaves_nothing(http_dir, tmp_path, monkeypatch):
    from conftest import make_idx_dataset

    served, url = http_dir
    make_idx_dataset(served, n_train=12, n_test=4)
    sums = {f.name: md5sum(f) for f in served.iterdir()}
    sums["t10k-labels-idx1-ubyte.gz"] = "0" * 32
    monkeypatch.setitem(fetch_mod.CANONICAL, "mnist", ("http://unused.invalid/", sums))
    dest = tmp_path / "dl"
    with pytest.raises(ChecksumError, match=r"t10k-labels-idx1-ubyte.gz has MD5 [0-9a-f]{32}, expected 0{32}"):
        fetch("mnist", dest, mirror=url)
    left = sorted(p.name for p in dest.iterdir())
    assert "t10k-labels-idx1-ubyte.gz" not in left and not any(n.endswith(".part") for n in left)


def test_fetch_missing_file_is_download_error(http_dir, tmp_path, monkeypatch):
    served, url = http_dir
    monkeypatch.setitem(fetch_mod.CANONICAL, "mnist", ("http://unused.invalid/", {"nope.gz": "0" * 32}))
    with pytest.raises(DownloadError, match="could not download .*nope.gz"):
        fetch("mnist", tmp_path / "dl", mirror=url)
    assert list((tmp_path / "dl").iterdir()) == []
