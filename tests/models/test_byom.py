"""Bring your own model: networks from Python files and modules, through every bnlab tool."""

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from bnlab import models
from bnlab.cli import main
from bnlab.errors import ConfigError
from bnlab.nn import is_batchnorm

# docs/examples/mynet.py (the README's example of your own network) plus factories for the other cases
NET = (Path(__file__).parents[2] / "docs" / "examples" / "mynet.py").read_text() + '''


def with_bn(input_shape, num_classes, bn="before"):
    net = Net(input_shape[0], num_classes)
    if bn == "none":
        net.bn = nn.Identity()
    net.bn_seen = bn
    return net


# the shape of torchvision.models.resnet18: keyword-only weights/progress, num_classes via **kwargs
def resnet18(*, weights=None, progress=True, **kwargs):
    assert weights is None
    return Net(3, kwargs.get("num_classes", 1000))


def timm_like(num_classes=1000, in_chans=3):
    return Net(in_chans, num_classes)


def raises(input_shape, num_classes):
    raise ValueError("no such width")


def not_a_module(input_shape, num_classes):
    return "a string"


def wrong_classes(input_shape, num_classes):
    return Net(input_shape[0], 7)
'''


@pytest.fixture
def netfile(tmp_path):
    path = tmp_path / "mynet.py"
    path.write_text(textwrap.dedent(NET))
    return path


def bn_count(model):
    return sum(map(is_batchnorm, model.modules()))


