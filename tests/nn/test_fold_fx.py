"""fold_batchnorm on networks that are not nn.Sequential: traced with torch.fx, folded on the graph."""

import copy

import pytest
import torch
from torch import fx, nn

import bnlab.nn as bnn
from bnlab.errors import ConfigError
from bnlab.models.resnet import resnet20
from conftest import randomize_bn as _randomize


def _bn_count(model):
    return sum(bnn.is_batchnorm(m) for m in model.modules())


# ------------------------------------------------------------------ networks written as plain modules

class SmallResNet(nn.Module):
    """conv-BN-ReLU stem, one residual block, global average pool, linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = bnn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = bnn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        out = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(out)) + x)
        return self.head(x.mean((2, 3)))


class BasicBlock18(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet18Shaped(nn.Module):
    """torchvision's ResNet-18 layout (written out: torchvision is not installed)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, cout in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock18(cin, cout, stride), BasicBlock18(cout, cout, 1)))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Mixed(nn.Module):
    """One BN at each kind of site the graph fold must tell apart."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(2, 6, 3, padding=1)
        self.bn_a = bnn.BatchNorm2d(6)        # -> conv1 without padding: folds into conv1
        self.conv1 = nn.Conv2d(6, 8, 3)
        self.bn_b = nn.BatchNorm2d(8)          # -> conv2 with zero padding: left
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_c = bnn.BatchNorm2d(8)        # feeds two branches: left
        self.branch1 = nn.Conv2d(8, 8, 1)
        self.branch2 = nn.Conv2d(8, 8, 1)
        self.conv5 = nn.Conv2d(8, 8, 1)
        self.bn_d = bnn.BatchNorm2d(8)        # its input is also the residual: left
        self.pool = nn.MaxPool2d(2)
        self.bn_e = nn.BatchNorm2d(8)          # -> torch.flatten -> fc1: folds into fc1
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.bn_f = bnn.BatchNorm1d(16)       # -> dropout -> fc2: folds into fc2
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.conv0(x))
        x = torch.relu(self.conv1(self.bn_a(x)))
        x = torch.relu(self.conv2(self.bn_b(x)))
        y = self.bn_c(x)
        x = torch.relu(self.branch1(y)) + self.branch2(y)
        z = self.conv5(x)
        x = self.pool(torch.relu(self.bn_d(z) + z))
        x = torch.relu(self.fc1(torch.flatten(self.bn_e(x), 1)))
        return self.fc2(self.drop(self.bn_f(x)))


NETS = {
    "resnet20 cifar": (lambda: resnet20((3, 32, 32), 10), (2, 3, 32, 32), 21, 0),
    "resnet20 mnist": (lambda: resnet20((1, 28, 28), 10, bn_impl="torch"), (2, 1, 28, 28), 21, 0),
    "small resnet": (SmallResNet, (4, 3, 16, 16), 3, 0),
    "resnet18-shaped": (ResNet18Shaped, (2, 3, 32, 32), 20, 0),
    "mixed sites": (Mixed, (4, 2, 10, 10), 3, 3),
}


@pytest.mark.parametrize("name", list(NETS))
def test_graph_fold_is_exact(name):
    make, shape, n_folded, n_left = NETS[name]
    torch.manual_seed(0)
    model = _randomize(make())
    x = torch.randn(shape)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
        folded, report = bnn.fold_batchnorm(model)
        assert isinstance(folded, fx.GraphModule) and not folded.training
        assert (len(report.folded), len(report.left)) == (n_folded, n_left), str(report)
        assert _bn_count(folded) == n_left == _bn_count(model) - n_folded
        diff32 = (folded(x) - expected).abs().max().item()
        assert diff32 < 1e-4, diff32
        # in float64 the folded weights reproduce the original up to rounding: the algebra is exact
        model64, folded64 = copy.deepcopy(model).double(), bnn.fold_batchnorm(copy.deepcopy(model).double())[0]
        diff64 = (folded64(x.double()) - model64(x.double())).abs().max().item()
        assert diff64 < 1e-10, diff64
    print(f"{name}: max |diff| float32 {diff32:.2e}, float64 {diff64:.2e}")
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, state[k])
    assert _bn_count(model) == n_folded + n_left


def test_graph_fold_report_names_each_bn_and_why():
    _, report = bnn.fold_batchnorm(_randomize(Mixed()))
    assert report.folded == [{"bn": "bn_a", "into": "conv1", "side": "following"},
                             {"bn": "bn_e", "into": "fc1", "side": "following"},
                             {"bn": "bn_f", "into": "fc2", "side": "following"}]
    left = {r["bn"]: r["reason"] for r in report.left}
    assert set(left) == {"bn_b", "bn_c", "bn_d"}
    assert "pads with zeros" in left["bn_b"] and "Conv2d 'conv2'" in left["bn_b"]
    assert "read by 2 nodes" in left["bn_c"] and "'branch1'" in left["bn_c"] and "'branch2'" in left["bn_c"]
    assert "preceded by Conv2d 'conv5', whose output is also read by add()" in left["bn_d"]
    text = str(report)
    assert text.startswith("folded 3 batch-norm layer(s), left 3") and "bn_c left:" in text
    assert report.to_dict() == {"folded": report.folded, "left": report.left}


def test_every_resnet20_bn_folds_into_its_conv():
    _, report = bnn.fold_batchnorm(_randomize(resnet20((3, 32, 32), 10)))
    assert all(r["side"] == "preceding" for r in report.folded)
    into = {r["bn"]: r["into"] for r in report.folded}
    assert into["bn1"] == "conv1" and into["layer2.0.shortcut.1"] == "layer2.0.shortcut.0"
    assert into["layer3.2.bn2"] == "layer3.2.conv2"


def test_bn_before_activation_is_mostly_left_and_exact():
    # bn="after" (conv -> ReLU -> BN): BN follows a ReLU and feeds padded convs or two branches
    torch.manual_seed(0)
    model = _randomize(resnet20((3, 32, 32), 10, bn="after"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        folded, report = bnn.fold_batchnorm(model)
        assert (folded(x) - model(x)).abs().max() < 1e-4
    assert [r["bn"] for r in report.folded] == ["layer2.0.shortcut.1", "layer3.0.shortcut.1"]
    left = {r["bn"]: r["reason"] for r in report.left}
    assert "read by 2 nodes" in left["layer1.0.bn2"] and "pads with zeros" in left["layer1.0.bn1"]


def test_fold_through_reflect_padding_and_training_mode_bn():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bnn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")

        def forward(self, x):
            return self.conv(self.bn(torch.tanh(x)))

    model = _randomize(Net()).train()  # folding uses running statistics whatever the mode
    x = torch.randn(2, 3, 6, 6)
    folded, report = bnn.fold_batchnorm(model)
    assert report.folded == [{"bn": "bn", "into": "conv", "side": "following"}]
    assert model.training and model.bn.training  # the original keeps its mode
    with torch.no_grad():
        assert (folded(x) - model.eval()(x)).abs().max() < 1e-5


def test_bn_without_running_stats_is_left():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.bn = nn.BatchNorm1d(4, track_running_stats=False)

        def forward(self, x):
            return self.bn(self.fc(x))

    folded, report = bnn.fold_batchnorm(Net())
    assert report.left == [{"bn": "bn", "reason": "track_running_stats=False: eval uses batch statistics"}]
    assert _bn_count(folded) == 1


def test_sequential_of_residual_blocks_is_traced():
    # a BN inside a block the Sequential list view cannot see into goes through the graph fold
    torch.manual_seed(0)
    model = _randomize(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), resnet20((3, 8, 8), 10).layer1[0]))
    x = torch.randn(2, 3, 8, 8)
    folded, report = bnn.fold_batchnorm(model)
    assert isinstance(folded, fx.GraphModule) and len(report.folded) == 2 and _bn_count(folded) == 0
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max() < 1e-5


def test_folded_graph_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _randomize(resnet20((3, 32, 32), 10))
    folded, _ = bnn.fold_batchnorm(model)
    path = tmp_path / "folded.pt"
    torch.save(folded.state_dict(), path)
    assert not any("bn" in k for k in folded.state_dict())
    # the folded structure depends only on the architecture: fold a fresh one, load the weights
    fresh, _ = bnn.fold_batchnorm(resnet20((3, 32, 32), 10))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), folded(x))


def test_untraceable_model_names_the_module_and_reason():
    class Gate(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # data-dependent control flow

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, bias=False)
            self.bn = nn.BatchNorm2d(2)
            self.gate = Gate()

        def forward(self, x):
            return self.gate(self.bn(self.conv(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(x)

    with pytest.raises(ConfigError) as info:
        bnn.fold_batchnorm(Net())
    message = str(info.value)
    assert "\n" not in message
    assert "cannot trace Net" in message and "module 'block.gate' (Gate)" in message
    assert "TraceError" in message and "control flow" in message


def test_bare_layer_is_refused():
    with pytest.raises(ConfigError, match="bare BatchNorm2d"):
        bnn.fold_batchnorm(nn.BatchNorm2d(3))


# ------------------------------------------------------------------ the other BN tools on a residual network

def test_convert_and_recalibrate_work_on_resnet20():
    torch.manual_seed(0)
    model = _randomize(resnet20((3, 16, 16), 10))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        bnn.convert(model, to="torch")
        assert sum(type(m) is nn.BatchNorm2d for m in model.modules()) == 21
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)  # two implementations, 20 layers deep
        bnn.convert(model, to="bnlab")
        assert sum(type(m) is bnn.BatchNorm2d for m in model.modules()) == 21

    batches = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    stats = bnn.population_statistics(model, batches)
    assert len(stats) == 21
    bnn.recalibrate_batchnorm(model, batches)
    assert not model.training
    for bn, (mean, var) in stats.items():
        torch.testing.assert_close(bn.running_mean, mean.float())
        torch.testing.assert_close(bn.running_var, var.float())
    folded, report = bnn.fold_batchnorm(model)  # recalibrate, then fold
    assert not report.left
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max() < 1e-4
