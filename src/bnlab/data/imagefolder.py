"""Image folders: one sub-folder per class (``root/cat/001.jpg``, ``root/dog/002.png``, ...).

Images are converted to grayscale or RGB and resized to a fixed square size with Pillow.
Unreadable files are skipped and counted in a single warning, never a crash. If ``root`` has
``train/`` and ``test/`` sub-folders they are the splits; otherwise a seeded, stratified split
holds out ``test_fraction`` of each class.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from bnlab.errors import ConfigError, DataNotFoundError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def load_image(path: str | Path, size: int, channels: int) -> np.ndarray:
    """One image file as uint8 ``(channels, size, size)``; raises ``OSError``/``ValueError`` if unreadable."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        im = im.resize((size, size), Image.BILINEAR)
        arr = np.array(im, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1).copy()


def class_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataNotFoundError(f"image folder {root} does not exist: pass --data-dir pointing at a folder with one sub-folder per class")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataNotFoundError(f"image folder {root} has no class sub-folders: put each class's images in root/<class>/")
    return dirs


def read_folder(root: Path, size: int, channels: int, classes: list[str] | None = None):
    """Images, labels and class names of every readable image below ``root/<class>/``."""
    if channels not in (1, 3):
        raise ConfigError(f"image channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if size < 1:
        raise ConfigError(f"image size must be positive, got {size}")
    dirs = class_dirs(root)
    names = classes if classes is not None else [d.name for d in dirs]
    images, labels, bad = [], [], []
    for d in dirs:
        if d.name not in names:
            raise DataNotFoundError(f"{d} is a class the train split does not have (train classes: {', '.join(names)})")
        label = names.index(d.name)
        for f in sorted(d.rglob("*")):
            if not f.is_file() or f.name.startswith("."):
                continue
            try:
                images.append(load_image(f, size, channels))
                labels.append(label)
            except (OSError, ValueError, SyntaxError):
                bad.append(f)
    if bad:
        examples = ", ".join(str(b) for b in bad[:3]) + (", ..." if len(bad) > 3 else "")
        warnings.warn(f"skipped {len(bad)} unreadable file(s) in {root}: {examples}", stacklevel=3)
    if not images:
        raise DataNotFoundError(f"no readable images in {root}")
    return np.stack(images), np.asarray(labels, dtype=np.int64), names


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices holding out ``test_fraction`` of each class (at least one if possible)."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test fraction must be between 0 and 1, got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * test_fraction))
        k = min(max(k, 1 if len(idx) > 1 else 0), len(idx) - 1) if len(idx) > 1 else 0
        test.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(test, dtype=np.int64))
