"""In-memory datasets, standardization and batching by index slicing.

A :class:`Dataset` keeps its examples as one tensor (uint8 for images, ``(N, C, H, W)``; float32
for feature tables, ``(N, F)``) and converts to float only one batch at a time, so a whole
Fashion-MNIST split costs 47 MB instead of 188 MB. Batches are cut from a seeded permutation by
slicing: no per-sample ``DataLoader`` on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator

import numpy as np
import torch

from bnlab.errors import ConfigError

#: The standardization modes of :class:`Standardizer` (``--standardize``).
STANDARDIZE_MODES = ("none", "scale", "zscore")


@dataclass(frozen=True)
class Standardizer:
    """Per-channel affine map ``z = (x - mean) / std`` applied to each batch.

    The numbers travel with checkpoints so that inference standardizes exactly like training.
    Build one with :meth:`fit` (from a train split) or :meth:`from_dict` (from a checkpoint)
    rather than by hand.

    Args:
        mode: ``none`` (identity), ``scale`` (divide by the value range, 255 for uint8 images:
            maps pixels to 0..1) or ``zscore`` (mean and std of the *train* split, per channel).
        mean: one value per channel, in the units of the raw data (0..255 for uint8 images).
        std: one positive value per channel, in the same units.

    Raises:
        ConfigError: an unknown mode, ``mean`` and ``std`` of different lengths, or a std <= 0.

    Example::

        train = bnlab.data.load("digits", "train")
        s = Standardizer.fit(train, "zscore")    # Standardizer(mode='zscore', mean=(77.8...,), std=(95.8...,))
        z = s(train.x[:32])                      # float32 (32, 1, 8, 8), mean ~0 and std ~1 per channel
    """

    mode: str = "none"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self):
        if self.mode not in STANDARDIZE_MODES:
            raise ConfigError(f"unknown standardization {self.mode!r}: choose one of {', '.join(STANDARDIZE_MODES)}")
        if len(self.mean) != len(self.std):
            raise ConfigError(f"standardizer has {len(self.mean)} means but {len(self.std)} stds")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"standardizer std must be positive, got {self.std}")

    @classmethod
    def fit(cls, train: "Dataset", mode: str) -> "Standardizer":
        """Compute the map from a *train* split (never from test data).

        Args:
            train: the :class:`Dataset` whose raw ``x`` gives the statistics.
            mode: ``none``, ``scale`` or ``zscore`` (see the class docstring).

        Returns:
            A :class:`Standardizer` with one mean and std per channel of ``train.x``.
        """
        if mode not in STANDARDIZE_MODES:
            raise ConfigError(f"unknown standardization {mode!r}: choose one of {', '.join(STANDARDIZE_MODES)}")
        channels = train.x.shape[1]
        if mode == "none":
            return cls("none", (0.0,) * channels, (1.0,) * channels)
        if mode == "scale":
            if train.x.dtype == torch.uint8:
                top = [255.0] * channels
            else:
                top = train.x.abs().amax(dim=[d for d in range(train.x.dim()) if d != 1]).tolist()
            return cls("scale", (0.0,) * channels, tuple(t if t > 0 else 1.0 for t in top))
        mean, std = channel_stats(train.x)
        return cls("zscore", tuple(mean), tuple(s if s > 0 else 1.0 for s in std))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 standardized copy of a batch ``x`` (uint8 or float)."""
        out = x.to(torch.float32, copy=True)
        if self.mode == "none":
            return out
        mean, inv = self._mean_inv
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return out.sub_(mean.view(shape)).mul_(inv.view(shape))

    @cached_property
    def _mean_inv(self) -> tuple[torch.Tensor, torch.Tensor]:
        # built once, not for every batch
        return (torch.tensor(self.mean, dtype=torch.float32),
                torch.tensor([1.0 / s for s in self.std], dtype=torch.float32))

    def to_dict(self) -> dict:
        """``{"mode", "mean", "std"}`` as plain lists: what a checkpoint stores."""
        return {"mode": self.mode, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Standardizer":
        """The inverse of :meth:`to_dict`."""
        return cls(d["mode"], tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and (population) std of ``x`` along dim 1, in float64.

    uint8 data uses a 256-bin histogram per channel, which is exact and needs no float copy of
    the whole split.

    Args:
        x: ``(N, C, ...)`` tensor, uint8 or float; channels along dim 1.

    Returns:
        ``(means, stds)``: two lists of ``C`` floats, in the units of ``x`` (0..255 for uint8).

    Example::

        channel_stats(torch.arange(8, dtype=torch.uint8).view(4, 2))   # ([3.0, 4.0], [2.236..., 2.236...])
    """
    means, stds = [], []
    for c in range(x.shape[1]):
        xc = x[:, c]
        if xc.dtype == torch.uint8:
            flat = xc.reshape(-1).numpy()
            counts = np.zeros(256, dtype=np.float64)
            # bincount widens its input to int64: chunks keep that temporary at 8 MB, not 8x the split
            for start in range(0, len(flat), 1 << 20):
                counts += np.bincount(flat[start:start + (1 << 20)], minlength=256)
            values = np.arange(256, dtype=np.float64)
            n = counts.sum()
            m = (counts * values).sum() / n
            v = (counts * (values - m) ** 2).sum() / n
        else:
            xd = xc.to(torch.float64)
            m, v = xd.mean().item(), xd.var(unbiased=False).item()
        means.append(float(m))
        stds.append(float(np.sqrt(v)))
    return means, stds


def index_batches(
    n: int,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[torch.Tensor | slice]:
    """Yield the indices of each batch: slices when not shuffling, index tensors when shuffling.

    Args:
        n: the number of examples.
        batch_size: examples per batch, at least 1.
        shuffle: draw the order from a random permutation of ``range(n)``.
        generator: the random source of the permutation; the same seed gives the same order.
        drop_last: leave out the last batch when it is smaller than ``batch_size``.

    Raises:
        ConfigError: ``batch_size`` below 1.

    Example::

        list(index_batches(5, 2))      # [slice(0, 2), slice(2, 4), slice(4, 5)]
        list(index_batches(5, 2, shuffle=True, generator=torch.Generator().manual_seed(0)))
        # [tensor([4, 0]), tensor([1, 3]), tensor([2])]
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else None
    stop = (n // batch_size) * batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, stop)
        yield order[start:end] if order is not None else slice(start, end)


def class_index_batches(labels: torch.Tensor, batch_size: int, classes: int, *,
                        generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Non-i.i.d. batches: each batch holds ``batch_size / classes`` examples of each of at most
    ``classes`` classes (Ioffe 2017's non-i.i.d. minibatches).

    Each class's examples are shuffled and cut into pieces of ``batch_size // classes``; the
    pieces of all classes are shuffled together and every run of ``classes`` pieces is a batch
    (two pieces of one class can meet, so "at most"). A class's last piece may be smaller; a
    piece of one example is left out (a batch of one cannot be batch-normalized), so an epoch
    skips at most one example per class. The number of batches depends only on the class counts.

    Args:
        labels: the int64 class of each example.
        batch_size: examples per batch, a multiple of ``classes``.
        classes: classes per batch, at least 1.
        generator: the random source; the same seed gives the same batches.

    Raises:
        ConfigError: ``classes`` below 1 or not dividing ``batch_size``.

    Example::

        batches = class_index_batches(train.y, 32, 2, generator=torch.Generator().manual_seed(0))
        train.y[batches[0]].unique()     # two classes, 16 examples each
    """
    if classes < 1 or batch_size % classes:
        raise ConfigError(f"batches of {batch_size} from {classes} classes: the classes per batch must be at least 1 "
                          "and divide the batch size")
    per = batch_size // classes
    pieces = []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        pieces += [p for p in idx.split(per) if len(p) > 1 or per == 1]
    order = torch.randperm(len(pieces), generator=generator).tolist()
    batches = [torch.cat([pieces[i] for i in order[start:start + classes]]) for start in range(0, len(order), classes)]
    if len(batches) > 1 and len(batches[-1]) == 1:  # only with one example per class and piece
        batches.pop()
    return batches


@dataclass(repr=False)
class Dataset:
    """One split of a dataset, held in memory.

    The examples stay in their raw form; :meth:`batches` converts and standardizes one batch at
    a time. Get one from :func:`bnlab.data.load` or :func:`bnlab.data.load_splits`.

    Args:
        name: the dataset's name, e.g. ``fashion-mnist``.
        split: ``train`` or ``test``.
        x: uint8 ``(N, C, H, W)`` for images, float32 ``(N, F)`` for feature tables.
        y: int64 labels ``(N,)``, in ``0 .. len(classes) - 1``.
        classes: the class names, indexed by label.
        source: where the data was read from (a directory, or e.g. ``sklearn.datasets.load_digits``).
        standardizer: maps raw batches to network inputs (default: identity).

    Example::

        train, test = bnlab.data.load_splits("digits")
        train          # Dataset('digits', train, 1347 examples of (1, 8, 8) uint8, 10 classes, standardize=zscore)
        for x, y in train.batches(32, shuffle=True, generator=torch.Generator().manual_seed(0)):
            ...        # x: float32 (32, 1, 8, 8) standardized, y: int64 (32,)
    """

    name: str
    split: str
    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    source: str = ""
    standardizer: Standardizer = field(default_factory=Standardizer)

    def __post_init__(self):
        if len(self.x) != len(self.y):
            raise ValueError(f"{self.name}/{self.split}: {len(self.x)} examples but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.x)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, {self.split}, {len(self)} examples of {tuple(self.input_shape)} "
                f"{str(self.x.dtype).replace('torch.', '')}, {self.num_classes} classes, "
                f"standardize={self.standardizer.mode})")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(1, 28, 28)`` or ``(4,)``."""
        return tuple(self.x.shape[1:])

    @property
    def num_classes(self) -> int:
        """The number of classes (``len(classes)``), whether or not each occurs in this split."""
        return len(self.classes)

    @property
    def is_image(self) -> bool:
        """True for image data ``(N, C, H, W)``, false for feature tables ``(N, F)``."""
        return self.x.dim() == 4

    def standardized(self, mode_or_standardizer: "str | Standardizer") -> "Dataset":
        """The same data (shared, not copied) with another standardizer.

        Args:
            mode_or_standardizer: a :class:`Standardizer` (e.g. the train split's, for a test
                split), or a mode name, fitted on *this* split: only do that on a train split.
        """
        s = mode_or_standardizer
        if isinstance(s, str):
            s = Standardizer.fit(self, s)
        return Dataset(self.name, self.split, self.x, self.y, self.classes, self.source, s)

    def subset(self, n: int) -> "Dataset":
        """The first ``n`` examples (a view, not a copy), with the same standardizer.

        The standardizer is kept, not refitted: a subset of a train split is still standardized
        with the statistics of the whole split. Handy for quick runs and tests.
        """
        return Dataset(self.name, self.split, self.x[:n], self.y[:n], self.classes, self.source, self.standardizer)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        classes: int | None = None,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(inputs, labels)``: float32 standardized inputs, int64 labels.

        Args:
            batch_size: examples per batch; the last batch may be smaller unless ``drop_last``.
            shuffle: a new random order; pass ``generator`` to make it reproducible.
            generator: the random source of the order (see :func:`index_batches`).
            drop_last: leave out the last batch when it is smaller than ``batch_size``.
            classes: non-i.i.d. batches, each from at most this many classes (always shuffled;
                see :func:`class_index_batches`; ``drop_last`` does not apply).
            shard: ``(rank, world)``: data-parallel training; each batch of ``batch_size`` is cut
                into ``world`` contiguous, near-equal parts and this yields part ``rank`` (every
                rank draws the same order from the same seed, so the parts are disjoint).

        Example::

            for x, y in train.batches(1000, shuffle=True, generator=torch.Generator().manual_seed(0)):
                loss = F.cross_entropy(net(x), y)
        """
        if classes is not None:
            self._check_classes(classes)
            order = class_index_batches(self.y, batch_size, classes, generator=generator)
        else:
            order = index_batches(len(self), batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last)
        for idx in order:
            if shard is not None:
                if isinstance(idx, slice):
                    idx = torch.arange(idx.start, idx.stop)
                idx = idx.tensor_split(shard[1])[shard[0]]
            yield self.standardizer(self.x[idx]), self.y[idx]

    def _check_classes(self, classes: int) -> None:
        present = len(self.y.unique())
        if classes > present:
            raise ConfigError(f"batches from {classes} classes: {self.name} has only {present} classes here "
                              f"(batch_classes must be at most {present})")

    def num_batches(self, batch_size: int, drop_last: bool = False, classes: int | None = None) -> int:
        """How many batches :meth:`batches` yields with these arguments."""
        if classes is not None:
            self._check_classes(classes)
            return len(class_index_batches(self.y, batch_size, classes, generator=torch.Generator().manual_seed(0)))
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)

    def class_counts(self) -> list[int]:
        """The number of examples of each class, indexed by label."""
        return torch.bincount(self.y, minlength=self.num_classes).tolist()
