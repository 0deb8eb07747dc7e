"""Figures written as PNG files (matplotlib, Agg backend: no screen needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def sample_grid(dataset, path: str | Path, n: int = 36, seed: int = 0, cols: int | None = None) -> Path:
    """Save a grid of ``n`` random images of ``dataset`` with their class names as titles."""
    if not dataset.is_image:
        from bnlab.errors import ConfigError

        raise ConfigError(f"{dataset.name} holds feature vectors, not images: there is no image grid to show")
    n = min(n, len(dataset))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:n]
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.45), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, idx.tolist()):
        img = dataset.x[i]
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(dataset.classes[int(dataset.y[i])], fontsize=7)
    fig.suptitle(f"{dataset.name} ({dataset.split}, {n} of {len(dataset)})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
