import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab import models
from bnlab.errors import ConfigError

SHAPES = {"fashion-mnist": (1, 28, 28), "mnist": (1, 28, 28), "cifar10": (3, 32, 32), "digits": (1, 8, 8),
          "iris": (4,), "image-folder": (3, 32, 32)}


def _bn_layers(m):
    return [x for x in m.modules() if bnn.is_batchnorm(x)]


@pytest.mark.parametrize("name", list(models.ZOO))
@pytest.mark.parametrize("bn", ["none", "before", "after", "tutorial"])
def test_every_zoo_model_builds_and_trains_a_step_on_its_datasets(name, bn):
    entry = models.ZOO[name]
    if bn == "tutorial" and not entry.get("tutorial_bn"):
        with pytest.raises(ConfigError, match="no tutorial BN placement"):
            models.build(name, bn=bn, input_shape=(1, 28, 28), num_classes=10)
        return
    for ds in entry["datasets"]:
        shape = SHAPES[ds]
        torch.manual_seed(0)
        m = models.build(name, bn=bn, input_shape=shape, num_classes=3 if ds == "iris" else 10)
        x, y = torch.randn(4, *shape), torch.randint(0, 3, (4,))
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        before = [p.clone() for p in m.parameters()]
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
        assert (len(_bn_layers(m)) > 0) == (bn != "none")


def test_bn_placement_before_and_after():
    before = models.build("keras-mlp", bn="before", input_shape=(1, 28, 28), num_classes=10)
    after = models.build("keras-mlp", bn="after", input_shape=(1, 28, 28), num_classes=10)
    assert [type(m).__name__ for m in before] == ["Flatten", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [type(m).__name__ for m in after] == ["Flatten", "Linear", "ReLU", "BatchNorm1d", "Linear", "ReLU", "BatchNorm1d", "Linear"]


def test_deeplizard_tutorial_placement_matches_brief():
    m = models.build("deeplizard-cnn", bn="tutorial", input_shape=(1, 28, 28), num_classes=10)
    kinds = [type(x).__name__ for x in m]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d", "BatchNorm2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten",
                     "Linear", "ReLU", "BatchNorm1d", "Linear", "ReLU", "Linear"]
    assert m[8].in_features == 192 and m[3].num_features == 6 and m[10].num_features == 120
    plain = models.build("deeplizard-cnn", input_shape=(1, 28, 28), num_classes=10)
    assert sum(p.numel() for p in plain.parameters()) == 32998  # the tutorial network's count


def test_knobs_norm_impl_activation_dropout():
    m = models.build("keras-mlp", bn="after", norm="ghost", input_shape=(4,), num_classes=3, virtual_batch_size=8)
    assert isinstance(m[3], bnn.GhostBatchNorm1d) and m[3].virtual_batch_size == 8
    m = models.build("deeplizard-cnn", bn="after", norm="renorm", input_shape=(1, 28, 28), num_classes=10)
    assert isinstance(m[2], bnn.BatchRenorm2d)
    m = models.build("deeplizard-cnn", bn="tutorial", bn_impl="torch", input_shape=(1, 28, 28), num_classes=10)
    assert type(m[3]) is nn.BatchNorm2d
    m = models.build("ioffe-mlp", bn="tutorial", activation="tanh", input_shape=(1, 28, 28), num_classes=10)
    assert sum(isinstance(x, nn.Tanh) for x in m) == 3 and not any(isinstance(x, nn.Sigmoid) for x in m)
    m = models.build("cifar-cnn", dropout=0.2, input_shape=(3, 32, 32), num_classes=10)
    assert [x.p for x in m if isinstance(x, nn.Dropout)] == [0.2]
    assert m[7].in_features == 8 * 8 * 64  # the crash course's 8x8x64 flatten
    with pytest.raises(ConfigError, match="exists only in bnlab"):
        models.build("keras-mlp", bn="after", norm="ghost", bn_impl="torch", input_shape=(4,), num_classes=3)


def test_ioffe_init_is_small_gaussian():
    torch.manual_seed(0)
    m = models.build("ioffe-mlp", input_shape=(1, 28, 28), num_classes=10)
    w = m[1].weight
    assert abs(w.std().item() - 0.1) < 0.005 and torch.all(m[1].bias == 0)


