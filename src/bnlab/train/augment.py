"""Augmentation on whole batches of image tensors, seeded (like Keras' ImageDataGenerator)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    """Random horizontal flips (probability ``flip``) and shifts of up to ``shift`` pixels.

    Shifts pad with the batch's minimum (the standardized background) and crop back, so the
    image size never changes. Applied to standardized float batches ``(N, C, H, W)``; other
    batches (feature tables) pass through unchanged. Called as ``augment(x, generator)`` it
    returns the augmented batch (``x`` itself is not changed); the same generator state gives the
    same flips and shifts.

    Args:
        flip: the probability of flipping each image left-right (0: never).
        shift: the largest shift in pixels, drawn per image and axis from ``-shift..shift``
            (0: none).

    Example::

        fit(net, train, test, augment=Augment(flip=0.0, shift=2))   # no flips for digits
        x_aug = Augment()(x, torch.Generator().manual_seed(0))
    """

    flip: float = 0.5
    shift: int = 2

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.dim() != 4:
            return x
        n, _, h, w = x.shape
        if self.flip > 0:
            mask = torch.rand(n, generator=generator) < self.flip
            if mask.any():
                x = x.clone()
                x[mask] = x[mask].flip(-1)
        if self.shift > 0:
            s = self.shift
            padded = F.pad(x, (s, s, s, s), value=float(x.min()))
            dx = torch.randint(0, 2 * s + 1, (n,), generator=generator)
            dy = torch.randint(0, 2 * s + 1, (n,), generator=generator)
            rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # (n, h)
            cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # (n, w)
            idx_n = torch.arange(n).view(n, 1, 1)
            x = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2).contiguous()
        return x
