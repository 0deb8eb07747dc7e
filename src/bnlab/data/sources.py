"""Named datasets and where to find them.

``load(name, split)`` finds a dataset by name. File-based sources search, in order: the
``data_dir`` argument (``--data-dir``), ``$BNLAB_DATA_DIR/<name>``, the Debian package location
``/usr/share/datasets/<name>`` and ``~/.cache/bnlab/<name>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bnlab.data import cifar, imagefolder
from bnlab.data.dataset import Dataset, Standardizer
from bnlab.data.idx import read_idx
from bnlab.errors import ConfigError, DataFormatError, DataNotFoundError, suggest

SPLITS = ("train", "test")

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class Source:
    """A named dataset: how to find it and how to read one split of it."""

    name: str
    description: str
    reader: Callable[..., tuple[np.ndarray, np.ndarray, list[str], str]]
    needs_files: bool = True
    missing_hint: str = ""
    # Files whose presence marks a candidate directory as holding this dataset.
    marker: Callable[[Path], bool] | None = None


def search_dirs(name: str, data_dir: str | Path | None = None) -> list[Path]:
    """Directories searched for dataset ``name``, in order (whether or not they exist).

    Args:
        name: a dataset name, e.g. ``fashion-mnist``.
        data_dir: a directory to search first (``--data-dir``), used as given (not ``<data_dir>/<name>``).

    Returns:
        ``[data_dir, $BNLAB_DATA_DIR/<name>, /usr/share/datasets/<name>, <cache>/<name>]``, without
        the entries that are not set; the cache is ``$BNLAB_CACHE_DIR``, by default ``~/.cache/bnlab``.

    Example::

        search_dirs("fashion-mnist")
        # [PosixPath('/usr/share/datasets/fashion-mnist'), PosixPath('/home/me/.cache/bnlab/fashion-mnist')]
    """
    dirs = []
    if data_dir is not None:
        dirs.append(Path(data_dir).expanduser())
    env = os.environ.get("BNLAB_DATA_DIR")
    if env:
        dirs.append(Path(env).expanduser() / name)
    dirs.append(Path("/usr/share/datasets") / name)
    dirs.append(cache_dir(name))
    return dirs


def cache_dir(name: str) -> Path:
    """Where ``bnlab data fetch`` puts a dataset when no ``--data-dir`` is given:
    ``$BNLAB_CACHE_DIR/<name>``, by default ``~/.cache/bnlab/<name>``."""
    root = os.environ.get("BNLAB_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bnlab"
    return Path(root) / name


def _idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _has_idx(directory: Path) -> bool:
    return all(_idx_file(directory, stem) for pair in IDX_FILES.values() for stem in pair)


def _has_cifar(directory: Path) -> bool:
    return _cifar_root(directory) is not None


def _cifar_root(directory: Path) -> Path | None:
    for d in (directory, directory / "cifar-10-batches-py"):
        if (d / "test_batch").is_file() and (d / "data_batch_1").is_file():
            return d
    return None


def find(name: str, data_dir: str | Path | None = None) -> Path:
    """The first directory of :func:`search_dirs` that holds dataset ``name``.

    Args:
        name: a file-based dataset (``fashion-mnist``, ``mnist``, ``cifar10``, ``image-folder``).
        data_dir: the directory to read it from; when given it must hold the dataset (another
            copy elsewhere is not used instead, so nobody believes their files were read).

    Returns:
        The directory. For datasets with known files (IDX, CIFAR batches) it holds all of them.

    Raises:
        DataNotFoundError: no searched directory holds the dataset; the message lists where bnlab
            looked and how to get the data.
        ConfigError: an unknown dataset name.

    Example::

        find("fashion-mnist")   # PosixPath('/usr/share/datasets/fashion-mnist') with the Debian package
    """
    src = get_source(name)
    searched = search_dirs(name, data_dir)
    if data_dir is not None and not Path(data_dir).expanduser().exists():
        raise DataNotFoundError(f"--data-dir {data_dir} does not exist: {src.missing_hint}")
    found = next((d for d in searched if d.is_dir() and (src.marker is None or src.marker(d))), None)
    if data_dir is not None and found is not None and found != searched[0]:
        # --data-dir was asked for and is not where the data is: using another copy silently
        # would make the user believe their files were read
        raise DataNotFoundError(f"--data-dir {data_dir} does not hold {name}; there is a copy in {found}: leave out "
                                "--data-dir to use it")
    if found is not None:
        return found
    if data_dir is not None and src.marker is not None and Path(data_dir).is_dir():
        raise DataNotFoundError(f"{data_dir} does not hold {name}: {src.missing_hint}")
    where = ", ".join(str(d) for d in searched)
    raise DataNotFoundError(f"{name} not found (searched {where}): {src.missing_hint}")


def _read_idx_split(name: str, classes: list[str]):
    def reader(split: str, directory: Path, **_):
        img_stem, lbl_stem = IDX_FILES[split]
        img_path, lbl_path = _idx_file(directory, img_stem), _idx_file(directory, lbl_stem)
        if img_path is None or lbl_path is None:
            missing = img_stem if img_path is None else lbl_stem
            raise DataNotFoundError(f"{directory} has no {missing}[.gz] for the {split} split of {name}")
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataFormatError(f"{img_path}: expected uint8 images (N, H, W), found {images.dtype} {images.shape}")
        if labels.ndim != 1:
            raise DataFormatError(f"{lbl_path}: expected labels of shape (N,), found {labels.shape}")
        if len(images) != len(labels):
            raise DataFormatError(
                f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels: "
                "the files come from different datasets or one is corrupt"
            )
        labels = labels.astype(np.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataFormatError(f"{lbl_path}: labels must be in 0..{len(classes) - 1}, found {labels.min()}..{labels.max()}")
        return images[:, None], labels, classes, str(directory)

    return reader


def _read_cifar(split: str, directory: Path, **_):
    root = _cifar_root(directory)
    if root is None:
        raise DataNotFoundError(f"{directory} has no CIFAR-10 batches (data_batch_1..5, test_batch)")
    names = cifar.TRAIN_BATCHES if split == "train" else cifar.TEST_BATCHES
    present = [root / n for n in names if (root / n).is_file()]
    if not present:
        raise DataNotFoundError(f"{root} has none of {', '.join(names)}")
    parts = [cifar.read_batch(p) for p in present]
    classes = list(cifar.CIFAR10_CLASSES)
    meta = root / "batches.meta"
    if meta.is_file():
        try:
            with open(meta, "rb") as f:
                d = cifar._RestrictedUnpickler(f, encoding="bytes").load()
            names_ = d.get(b"label_names") or d.get("label_names")
            if names_ and len(names_) == 10:
                classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names_]
        except Exception:  # noqa: BLE001 - the class names are a nicety; the standard ones are right
            pass
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), classes, str(root)


def _read_image_folder(split: str, directory: Path, *, image_size: int = 32, channels: int = 3,
                       test_fraction: float = 0.2, seed: int = 0, **_):
    if (directory / "train").is_dir() and (directory / "test").is_dir():
        train_classes = [d.name for d in imagefolder.class_dirs(directory / "train")]
        x, y, classes = imagefolder.read_folder(directory / split, image_size, channels, classes=train_classes)
        return x, y, classes, str(directory / split)
    x, y, classes = imagefolder.read_folder(directory, image_size, channels)
    train_idx, test_idx = imagefolder.stratified_split(y, test_fraction, seed)
    idx = train_idx if split == "train" else test_idx
    return x[idx], y[idx], classes, str(directory)


def _sklearn_split(x: np.ndarray, y: np.ndarray, split: str):
    from sklearn.model_selection import train_test_split

    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return (xtr, ytr) if split == "train" else (xte, yte)


def _read_digits(split: str, directory: Path | None = None, **_):
    from sklearn.datasets import load_digits

    d = load_digits()
    # 0..16 intensities -> 0..255 uint8 images, so digits behave like any other image set.
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    x, y = _sklearn_split(images, d.target.astype(np.int64), split)
    return x, y, [str(i) for i in range(10)], "sklearn.datasets.load_digits"


def _read_iris(split: str, directory: Path | None = None, **_):
    from sklearn.datasets import load_iris

    d = load_iris()
    x, y = _sklearn_split(d.data.astype(np.float32), d.target.astype(np.int64), split)
    return x, y, list(d.target_names), "sklearn.datasets.load_iris"


#: Every named dataset, by name, in the order ``bnlab data list`` shows them (filled by :func:`register`).
SOURCES: dict[str, Source] = {}


def register(source: Source) -> Source:
    SOURCES[source.name] = source
    return source


register(Source(
    "fashion-mnist", "Zalando Fashion-MNIST, 28x28 grayscale, 10 classes, 60k/10k (IDX)",
    _read_idx_split("fashion-mnist", FASHION_MNIST_CLASSES),
    missing_hint="install the Debian package with 'apt-get install dataset-fashion-mnist', "
                 "or run 'bnlab data fetch fashion-mnist' where a network exists",
    marker=_has_idx,
))
register(Source(
    "mnist", "MNIST handwritten digits, 28x28 grayscale, 10 classes, 60k/10k (IDX)",
    _read_idx_split("mnist", MNIST_CLASSES),
    missing_hint="pass --data-dir with the four MNIST IDX files (gz or not), "
                 "or run 'bnlab data fetch mnist' where a network exists",
    marker=_has_idx,
))
register(Source(
    "cifar10", "CIFAR-10, 32x32 RGB, 10 classes, 50k/10k (python pickle batches)",
    _read_cifar,
    missing_hint="pass --data-dir with the python-version batches (data_batch_1..5, test_batch) "
                 "from cifar-10-python.tar.gz",
    marker=_has_cifar,
))
register(Source(
    "image-folder", "your images: one sub-folder per class, resized to a square (Pillow)",
    _read_image_folder,
    missing_hint="pass --data-dir pointing at a folder with one sub-folder per class",
))
register(Source("digits", "scikit-learn 8x8 digits, 1,797 images, fixed 75/25 split", _read_digits, needs_files=False))
register(Source("iris", "scikit-learn iris, 4 features, 3 classes, fixed 75/25 split", _read_iris, needs_files=False))


def get_source(name: str) -> Source:
    """The registered :class:`Source` called ``name`` (see ``SOURCES`` for all of them).

    Raises:
        ConfigError: an unknown name; the message lists the known ones.

    Example::

        get_source("digits").description   # 'scikit-learn 8x8 digits, 1,797 images, fixed 75/25 split'
    """
    if name not in SOURCES:
        raise ConfigError(f"unknown dataset {name!r}{suggest(name, SOURCES)}: choose one of {', '.join(SOURCES)}")
    return SOURCES[name]


def load(name: str, split: str = "train", data_dir: str | Path | None = None, *,
         standardize: str | Standardizer = "none", **options) -> Dataset:
    """Load one split of dataset ``name`` into memory.

    To get both splits with one standardizer, use :func:`load_splits`.

    Args:
        name: a name from ``SOURCES``: ``fashion-mnist``, ``mnist``, ``cifar10``, ``image-folder``,
            ``digits``, ``iris``.
        split: ``train`` or ``test``.
        data_dir: a directory searched first (see :func:`search_dirs`); ``image-folder`` needs it.
        standardize: a mode (``none``, ``scale``, ``zscore``), fitted on the *train* split even
            when ``split='test'`` (which then reads the train split too), or a ready
            :class:`Standardizer` (e.g. from a checkpoint). Default ``none``, unlike
            :func:`load_splits`.
        **options: for ``image-folder``: ``image_size`` (default 32), ``channels`` (1 or 3,
            default 3), ``test_fraction`` (default 0.2) and ``seed`` (default 0) of the split
            when the folder has no ``train``/``test`` sub-folders.

    Returns:
        A :class:`Dataset`.

    Raises:
        DataNotFoundError: the files are not where bnlab looks; the message says how to get them.
        DataFormatError: a file is corrupt or not what its name says.
        ConfigError: an unknown name, split or standardization mode.

    Example::

        test = load("fashion-mnist", "test", standardize="zscore")
        test   # Dataset('fashion-mnist', test, 10000 examples of (1, 28, 28) uint8, 10 classes, standardize=zscore)
    """
    src = get_source(name)
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: choose train or test")
    if src.needs_files:
        if src.marker is None:
            if data_dir is None:
                raise DataNotFoundError(f"{name} needs --data-dir: {src.missing_hint}")
            directory = Path(data_dir).expanduser()
            if not directory.is_dir():
                raise DataNotFoundError(f"--data-dir {data_dir} does not exist: {src.missing_hint}")
        else:
            directory = find(name, data_dir)
    else:
        directory = None
    x, y, classes, where = src.reader(split, directory, **options)
    xt = torch.from_numpy(np.ascontiguousarray(x))
    ds = Dataset(name, split, xt, torch.from_numpy(np.ascontiguousarray(y)), list(classes), where)
    if isinstance(standardize, Standardizer):
        return ds.standardized(standardize)
    if standardize == "none":
        return ds.standardized(Standardizer.fit(ds, "none"))
    train = ds if split == "train" else load(name, "train", data_dir, **options)
    return ds.standardized(Standardizer.fit(train, standardize))


def load_splits(name: str, data_dir: str | Path | None = None, *, standardize: str = "zscore",
                **options) -> tuple[Dataset, Dataset]:
    """Train and test splits sharing one standardizer fitted on the train split.

    Args:
        name, data_dir, **options: as for :func:`load`.
        standardize: ``none``, ``scale`` or ``zscore`` (the default): statistics of the train
            split, applied to both.

    Returns:
        ``(train, test)``, two :class:`Dataset` objects.

    Example::

        train, test = load_splits("fashion-mnist")
        train.standardizer   # Standardizer(mode='zscore', mean=(72.94...,), std=(90.02...,)), pixel units
        test.standardizer is train.standardizer   # True
    """
    train = load(name, "train", data_dir, **options)
    std = Standardizer.fit(train, standardize)
    test = load(name, "test", data_dir, standardize=std, **options)
    return train.standardized(std), test
