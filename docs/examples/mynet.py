"""An example of your own network for bnlab: `bnlab train --model docs/examples/mynet.py:make --bn tutorial`.

A factory takes (input_shape, num_classes, **options) and returns an nn.Module.
"""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


class Net(nn.Module):
    """conv -> BN -> ReLU stem, one residual block, global average pool, linear head."""

    def __init__(self, in_ch=1, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.block = Block(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = self.block(self.relu(self.bn(self.stem(x))))
        return self.head(torch.flatten(self.pool(x), 1))


def make(input_shape, num_classes):
    return Net(input_shape[0], num_classes)
