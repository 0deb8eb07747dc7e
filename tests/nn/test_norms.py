"""The normalizers of bnlab.nn.norms against their definitions, the swap into any model, and
what folding and the doctor make of them."""

import warnings

import pytest
import torch
from torch import nn

from bnlab import models
from bnlab.errors import ConfigError
from bnlab.nn import (NORMS, WSConv2d, convert, fold_batchnorm, is_batchnorm, is_per_example_norm, norm_layer,
                      standardize_weights, swap_norm)
from bnlab.nn.norms import group_count
from tests.conftest import randomize_bn


def reference_group_norm(x, groups, weight, bias, eps=1e-5):
    """Wu & He's definition, written out: mean and biased variance over each example's group of
    channels and all positions, then a per-channel scale and shift."""
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = g.var(-1, unbiased=False, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    return y * weight.view(shape) + bias.view(shape)


def randomize_affine(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))
    return m


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("norm,groups", [("group", 4), ("layer", 1), ("instance", 8)])
def test_per_example_norms_match_the_definition_in_both_modes(norm, groups, mode):
    layer = randomize_affine(norm_layer(norm, 8, groups=4, dtype=torch.float64)).train(mode == "train")
    x = torch.randn(5, 8, 6, 7, dtype=torch.float64) * 3 + 2
    expected = reference_group_norm(x, groups, layer.weight, layer.bias)
    assert torch.allclose(layer(x), expected, atol=1e-12)
    # batch-independent: one example alone gives what it gives inside the batch
    assert torch.allclose(layer(x[2:3]), layer(x)[2:3], atol=1e-12)


def test_layer_norm_is_torch_layernorm_over_c_h_w():
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    ln = norm_layer("layer", 6, dtype=torch.float64)
    ref = nn.LayerNorm((6, 5, 5), elementwise_affine=False, dtype=torch.float64)
    assert torch.allclose(ln(x), ref(x), atol=1e-12)
    # on dense features it is torch.nn.LayerNorm(C) with the same affine parameters
    feats = torch.randn(7, 6, dtype=torch.float64)
    ln1 = randomize_affine(norm_layer("layer", 6, dims=1, dtype=torch.float64))
    ref1 = nn.LayerNorm(6, dtype=torch.float64)
    ref1.load_state_dict(ln1.state_dict())
    assert torch.allclose(ln1(feats), ref1(feats), atol=1e-12)


def test_instance_norm_is_torch_instancenorm_with_affine():
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    inn = randomize_affine(norm_layer("instance", 4, dtype=torch.float64))
    ref = nn.InstanceNorm2d(4, affine=True, dtype=torch.float64)
    ref.load_state_dict(inn.state_dict())
    assert torch.allclose(inn(x), ref(x), atol=1e-12)
    with pytest.raises(ConfigError, match="needs feature maps"):
        norm_layer("instance", 4, dims=1)


@pytest.mark.parametrize("norm", ["group", "layer", "instance"])
def test_gradcheck(norm):
    layer = randomize_affine(norm_layer(norm, 6, groups=3, dtype=torch.float64))
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_weight_standardization_follows_the_formula_and_gradcheck():
    conv = nn.Conv2d(3, 5, 3, padding=1, dtype=torch.float64)
    ws = standardize_weights(nn.Sequential(conv))[0]
    assert isinstance(ws, WSConv2d) and ws.weight is not None
    w = ws.weight.detach()
    flat = w.reshape(5, -1)
    # Qiao et al.'s code: (w - mean) / (std + 1e-5), std unbiased, per output channel
    w_hat = (w - flat.mean(1).view(-1, 1, 1, 1)) / (flat.std(1).view(-1, 1, 1, 1) + 1e-5)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert torch.allclose(ws(x), nn.functional.conv2d(x, w_hat, ws.bias, padding=1), atol=1e-12)
    hat = ws.standardized_weight().detach().reshape(5, -1)
    assert torch.allclose(hat.mean(1), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(hat.std(1), torch.ones(5, dtype=torch.float64), atol=1e-4)
    xg = x[:1, :, :4, :4].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda inp, weight: nn.functional.conv2d(
        inp, (weight - weight.reshape(5, -1).mean(1).view(-1, 1, 1, 1))
        / (weight.reshape(5, -1).std(1).view(-1, 1, 1, 1) + 1e-5), None, padding=1), (xg, ws.weight))
    assert torch.autograd.gradcheck(lambda inp: ws(inp), (xg,))
    assert set(ws.state_dict()) == set(conv.state_dict())  # the same state as a Conv2d


def test_group_count_caps_at_a_divisor():
    assert group_count(64, 32) == (32, None)
    g, note = group_count(16, 32)
    assert g == 16 and "fewer channels" in note
    g, note = group_count(120, 32)
    assert g == 30 and 120 % g == 0 and "does not divide" in note
    with pytest.raises(ConfigError):
        group_count(8, 0)