def test_file_factory_builds_as_written_and_records_its_hash(netfile):
    spec = models.resolve_spec(f"{netfile}:make")
    assert spec["python"]["file"] == str(netfile) and len(spec["python"]["sha256"]) == 64
    net = models.build(f"{netfile}:make", bn="tutorial", input_shape=(1, 28, 28), num_classes=10, seed=0)
    # the same seed gives the same weights, as for zoo models
    again = models.build(f"{netfile}:make", bn="tutorial", input_shape=(1, 28, 28), num_classes=10, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    assert bn_count(net) == 2 and net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_bn_none_removes_every_bn_and_gives_the_conv_a_bias(netfile):
    with pytest.warns(UserWarning, match="removed the 2 BN layer"):
        net = models.build(f"{netfile}:make", bn="none", input_shape=(1, 28, 28), num_classes=10)
    assert bn_count(net) == 0
    assert net.stem.bias is not None and net.block.conv.bias is not None
    assert isinstance(net.bn, nn.Identity) and isinstance(net.block.bn, nn.Identity)
    # the same seed gives the same conv weights with and without BN (as deeplizard seeds both nets)
    with pytest.warns(UserWarning):
        plain = models.build(f"{netfile}:make", bn="none", input_shape=(1, 28, 28), num_classes=10, seed=3)
    with_bn = models.build(f"{netfile}:make", bn="tutorial", input_shape=(1, 28, 28), num_classes=10, seed=3)
    assert torch.equal(plain.stem.weight, with_bn.stem.weight) and torch.equal(plain.head.weight, with_bn.head.weight)


def test_bn_before_after_need_a_factory_that_takes_bn(netfile):
    with pytest.raises(ConfigError, match="bn=after needs a factory that takes a 'bn' argument"):
        models.build(f"{netfile}:make", bn="after", input_shape=(1, 28, 28), num_classes=10)
    net = models.build(f"{netfile}:with_bn", bn="after", input_shape=(1, 28, 28), num_classes=10)
    assert net.bn_seen == "after"
    assert models.build(f"{netfile}:with_bn", bn="tutorial", input_shape=(1, 28, 28), num_classes=10).bn_seen == "before"


def test_factories_of_other_libraries_get_only_what_they_accept(netfile):
    net = models.build(f"{netfile}:resnet18", bn="tutorial", input_shape=(3, 32, 32), num_classes=10)
    assert net.head.out_features == 10 and net.stem.in_channels == 3
    net = models.build(f"{netfile}:timm_like", bn="tutorial", input_shape=(1, 28, 28), num_classes=4)
    assert net.head.out_features == 4 and net.stem.in_channels == 1


def test_module_factory(netfile, monkeypatch):
    monkeypatch.syspath_prepend(str(netfile.parent))
    monkeypatch.delitem(sys.modules, "mynet", raising=False)
    net = models.build("mynet:make", bn="tutorial", input_shape=(1, 28, 28), num_classes=10)
    assert models.resolve_spec("mynet:make")["python"] == {"module": "mynet", "factory": "make"}
    assert bn_count(net) == 2


@pytest.mark.parametrize("factory, message", [
    ("raises", "model factory '.*:raises' raised ValueError: no such width"),
    ("not_a_module", "returned str, not a torch.nn.Module"),
    ("wrong_classes", r"outputs \(7,\) per example, but the data has 10 classes"),
    ("nope", "has no callable 'nope'"),
])
def test_factory_mistakes_are_one_line_errors(netfile, capsys, factory, message):
    assert main(["models", "show", f"{netfile}:{factory}", "--bn", "tutorial", "--input-shape", "1,28,28"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_missing_file_is_an_error(tmp_path, capsys):
    assert main(["models", "show", f"{tmp_path}/absent.py:make", "--input-shape", "1,28,28"]) == 2
    assert "absent.py does not exist" in capsys.readouterr().err


def test_train_evaluate_fold_doctor_on_a_python_model_then_the_file_changes(netfile, tmp_path, capsys):
    ck, folded = tmp_path / "m.pt", tmp_path / "f.pt"
    assert main(["train", "--model", f"{netfile}:make", "--bn", "tutorial", "--dataset", "digits", "--epochs", "1",
                 "--batch-size", "64", "-o", str(ck), "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["settings"]["model"] == f"{netfile}:make"
    assert main(["evaluate", str(ck), "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)["accuracy"]
    assert acc == pytest.approx(trained["epochs"][-1]["test_acc"])
    assert main(["fold", str(ck), "-o", str(folded), "--check", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["folded"]) == 2 and not out["left"] and out["accuracy_after"] == pytest.approx(acc)
    assert main(["doctor", str(ck), "--json"]) in (0, 1)
    assert len(json.loads(capsys.readouterr().out)["layers"]) == 2
    # the file changes: the checkpoint refuses to rebuild rather than load other code
    netfile.write_text(netfile.read_text() + "\n# edited\n")
    assert main(["evaluate", str(ck)]) == 2
    assert "has changed since this network was made" in capsys.readouterr().err
    netfile.unlink()
    assert main(["evaluate", str(ck)]) == 2
    assert "is gone" in capsys.readouterr().err


def test_resnet20_and_vgg_in_the_zoo(capsys):
    for shape in ((1, 28, 28), (3, 32, 32)):
        net = models.build("resnet20", bn="tutorial", input_shape=shape, num_classes=10, seed=0)
        assert 260_000 < sum(p.numel() for p in net.parameters()) < 280_000 and bn_count(net) == 21
        assert net(torch.zeros(2, *shape)).shape == (2, 10)
    assert bn_count(models.build("resnet20", bn="none", input_shape=(1, 28, 28), num_classes=10)) == 0
    assert bn_count(models.build("vgg-bn", bn="tutorial", input_shape=(3, 32, 32), num_classes=10)) == 7
    assert main(["models", "show", "resnet20", "--bn", "tutorial", "--input-shape", "3,32,32", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["layers"][0]["layer"] == "Conv2d" and s["layers"][-1]["output_shape"] == [10]
    assert s["total_params"] == sum(r["params"] for r in s["layers"])
    assert main(["models", "show", "resnt20"]) == 2
    assert "did you mean 'resnet20'" in capsys.readouterr().err


def test_activation_tracking_and_norm_swap_on_a_python_model(tmp_path):
    """A network that applies ReLU as a function has no nonlinearity modules: tracking watches its
    BN inputs instead; --norm swaps its BN layers for the normalizer asked for."""
    from bnlab.train import TrainSettings, train

    path = tmp_path / "fnet.py"
    path.write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self, c, k):
                super().__init__()
                self.conv = nn.Conv2d(c, 8, 3, padding=1, bias=False)
                self.bn = nn.BatchNorm2d(8)
                self.head = nn.Linear(8, k)

            def forward(self, x):
                return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

        def make(input_shape, num_classes):
            return Net(input_shape[0], num_classes)
    '''))
    s = TrainSettings(dataset="digits", model=f"{path}:make", bn="tutorial", epochs=1, batch_size=128,
                      track_activations=True, track_every=3)
    res = train(s, progress=False)
    layers = {r["layer"] for r in res.tracker.records if r["layer"] != "test"}
    assert layers == {"bn:BatchNorm2d"} and len(res.tracker.records) >= 3
    gn = train(TrainSettings(**{**s.to_dict(), "norm": "group", "norm_groups": 4, "track_activations": False}),
               progress=False)
    assert isinstance(gn.model.bn, torch.nn.GroupNorm) and gn.model.bn.num_groups == 4
    assert gn.history.status == "done"


def test_a_sweep_reruns_a_python_model_whose_file_changed(netfile):
    from bnlab.train import TrainSettings

    s = TrainSettings(dataset="digits", model=f"{netfile}:with_bn", bn="tutorial")
    before = s.identity(threads=1)
    assert TrainSettings(dataset="digits", model=f"{netfile}:with_bn", bn="tutorial").identity(threads=1) == before
    netfile.write_text(netfile.read_text() + "\n# edited\n")
    assert s.identity(threads=1) != before  # another network: its runs are new runs, not resumed ones
    assert TrainSettings(dataset="digits", model="keras-mlp").identity() == TrainSettings(
        dataset="digits", model="keras-mlp").identity()


def test_a_sweep_reruns_a_spec_file_model_whose_layers_changed(tmp_path):
    from bnlab.train import TrainSettings

    spec = tmp_path / "tiny.toml"
    layers = '[[layers]]\ntype = "flatten"\n[[layers]]\ntype = "dense"\nout = {}\n[[layers]]\ntype = "dense"\nout = "classes"\n'
    spec.write_text('activation = "tanh"\n' + layers.format(64))
    s = TrainSettings(dataset="digits", model=str(spec), bn="after")
    before = s.identity(threads=1)
    spec.write_text('# a comment, and the same layers\nactivation = "tanh"\n' + layers.format(64))
    assert s.identity(threads=1) == before  # the same network: its runs resume
    spec.write_text('activation = "tanh"\n' + layers.format(32))
    assert s.identity(threads=1) != before  # another network: new runs
