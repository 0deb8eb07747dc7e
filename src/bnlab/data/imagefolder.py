"""Image files: one loader for image folders and for ``bnlab predict``.

An image folder has one sub-folder per class (``root/cat/001.jpg``, ``root/dog/002.png``, ...).
Images are converted to grayscale or RGB and resized with Pillow by :func:`load_image`.
Unreadable files, decompression bombs included, are skipped and counted in a single warning,
never a crash. If ``root`` has ``train/`` and ``test/`` sub-folders they are the splits;
otherwise a seeded, stratified split holds out ``test_fraction`` of each class.
"""

from __future__ import annotations

import glob
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnlab.errors import ConfigError, DataFormatError, DataNotFoundError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# Pillow's resize first shrinks by an integer factor (cheap box filter) while the image stays at
# least this many times the target size; 3 is indistinguishable from a full resample.
REDUCING_GAP = 3.0


@dataclass
class LoadedImage:
    """An image file as network-ready pixels, and what was done to get there.

    ``pixels`` is uint8 ``(channels, height, width)``. Sizes are ``(width, height)`` as Pillow
    reports them. ``background`` is the median of the border pixels of the resized image, per
    channel (0..255): the padding value, and what ``bnlab predict`` compares with the training
    data to decide on inversion.
    """

    pixels: np.ndarray
    original_size: tuple[int, int]
    mode: str
    converted_to: str | None
    resized_to: tuple[int, int] | None
    padded_to: tuple[int, int] | None
    background: tuple[float, ...]

    def steps(self) -> dict:
        """JSON-friendly record of the preprocessing."""
        return {"original_size": list(self.original_size), "mode": self.mode, "converted_to": self.converted_to,
                "resized_to": list(self.resized_to) if self.resized_to else None,
                "padded_to": list(self.padded_to) if self.padded_to else None}


def load_image(path: str | Path, size: int | tuple[int, int], channels: int, *,
               keep_aspect: bool = False) -> LoadedImage:
    """One image file at ``size`` (an int for a square, or ``(height, width)``) with 1 or 3 channels.

    ``keep_aspect=False`` stretches the image to ``size``; ``keep_aspect=True`` scales it to fit and
    pads the rest with the image's background (the median of its border). Large images are shrunk
    while decoding: JPEGs are decoded at 1/2, 1/4 or 1/8 scale (``Image.draft``), other formats are
    reduced by an integer factor before resampling. Raises :class:`DataFormatError` naming the
    file if it is not an image Pillow can read or declares more pixels than
    ``PIL.Image.MAX_IMAGE_PIXELS`` (a decompression bomb).
    """
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else size
    path = Path(path)
    target = "L" if channels == 1 else "RGB"
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; both are refused here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                original_size, mode = im.size, im.mode
                fit = _fit(original_size, (w, h)) if keep_aspect else (w, h)
                im.draft(target, fit)
                if im.mode not in ("L", "LA", "RGB", "RGBA"):
                    im = im.convert(target)  # palette, 1-bit, 16-bit, CMYK: resample in the target mode
                if im.size != fit:
                    im = im.resize(fit, Image.BILINEAR, reducing_gap=REDUCING_GAP)
                if im.mode != target:
                    im = im.convert(target)
                arr = np.asarray(im, dtype=np.uint8)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise DataFormatError(f"{path} cannot be read: {e.strerror}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataFormatError(f"{path} is too large to decode safely: {str(e).rstrip('.')}; shrink it, or raise "
                              "PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error):
        raise DataFormatError(f"{path} is not an image Pillow can read (PNG, JPEG, BMP, ...)") from None
    arr = arr[..., None] if arr.ndim == 2 else arr
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    background = tuple(float(v) for v in np.median(border, axis=0))
    padded = fit != (w, h)
    if padded:
        canvas = np.empty((h, w, arr.shape[2]), dtype=np.uint8)
        canvas[:] = np.round(background).astype(np.uint8)
        top, left = (h - fit[1]) // 2, (w - fit[0]) // 2
        canvas[top:top + fit[1], left:left + fit[0]] = arr
        arr = canvas
    return LoadedImage(
        pixels=np.array(arr.transpose(2, 0, 1), order="C"), original_size=original_size, mode=mode,
        converted_to=target if mode != target else None, resized_to=fit if fit != original_size else None,
        padded_to=(w, h) if padded else None, background=background,
    )


def _fit(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """``size`` scaled to fit ``box`` (both ``(width, height)``), keeping its aspect ratio."""
    scale = min(box[0] / size[0], box[1] / size[1])
    return (min(box[0], max(1, round(size[0] * scale))), min(box[1], max(1, round(size[1] * scale))))


def image_paths(arg: str | Path) -> list[Path]:
    """The files one command-line argument names: a file, a directory (its files with an image
    suffix, sorted, not recursive) or a glob pattern (``shots/*.png``, sorted matches).

    A directory or pattern that matches nothing is a :class:`DataNotFoundError`; a plain path is
    returned as is (a missing file is reported when it is loaded).
    """
    p = Path(arg)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataNotFoundError(f"directory {p} has no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files
    if not p.exists() and any(c in str(arg) for c in "*?["):
        files = sorted(Path(m) for m in glob.glob(str(arg)) if Path(m).is_file())
        if not files:
            raise DataNotFoundError(f"pattern {arg} matches no files")
        return files
    return [p]


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
                images.append(load_image(f, size, channels).pixels)
                labels.append(label)
            except DataFormatError:
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