def test_spec_from_toml_equals_spec_from_python(tmp_path):
    toml = tmp_path / "tiny.toml"
    toml.write_text('''
name = "tiny"
activation = "tanh"

[[layers]]
type = "conv"
out = 4
kernel = 3

[[layers]]
type = "pool"
size = 2

[[layers]]
type = "flatten"

[[layers]]
type = "dense"
out = 16

[[layers]]
type = "dropout"
p = 0.25

[[layers]]
type = "dense"
out = "classes"
''')
    py = {"name": "tiny", "activation": "tanh", "layers": [
        {"type": "conv", "out": 4, "kernel": 3}, {"type": "pool", "size": 2}, {"type": "flatten"},
        {"type": "dense", "out": 16}, {"type": "dropout", "p": 0.25}, {"type": "dense", "out": "classes"}]}
    assert models.load_spec(toml) == models.validate_spec(py)
    torch.manual_seed(0)
    a = models.build(str(toml), bn="after", input_shape=(1, 10, 10), num_classes=5)
    torch.manual_seed(0)
    b = models.build(py, bn="after", input_shape=(1, 10, 10), num_classes=5)
    assert repr(a) == repr(b)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("spec,needle", [
    ({"layers": []}, "non-empty list"),
    ({"layers": [{"type": "dense", "out": 3}], "colour": 1}, "unknown spec key"),
    ({"layers": [{"type": "conv", "out": 3}, {"type": "dense", "out": 2}]}, "positive integer 'kernel'"),
    ({"layers": [{"type": "dense", "units": 3}]}, "unknown key"),
    ({"layers": [{"type": "wobble"}]}, "unknown layer type 'wobble'"),
    ({"layers": [{"type": "flatten"}]}, "last layer must be a dense"),
    ({"layers": [{"type": "dense", "out": -1}]}, "positive integer or \"classes\""),
    ({"activation": "swish", "layers": [{"type": "dense", "out": 2}]}, "unknown activation"),
])
def test_bad_specs(spec, needle):
    with pytest.raises(ConfigError, match=needle):
        models.validate_spec(spec)


def test_shape_errors_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="too small for deeplizard-cnn"):
        models.build("deeplizard-cnn", input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ConfigError, match="conv needs image input"):
        models.build("deeplizard-cnn", input_shape=(4,), num_classes=3)
    with pytest.raises(ConfigError, match="ends with shape"):
        models.build({"layers": [{"type": "flatten"}, {"type": "dense", "out": 7}]}, input_shape=(4,), num_classes=3)
    bad = tmp_path / "bad.toml"
    bad.write_text("layers = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        models.load_spec(bad)
    with pytest.raises(ConfigError, match="unknown model 'resnet'"):
        models.build("resnet", input_shape=(1, 28, 28), num_classes=10)


def test_summary_matches_parameters():
    m = models.build("s4tf-cnn", bn="tutorial", input_shape=(1, 28, 28), num_classes=10)
    s = models.summary(m, (1, 28, 28))
    assert s["total_params"] == sum(p.numel() for p in m.parameters()) == sum(r["params"] for r in s["layers"])
    assert s["layers"][-1]["output_shape"] == [10]
    assert s["layers"][0]["output_shape"] == [32, 26, 26]
    assert "Conv2d(1->32, 3x3)" in models.format_summary(s)


@pytest.mark.parametrize("bad", [{"type": "dropout", "p": "x"}, {"type": "conv", "out": 4, "kernel": 3, "stride": "2"},
                                 {"type": "pool", "size": "2"}, {"type": "conv", "out": 4, "kernel": 3, "padding": -1},
                                 {"type": "conv", "out": 4, "kernel": 3, "bias": "yes"}])
def test_spec_values_of_the_wrong_type_are_config_errors(bad):
    from bnlab.errors import ConfigError
    from bnlab.models import build

    spec = {"name": "t", "layers": [{"type": "conv", "out": 2, "kernel": 3}, bad, {"type": "flatten"},
                                    {"type": "dense", "out": "classes"}]}
    with pytest.raises(ConfigError, match="t: layer 2: "):
        build(spec, input_shape=(1, 12, 12), num_classes=3)


def test_bn_momentum_reaches_every_bn_layer_and_is_checked():
    import bnlab.nn as bnn
    from bnlab.errors import ConfigError
    from bnlab.nn import is_batchnorm
    from bnlab.train import TrainSettings

    for norm in ("batch", "renorm", "ghost-renorm", "noisy"):
        net = models.build("fast-cnn", bn="before", norm=norm, bn_momentum=0.01, input_shape=(1, 28, 28), num_classes=10)
        bns = [m for m in net.modules() if is_batchnorm(m)]
        assert len(bns) == 4 and all(m.momentum == 0.01 for m in bns)
    net = models.build("fast-cnn", bn="before", input_shape=(1, 28, 28), num_classes=10)
    assert all(m.momentum == 0.1 for m in net.modules() if isinstance(m, bnn.BatchNorm2d))  # the layers' own
    with pytest.raises(ConfigError, match=r"bn_momentum must be in \(0, 1\]"):
        TrainSettings(bn_momentum=0.0).validate()
    with pytest.raises(ConfigError, match="batch_classes=3 does not divide batch_size=32"):
        TrainSettings(batch_size=32, batch_classes=3).validate()
    with pytest.raises(ConfigError, match="batch_classes with nproc > 1"):
        TrainSettings(batch_size=32, batch_classes=2, nproc=2).validate()
    # older runs had none of these settings: their identity is unchanged at the old values
    assert TrainSettings().identity() == TrainSettings(bn_momentum=None, batch_classes=None, nproc=1, sync_bn=False,
                                                       track_landscape=False).identity()
    assert TrainSettings(bn_momentum=0.01).identity() != TrainSettings().identity()