class Residual(nn.Module):
    """A user's network: stem, one residual block with BN on both paths, pooled head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(x + self.bn2(self.c2(x)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("norm", [n for n in NORMS if n != "batch"])
def test_swap_norm_on_any_model(norm):
    net = Residual()
    convert(net, to=norm, groups=4)
    assert not any(is_batchnorm(m) for m in net.modules()) or norm in ("renorm", "ghost", "ghost-renorm", "noisy")
    if norm == "none":
        assert isinstance(net.bn, nn.Identity) and net.conv.bias is not None  # a shift where BN had one
    elif norm in ("group", "layer", "instance"):
        assert is_per_example_norm(net.bn) and is_per_example_norm(net.bn2)
        assert (net.bn.num_groups if norm != "instance" else 8) == {"group": 4, "layer": 1, "instance": 8}[norm]
    out = net(torch.randn(4, 1, 8, 8))
    assert out.shape == (4, 3) and torch.isfinite(out).all()


def test_swap_back_to_batch_chooses_the_implementation():
    import bnlab.nn as bnn

    net = convert(Residual(), to="batch", impl="bnlab")
    assert isinstance(net.bn, bnn.BatchNorm2d)
    net = convert(net, to="torch")
    assert type(net.bn) is nn.BatchNorm2d
    with pytest.raises(ConfigError, match="use 'bnlab', 'torch', 'sync' or a normalizer"):
        convert(net, to="groupp")


def test_build_with_every_norm_and_weight_std():
    for norm in NORMS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            net = models.build("resnet20", bn="tutorial", norm=norm, norm_groups=8, weight_std=norm == "group",
                               input_shape=(1, 12, 12), num_classes=10, seed=0)
        out = net(torch.randn(2, 1, 12, 12))
        assert out.shape == (2, 10)
        if norm == "group":
            assert all(m.num_groups == 8 for m in net.modules() if isinstance(m, nn.GroupNorm))
            assert any(isinstance(m, WSConv2d) for m in net.modules())
            assert not caught  # 8 divides 16, 32 and 64: no note
    with pytest.warns(UserWarning, match=r"norm_groups=32 does not fit every layer: 7 layer\(s\) of 16 channels use 16"):
        models.build("resnet20", bn="tutorial", norm="group", input_shape=(1, 12, 12), num_classes=10)
    with pytest.raises(ConfigError, match="layer 12: norm='instance' needs feature maps"):
        models.build("fast-cnn", bn="after", norm="instance", input_shape=(1, 28, 28), num_classes=10)


def test_a_python_model_takes_any_norm():
    net = models.build("docs/examples/mynet.py:make", bn="tutorial", norm="group", norm_groups=4,
                       input_shape=(1, 28, 28), num_classes=10, seed=0)
    assert any(isinstance(m, nn.GroupNorm) for m in net.modules())
    assert not any(is_batchnorm(m) for m in net.modules())


def test_fold_leaves_per_example_norms_with_a_reason_and_freezes_ws():
    net = models.build("resnet20", bn="tutorial", norm="group", norm_groups=8, weight_std=True,
                       input_shape=(1, 12, 12), num_classes=10, seed=0).eval()
    folded, report = fold_batchnorm(net)
    assert not report.folded
    assert len(report.left) == sum(isinstance(m, nn.GroupNorm) for m in net.modules())
    assert all("normalizes each example with its own statistics" in r["reason"] for r in report.left)
    assert not any(isinstance(m, WSConv2d) for m in folded.modules())
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), atol=1e-4)

    # BN after a WS conv folds into the frozen conv exactly
    ws = randomize_bn(standardize_weights(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).double())
    f, rep = fold_batchnorm(ws)
    xd = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    assert len(rep.folded) == 1 and torch.allclose(f(xd), ws(xd), atol=1e-10)


def test_doctor_names_per_example_norms_instead_of_checking_statistics():
    from bnlab.data import load_splits
    from bnlab.inspect import diagnose

    train, test = load_splits("digits")
    net = models.build("keras-mlp", bn="after", norm="layer", input_shape=train.input_shape,
                       num_classes=10, seed=0).eval()
    rep = diagnose(net, train.subset(200), test.subset(100), batch_size=32)
    assert rep["bn_layers"] == 0 and rep["problems"] == 0
    assert rep["other_norms"] and all(r["type"] == "GroupNorm" for r in rep["other_norms"])


def test_norm_none_on_a_layer_spec_gives_the_convs_a_bias():
    net = models.build("vgg-bn", bn="tutorial", norm="none", input_shape=(1, 28, 28), num_classes=10, seed=0)
    assert not any(is_batchnorm(m) for m in net.modules())
    assert all(m.bias is not None for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_a_depthwise_1x1_conv_is_not_weight_standardized():
    net = standardize_weights(nn.Sequential(nn.Conv2d(4, 4, 1, groups=4), nn.Conv2d(4, 4, 3)))
    assert type(net[0]) is nn.Conv2d and isinstance(net[1], WSConv2d)
    assert torch.isfinite(net(torch.randn(1, 4, 5, 5))).all()


def test_a_folded_group_norm_ws_checkpoint_reloads_as_saved(tmp_path):
    from bnlab.data import load_splits
    from bnlab.train import TrainSettings, fold_checkpoint, load_checkpoint, train

    ck = tmp_path / "gn.pt"
    res = train(TrainSettings(dataset="digits", model="fast-cnn", bn="after", norm="group", norm_groups=4,
                              weight_std=True, epochs=1, batch_size=256), progress=False, checkpoint=ck)
    folded_path = tmp_path / "gn-folded.pt"
    fold_checkpoint(load_checkpoint(ck), folded_path)
    again = load_checkpoint(folded_path)
    assert again.build.get("folded") and not any(isinstance(m, WSConv2d) for m in again.model.modules())
    x = next(load_splits("digits")[1].batches(64))[0]
    with torch.no_grad():
        assert torch.allclose(again.model(x), res.model(x), atol=1e-5)
