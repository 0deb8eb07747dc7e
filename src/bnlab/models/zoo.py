"""The reference networks of the five tutorials (see shared/BRIEF.md), as specs.

Each entry is data: the network without BN, its default activation, and (where the tutorial
has one) its own BN placement, used with ``bn="tutorial"``.
"""

from __future__ import annotations

import copy

from bnlab.errors import ConfigError, suggest


def _conv(out, kernel, **kw):
    return {"type": "conv", "out": out, "kernel": kernel, **kw}


def _dense(out, **kw):
    return {"type": "dense", "out": out, **kw}


POOL2 = {"type": "pool", "kind": "max", "size": 2, "stride": 2}
FLAT = {"type": "flatten"}
BN = {"type": "bn"}
RELU = {"type": "activation", "fn": "relu"}

ZOO: dict[str, dict] = {
    "deeplizard-cnn": {
        "name": "deeplizard-cnn",
        "description": "deeplizard's Fashion-MNIST CNN: conv5x5(6)-pool-conv5x5(12)-pool-fc120-fc60-fc10",
        "activation": "relu",
        "layers": [_conv(6, 5), POOL2, _conv(12, 5), POOL2, FLAT, _dense(120), _dense(60), _dense("classes")],
        # The tutorial's BN net: BatchNorm2d(6) after the first max-pool, BatchNorm1d(120) after
        # the first linear layer's ReLU.
        "tutorial_bn": [_conv(6, 5), RELU, POOL2, BN, _conv(12, 5), RELU, POOL2, FLAT,
                        _dense(120), RELU, BN, _dense(60), RELU, _dense("classes")],
        "datasets": ["fashion-mnist", "mnist", "cifar10", "image-folder"],
    },
    "s4tf-cnn": {
        "name": "s4tf-cnn",
        "description": "Swift for TensorFlow MNIST CNN: conv3x3(32)-conv3x3(64)-pool-conv3x3(64)-fc128-fc10",
        "activation": "relu",
        "layers": [_conv(32, 3), _conv(64, 3), POOL2, _conv(64, 3), FLAT, _dense(128), _dense("classes")],
        # One BN after every conv layer (S4TF's Conv2D applies its ReLU inside the layer).
        "tutorial_bn": [_conv(32, 3), RELU, BN, _conv(64, 3), RELU, BN, POOL2, _conv(64, 3), RELU, BN, FLAT,
                        _dense(128), RELU, _dense("classes")],
        "datasets": ["mnist", "fashion-mnist", "cifar10", "image-folder"],
    },
    "keras-mlp": {
        "name": "keras-mlp",
        "description": "the TensorFlow talk's Keras MLP: flatten-dense256-dense128-dense10",
        "activation": "relu",
        "layers": [FLAT, _dense(256), _dense(128), _dense("classes")],
        "datasets": ["mnist", "fashion-mnist", "digits", "iris", "cifar10", "image-folder"],
    },
    "ioffe-mlp": {
        "name": "ioffe-mlp",
        "description": "the BN paper's Fig. 1 MLP: 3 x 100 sigmoid units, small Gaussian init, BN before each sigmoid",
        "activation": "sigmoid",
        "init": {"kind": "normal", "std": 0.1},
        "layers": [FLAT, _dense(100), _dense(100), _dense(100), _dense("classes")],
        "tutorial_bn": [FLAT, _dense(100), BN, {"type": "activation", "fn": "sigmoid"},
                        _dense(100), BN, {"type": "activation", "fn": "sigmoid"},
                        _dense(100), BN, {"type": "activation", "fn": "sigmoid"}, _dense("classes")],
        "datasets": ["mnist", "fashion-mnist", "digits", "iris", "cifar10", "image-folder"],
    },
    "cifar-cnn": {
        "name": "cifar-cnn",
        "description": "the crash course's CIFAR-10 CNN: conv4x4(32)-pool-conv4x4(64)-pool-fc1024-dropout-fc10 ('same' padding)",
        "activation": "relu",
        # TF's padding='SAME' with a 4x4 kernel pads 1 before and 2 after; padding=2 and the
        # pooling floor give the same 8x8x64 = 4096 features for 32x32 inputs.
        "layers": [_conv(32, 4, padding=2), POOL2, _conv(64, 4, padding=2), POOL2, FLAT,
                   _dense(1024), {"type": "dropout", "p": 0.5}, _dense("classes")],
        "datasets": ["cifar10", "fashion-mnist", "mnist", "image-folder"],
    },
    "fast-cnn": {
        "name": "fast-cnn",
        "description": "bnlab's time-to-accuracy CNN: 3 x (conv3x3 pad 1, pool) 16-32-64, fc128, dropout 0.3, fc10",
        "activation": "relu",
        # Cheap on CPU: the expensive 28x28 stage has only 16 channels, channels grow as the
        # maps shrink, and each activation (with its BN, for bn=before/after) comes after the
        # pooling, on a quarter of the values (max-pooling commutes with a monotone activation).
        # With bn=before, Adam + one-cycle (peak 0.01), batch 128 it reaches 92% Fashion-MNIST
        # test accuracy in about a minute on 2 cores (benchmarks/time_to_accuracy.py).
        "layers": [_conv(16, 3, padding=1), POOL2, RELU, _conv(32, 3, padding=1), POOL2, RELU,
                   _conv(64, 3, padding=1), POOL2, RELU, FLAT, _dense(128), RELU, {"type": "dropout", "p": 0.3},
                   _dense("classes")],
        "datasets": ["fashion-mnist", "mnist", "cifar10", "image-folder"],
    },
    "allconv-cnn": {
        "name": "allconv-cnn",
        "description": "a small all-convolutional net: conv3x3 16, conv3x3/2 32, conv3x3/2 64, global average "
                       "pool, fc10; every normalizer place is a feature map (for group/layer/instance norm)",
        "activation": "relu",
        # The normalization experiments (bnlab reproduce groupnorm) need a network where every
        # BN place can also hold GroupNorm/LayerNorm/InstanceNorm: no dense layer but the logits,
        # as in the ResNets Wu & He use, and cheap enough for batches of 2 on a CPU.
        "layers": [_conv(16, 3, padding=1), RELU, _conv(32, 3, padding=1, stride=2), RELU,
                   _conv(64, 3, padding=1, stride=2), RELU, {"type": "pool", "kind": "avg", "size": 7}, FLAT,
                   _dense("classes")],
        "tutorial_bn": [_conv(16, 3, padding=1, bias=False), BN, RELU, _conv(32, 3, padding=1, stride=2, bias=False),
                        BN, RELU, _conv(64, 3, padding=1, stride=2, bias=False), BN, RELU,
                        {"type": "pool", "kind": "avg", "size": 7}, FLAT, _dense("classes")],
        "datasets": ["fashion-mnist", "mnist"],
    },
    "vgg-bn": {
        "name": "vgg-bn",
        "description": "a small VGG-style net: 3 x (conv3x3-conv3x3-pool) 32-64-128, fc256, fc10; BN after every conv",
        "activation": "relu",
        # Simonyan & Zisserman's pattern (pairs of 3x3 convs, channels doubling as maps halve) at
        # CIFAR/MNIST size; the tutorial placement is the usual conv -> BN -> ReLU of VGG-BN.
        "layers": [_conv(32, 3, padding=1), _conv(32, 3, padding=1), POOL2, _conv(64, 3, padding=1),
                   _conv(64, 3, padding=1), POOL2, _conv(128, 3, padding=1), _conv(128, 3, padding=1), POOL2,
                   FLAT, _dense(256), _dense("classes")],
        "tutorial_bn": [_conv(32, 3, padding=1, bias=False), BN, RELU, _conv(32, 3, padding=1, bias=False), BN, RELU,
                        POOL2, _conv(64, 3, padding=1, bias=False), BN, RELU, _conv(64, 3, padding=1, bias=False), BN,
                        RELU, POOL2, _conv(128, 3, padding=1, bias=False), BN, RELU,
                        _conv(128, 3, padding=1, bias=False), BN, RELU, POOL2, FLAT, _dense(256, bias=False), BN,
                        RELU, _dense("classes")],
        "datasets": ["cifar10", "fashion-mnist", "mnist", "image-folder"],
    },
    "resnet20": {
        "name": "resnet20",
        "description": "He et al. 2016's CIFAR ResNet-20: 3 stages x 3 basic blocks, 16/32/64 channels, 0.27 M parameters",
        "activation": "relu",
        # a Python network (bnlab.models.resnet); bn=tutorial is the paper's conv -> BN -> ReLU
        "python": "bnlab.models.resnet:resnet20",
        "tutorial_bn": True,
        "datasets": ["cifar10", "fashion-mnist", "mnist", "image-folder"],
    },
}


def get_spec(name: str) -> dict:
    """The zoo entry ``name``, as it is stored (not validated; see :func:`bnlab.models.resolve_spec`).

    Args:
        name: a key of :data:`ZOO`, e.g. ``"deeplizard-cnn"`` (``bnlab models list``).

    Returns:
        A deep copy of the zoo's spec dict (changing it leaves the zoo as it was). A Python network's
        entry (``resnet20``) has a ``python`` key (``"module:factory"``) instead of ``layers``.

    Raises:
        ConfigError: ``name`` is not in the zoo; the message lists the zoo and suggests a near miss.

    Example::

        spec = get_spec("keras-mlp")
        spec["description"], [layer["type"] for layer in spec["layers"]]   # flatten, dense x 3
    """
    if name not in ZOO:
        raise ConfigError(f"unknown model {name!r}{suggest(name, ZOO)} (the zoo: {', '.join(ZOO)}; or a spec .toml "
                          "file, or your own network as path/to/file.py:factory or package.module:factory)")
    return copy.deepcopy(ZOO[name])
