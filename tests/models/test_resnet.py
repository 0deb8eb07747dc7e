"""The CIFAR ResNet of He et al. (2016) as a plain nn.Module."""

import pytest
import torch
from torch import fx, nn

import bnlab.nn as bnn
from bnlab.errors import ConfigError
from bnlab.models.resnet import ResNetCIFAR, resnet20


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_resnet20_has_the_papers_size_and_runs(shape):
    model = resnet20(shape, 10)
    assert 260_000 <= _params(model) <= 280_000  # He et al. (2016), Table 6: 0.27M
    assert sum(bnn.is_batchnorm(m) for m in model.modules()) == 19 + 2  # 19 conv layers + 2 projections
    assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_depth_is_6n_plus_2():
    assert 0.84e6 <= _params(ResNetCIFAR((3, 32, 32), 10, 56)) <= 0.86e6  # Table 6: 0.85M
    net = ResNetCIFAR((3, 32, 32), 10, 32)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 32  # 3x3 convs plus the linear head
    for depth in (19, 2, "20"):
        with pytest.raises(ConfigError, match="6n \\+ 2"):
            ResNetCIFAR((3, 32, 32), 10, depth)


def _call_order(model):
    return [n.target for n in fx.symbolic_trace(model).graph.nodes if n.op == "call_module"]


def test_bn_placement_follows_the_zoo():
    # before/after mean relative to the activation, as in bnlab.models.spec
    before = _call_order(resnet20((3, 32, 32), 10, bn="before", bn_impl="torch"))
    assert before[:3] == ["conv1", "bn1", "act1"]
    block = [t for t in before if t.startswith("layer2.0.")]
    assert block == ["layer2.0.conv1", "layer2.0.bn1", "layer2.0.act1", "layer2.0.conv2", "layer2.0.bn2",
                     "layer2.0.shortcut.0", "layer2.0.shortcut.1", "layer2.0.act2"]
    after = _call_order(resnet20((3, 32, 32), 10, bn="after", bn_impl="torch"))
    assert after[:3] == ["conv1", "act1", "bn1"]
    assert [t for t in after if t.startswith("layer1.0.")] == [
        "layer1.0.conv1", "layer1.0.act1", "layer1.0.bn1", "layer1.0.conv2", "layer1.0.shortcut",
        "layer1.0.act2", "layer1.0.bn2"]
    assert _call_order(resnet20((3, 32, 32), 10, bn="tutorial", bn_impl="torch")) == before


def test_conv_bias_only_where_no_bn_follows():
    none = resnet20((3, 32, 32), 10, bn="none")
    assert not any(bnn.is_batchnorm(m) for m in none.modules())
    assert all(m.bias is not None for m in none.modules() if isinstance(m, nn.Conv2d))
    before = resnet20((3, 32, 32), 10, bn="before")
    assert all(m.bias is None for m in before.modules() if isinstance(m, nn.Conv2d))
    after = resnet20((3, 32, 32), 10, bn="after")
    assert after.layer1[0].conv2.bias is not None and after.layer2[0].shortcut[0].bias is None


def test_norm_impl_and_activation_choices():
    assert type(resnet20((3, 32, 32), 10).bn1) is bnn.BatchNorm2d
    assert type(resnet20((3, 32, 32), 10, bn_impl="torch").bn1) is nn.BatchNorm2d
    assert type(resnet20((3, 32, 32), 10, norm="renorm").layer3[2].bn2) is bnn.BatchRenorm2d
    ghost = resnet20((3, 32, 32), 10, norm="ghost", virtual_batch_size=4).layer1[0].bn1
    assert type(ghost) is bnn.GhostBatchNorm2d and ghost.virtual_batch_size == 4
    assert isinstance(resnet20((3, 32, 32), 10, activation="elu").layer1[0].act2, nn.ELU)
    assert isinstance(resnet20((3, 32, 32), 10, activation=None, dropout=0.5).act1, nn.ReLU)  # build()'s extras ignored
    with pytest.raises(ConfigError, match="bn placement"):
        resnet20((3, 32, 32), 10, bn="middle")
    with pytest.raises(ConfigError, match="image input"):
        resnet20((784,), 10)


def test_kaiming_init_and_a_training_step():
    torch.manual_seed(0)
    model = resnet20((3, 16, 16), 10)
    conv = model.layer3[1].conv1  # fan-out = 64 * 3 * 3
    assert abs(conv.weight.std().item() / (2 / (64 * 9)) ** 0.5 - 1) < 0.05
    assert torch.equal(model.layer3[1].bn1.weight, torch.ones(64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    losses = []
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
