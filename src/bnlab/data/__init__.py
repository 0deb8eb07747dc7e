"""Data: file formats, named sources, standardization and in-memory batching.

>>> from bnlab import data
>>> train, test = data.load_splits("fashion-mnist", standardize="zscore")
>>> for x, y in train.batches(1000, shuffle=True): ...
"""

import torch

from bnlab.data.dataset import STANDARDIZE_MODES, Dataset, Standardizer, channel_stats, index_batches
from bnlab.data.idx import read_idx, write_idx
from bnlab.data.sources import SOURCES, find, get_source, load, load_splits, search_dirs

__all__ = [
    "Dataset", "Standardizer", "STANDARDIZE_MODES", "channel_stats", "index_batches",
    "read_idx", "write_idx", "SOURCES", "find", "get_source", "load", "load_splits", "search_dirs",
    "info",
]


def info(name: str, data_dir=None, **options) -> dict:
    """Counts, shapes, classes, train-split mean/std and location of a dataset, as a dict.

    Reads both splits (what ``bnlab data info`` prints).

    Args:
        name, data_dir, **options: as for :func:`bnlab.data.load`.

    Returns:
        ``{"name", "description", "location", "train", "test", "input_shape", "dtype", "classes",
        "train_class_counts", "mean", "std"}``; ``train``/``test`` are example counts, and
        ``mean``/``std`` are per channel, in 0..1 units for uint8 images (pixel / 255).

    Example::

        info("fashion-mnist")["mean"], info("fashion-mnist")["std"]   # ([0.2860...], [0.3530...])
    """
    train = load(name, "train", data_dir, **options)
    test = load(name, "test", data_dir, **options)
    mean, std = channel_stats(train.x)
    scale = 255.0 if train.x.dtype == torch.uint8 else 1.0
    return {
        "name": name,
        "description": get_source(name).description,
        "location": train.source,
        "train": len(train),
        "test": len(test),
        "input_shape": list(train.input_shape),
        "dtype": str(train.x.dtype).replace("torch.", ""),
        "classes": train.classes,
        "train_class_counts": train.class_counts(),
        # Statistics of the train split, in 0..1 units for images (pixel / 255).
        "mean": [m / scale for m in mean],
        "std": [s / scale for s in std],
    }
