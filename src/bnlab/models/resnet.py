"""He et al. (2016), "Deep Residual Learning for Image Recognition", Sec. 4.2: the CIFAR-10 ResNets.

A ``depth = 6n + 2`` network: a 3x3 conv stem with 16 channels, three stages of ``n`` basic
blocks (two 3x3 convs each) with 16, 32 and 64 channels (the first block of stages 2 and 3
halves the spatial size with stride 2), global average pooling and one linear layer. Where a
block changes the shape, its shortcut is a 1x1 conv (with the block's stride) plus BN, the
paper's "option B"; elsewhere it is the identity. ResNet-20 (n = 3) has 0.27 M parameters.

BN placement follows :mod:`bnlab.models.spec`, where ``before``/``after`` mean relative to the
activation that follows a conv:

- ``before`` (also ``tutorial``: the paper's own): conv -> BN -> ReLU. In a block the second conv's
  BN comes before the addition, since the ReLU follows the addition: ``relu(bn2(conv2(.)) + shortcut)``.
- ``after``: conv -> ReLU -> BN. A block ends ``bn2(relu(conv2(.) + shortcut))``.
- ``none``: no BN (identity layers in its place); every conv gets a bias.

A conv has no bias when a BN follows it directly (BN's shift would cancel it). The projection
shortcut keeps its BN with every placement but ``none``. Convs are initialized as in the paper
(Kaiming normal, fan-out, for ReLU); BN starts at gamma = 1, beta = 0; the linear head keeps
PyTorch's default initialization.

Works on any image shape whose side survives two halvings (1x28x28 MNIST, 3x32x32 CIFAR, ...).
"""

from __future__ import annotations

from torch import nn

from bnlab.errors import ConfigError
from bnlab.models.spec import ACTIVATIONS, check_build_options
from bnlab.nn.norms import norm_layer

STAGE_CHANNELS = (16, 32, 64)


class _Layers:
    """Makes the convs, norms and activations of one network, all with the same BN settings."""

    def __init__(self, bn: str, norm: str, bn_impl: str, activation: str, virtual_batch_size: int, norm_groups: int):
        self.bn, self.norm, self.bn_impl = bn, norm, bn_impl
        self.activation, self.virtual_batch_size, self.norm_groups = activation, virtual_batch_size, norm_groups

    def conv(self, cin: int, cout: int, kernel: int, stride: int = 1, *, shortcut: bool = False) -> nn.Conv2d:
        # no bias where a BN follows directly: its shift would cancel the bias
        bn_follows = (self.bn == "before" or (shortcut and self.bn != "none")) and self.norm != "none"
        return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=not bn_follows)

    def norm_layer(self, channels: int) -> nn.Module:
        if self.bn == "none":
            return nn.Identity()
        return norm_layer(self.norm, channels, dims=2, impl=self.bn_impl, groups=self.norm_groups,
                          virtual_batch_size=self.virtual_batch_size)

    def act(self) -> nn.Module:
        return ACTIVATIONS[self.activation]()


class BasicBlock(nn.Module):
    """Two 3x3 convs and a shortcut, ``act(F(x) + shortcut(x))``, with BN placed as the network asks."""

    def __init__(self, cin: int, cout: int, stride: int, layers: _Layers):
        super().__init__()
        self.bn_after = layers.bn == "after"
        self.conv1 = layers.conv(cin, cout, 3, stride)
        self.bn1 = layers.norm_layer(cout)
        self.act1 = layers.act()
        self.conv2 = layers.conv(cout, cout, 3)
        self.bn2 = layers.norm_layer(cout)
        self.act2 = layers.act()
        if stride != 1 or cin != cout:  # option B: project with a strided 1x1 conv (+ BN)
            self.shortcut = nn.Sequential(layers.conv(cin, cout, 1, stride, shortcut=True), layers.norm_layer(cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        if self.bn_after:
            out = self.bn1(self.act1(self.conv1(x)))
            return self.bn2(self.act2(self.conv2(out) + self.shortcut(x)))
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """The CIFAR ResNet of He et al. (2016) with ``depth = 6n + 2`` layers (20, 32, 44, 56, 110, ...).

    Args:
        input_shape: one example's shape ``(C, H, W)``.
        num_classes: the number of logits.
        depth: ``6n + 2`` with ``n >= 1``.
        bn: ``before`` (= ``tutorial``, the paper's), ``after`` or ``none``; see the module docstring.
        norm, bn_impl, virtual_batch_size, norm_groups: the normalizer, as in
            :func:`bnlab.models.build` (``group``, ``layer``, ``instance`` too).
        activation: a name from :data:`bnlab.models.ACTIVATIONS` (default ``relu``).
    """

    def __init__(self, input_shape, num_classes: int, depth: int = 20, *, bn: str = "before", norm: str = "batch",
                 bn_impl: str = "bnlab", activation: str | None = "relu", virtual_batch_size: int = 32,
                 norm_groups: int = 32):
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3:
            raise ConfigError(f"ResNet needs image input (C, H, W), got input shape {tuple(input_shape)}")
        if min(shape[1:]) < 4:
            raise ConfigError(f"ResNet halves the image twice: input shape {shape} is too small (at least 4x4)")
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"ResNet depth must be 6n + 2 (8, 14, 20, 32, 44, 56, 110, ...), got {depth!r}")
        activation = activation or "relu"
        check_build_options(bn=bn, norm=norm, bn_impl=bn_impl, activation=activation)
        if num_classes < 2:
            raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
        layers = _Layers("before" if bn == "tutorial" else bn, norm, bn_impl, activation, virtual_batch_size,
                         norm_groups)
        n = (depth - 2) // 6
        self.depth = depth

        self.bn_after = layers.bn == "after"
        self.conv1 = layers.conv(shape[0], STAGE_CHANNELS[0], 3)
        self.bn1 = layers.norm_layer(STAGE_CHANNELS[0])
        self.act1 = layers.act()
        cin = STAGE_CHANNELS[0]
        for i, cout in enumerate(STAGE_CHANNELS):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if i > 0 and j == 0 else 1, layers))
                cin = cout
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m.weight.is_meta:  # shapes only: see bnlab.models.spec._init_weights
                    continue
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(self.act1(x)) if self.bn_after else self.act1(self.bn1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


def resnet20(input_shape, num_classes: int, *, bn: str = "before", norm: str = "batch", bn_impl: str = "bnlab",
             activation: str | None = "relu", virtual_batch_size: int = 32, norm_groups: int = 32,
             **_) -> ResNetCIFAR:
    """ResNet-20 for CIFAR-sized images (0.27 M parameters); arguments as :class:`ResNetCIFAR`.

    Extra keyword arguments of :func:`bnlab.models.build` that do not apply (``dropout``, ...)
    are accepted and ignored.
    """
    return ResNetCIFAR(input_shape, num_classes, 20, bn=bn, norm=norm, bn_impl=bn_impl, activation=activation,
                       virtual_batch_size=virtual_batch_size, norm_groups=norm_groups)
