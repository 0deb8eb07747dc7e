"""bnlab.export: ONNX files with BN folded away, checked against PyTorch in onnxruntime."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab import __version__, models
from bnlab.data import Dataset, Standardizer
from bnlab.errors import ConfigError
from bnlab.export import ExportError, export_checkpoint, to_onnx
from bnlab.models.resnet import resnet20
from bnlab.train import TrainSettings, load_checkpoint, train

needs_export = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")),
    reason="needs the export extra (onnx, onnxruntime, onnxscript)")

DIGITS = dict(dataset="digits", model="keras-mlp", bn="after", batch_size=64, lr=0.01, epochs=2)
NAMES = [f"digit {i}" for i in range(10)]
SCALE = Standardizer("scale", (0.0,), (255.0,))


def session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(path, x: torch.Tensor) -> np.ndarray:
    s = session(path)
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


def op_types(path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(path)).graph.node]


def metadata(path) -> dict:
    return session(path).get_modelmeta().custom_metadata_map


def with_statistics(model, input_shape, seed=0):
    """``model`` in eval mode with BN statistics and affine parameters far from their defaults,
    so folding has real numbers to fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if bnn.is_batchnorm(m):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.3, generator=g)
        model.train()
        for _ in range(3):
            model(torch.rand((32, *input_shape), generator=g) * 2 + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A keras-mlp (BN after each ReLU) trained on digits, its checkpoint, and its ONNX export."""
    out = tmp_path_factory.mktemp("digits")
    res = train(TrainSettings(**DIGITS), checkpoint=out / "m.pt", progress=False)
    if not importlib.util.find_spec("onnxscript"):
        return res, out / "m.pt", None, None
    path = out / "digits.onnx"
    report = to_onnx(res.model, path, input_shape=res.train.input_shape, standardizer=res.train.standardizer,
                     classes=NAMES, check_data=res.test)
    return res, out / "m.pt", path, report


@needs_export
def test_export_matches_pytorch_on_real_data(digits):
    res, _, path, report = digits
    assert report.max_abs_diff <= 1e-4 and report.top1_agreement == "256/256"
    assert report.check_source == "the first 256 digits/test images"
    assert [r["bn"] for r in report.folded] == ["3", "6"] and report.left == [] and report.batchnorm_nodes == 0
    assert report.exporter == "dynamo" and report.opset >= 18 and report.file_size == path.stat().st_size
    # independently, on the whole test split (450 images), against the original network
    with torch.no_grad():
        expected = res.model.eval()(res.test.standardizer(res.test.x)).numpy()
    got = run_onnx(path, res.test.x.float())
    assert np.abs(got - expected).max() <= 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()
    d = json.loads(json.dumps(report.to_dict()))
    assert d["top1_agreement"] == "256/256" and d["input_shape"] == ["N", 1, 8, 8]
    assert "max |diff|" in str(report) and "256/256" in str(report)


@needs_export
def test_batch_dimension_is_dynamic(digits):
    res, _, path, _ = digits
    graph_input = session(path).get_inputs()[0]
    assert graph_input.name == "pixels" and graph_input.type == "tensor(float)"
    assert graph_input.shape == ["N", 1, 8, 8]
    for n in (1, 7):
        x = res.test.x[10:10 + n]
        with torch.no_grad():
            expected = res.model.eval()(res.test.standardizer(x)).numpy()
        got = run_onnx(path, x.float())
        assert got.shape == (n, 10) and np.abs(got - expected).max() <= 1e-4


@needs_export
def test_baked_standardization_takes_raw_pixels(digits, tmp_path):
    res, _, path, report = digits
    s = res.train.standardizer
    assert s.mode == "zscore" and report.baked and op_types(path)[:2] == ["Sub", "Mul"]
    raw = res.test.x[:100]  # uint8 0..255
    with torch.no_grad():
        expected = res.model.eval()(s(raw)).argmax(1).numpy()
    assert (run_onnx(path, raw.float()).argmax(1) == expected).all()

    # not baked: the file takes standardized input, and its metadata says how to standardize
    plain = tmp_path / "plain.onnx"
    rep = to_onnx(res.model, plain, input_shape=(1, 8, 8), standardizer=s, bake_standardization=False,
                  check_data=res.test)
    assert rep.input_name == "standardized" and not rep.baked and "Sub" not in op_types(plain)[:1]
    meta = json.loads(metadata(plain)["standardization"])
    assert meta == {"mode": "zscore", "mean": list(s.mean), "std": list(s.std), "baked": False}
    mean = np.array(meta["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.array(meta["std"], np.float32).reshape(1, -1, 1, 1)
    z = (raw.numpy().astype(np.float32) - mean) / std
    got = session(plain).run(None, {"standardized": z})[0]
    assert (got.argmax(1) == expected).all()


@needs_export
def test_metadata_holds_classes_and_how_to_use_the_file(digits):
    _, _, path, _ = digits
    meta = metadata(path)
    assert json.loads(meta["classes"]) == NAMES
    assert meta["bnlab_version"] == __version__
    assert meta["input"].startswith("pixels: float32 (N, C, H, W) = (N, 1, 8, 8), raw pixel values 0..255")
    assert json.loads(meta["standardization"])["baked"] is True
    fold = json.loads(meta["batchnorm_folding"])
    assert len(fold["folded"]) == 2 and fold["left"] == []
    assert str(Path(torch.__file__).parent).encode() not in path.read_bytes()  # no stack traces with local paths


@needs_export
@pytest.mark.parametrize("name, bn", [("deeplizard-cnn", "tutorial"), ("keras-mlp", "before"),
                                      ("ioffe-mlp", "tutorial")])
def test_zoo_models_export_without_batchnorm_nodes(name, bn, tmp_path):
    # deeplizard's BNs sit after a max-pool (before a conv) and after a ReLU (before a Linear):
    # torch.onnx's own optimizer keeps both as BatchNormalization nodes unless bnlab folds them
    model = with_statistics(models.build(name, bn=bn, input_shape=(1, 28, 28), num_classes=10, seed=0), (1, 28, 28))
    report = to_onnx(model, tmp_path / "m.onnx", input_shape=(1, 28, 28), standardizer=SCALE)
    assert report.left == [] and len(report.folded) >= 2
    assert report.batchnorm_nodes == 0 and "BatchNormalization" not in op_types(tmp_path / "m.onnx")
    assert report.max_abs_diff <= 1e-4 and report.top1_agreement == "256/256"
    assert report.check_source == "256 random images (seed 0)"


@needs_export
def test_resnet20_exports_without_batchnorm_nodes(tmp_path):
    torch.manual_seed(0)
    model = with_statistics(resnet20((1, 28, 28), 10), (1, 28, 28))
    report = to_onnx(model, tmp_path / "r.onnx", input_shape=(1, 28, 28), standardizer=SCALE)
    assert len(report.folded) == 21 and report.left == [] and report.batchnorm_nodes == 0
    assert report.max_abs_diff <= 1e-4 and report.top1_agreement == "256/256"
    x = torch.randint(0, 256, (3, 1, 28, 28)).float()
    with torch.no_grad():
        expected = model(SCALE(x)).numpy()
    assert np.abs(run_onnx(tmp_path / "r.onnx", x) - expected).max() <= 1e-4


@needs_export
def test_batchnorm_that_cannot_fold_stays_and_is_reported(tmp_path):
    before = bnn.backend_name()
    model = with_statistics(nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), bnn.BatchNorm1d(32), nn.Sigmoid(),  # BN between activations
        nn.Linear(32, 16), nn.Tanh(), bnn.GhostBatchNorm1d(16), nn.ReLU(),  # a variant, no torch twin
        nn.Linear(16, 10), bnn.BatchNorm1d(10),  # folds into the Linear before it
    ), (1, 8, 8)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = to_onnx(model, tmp_path / "m.onnx", input_shape=(1, 8, 8), standardizer=SCALE)
    # exported and checked in eval mode, on a copy: the network itself is as it was
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert [r["bn"] for r in report.left] == ["3", "7"] and "followed by Sigmoid" in report.left[0]["reason"]
    assert report.folded == [{"bn": "10", "into": "9", "side": "preceding"}]
    assert report.batchnorm_nodes >= 1 and report.max_abs_diff <= 1e-4
    assert "3 left:" in str(report)
    assert bnn.backend_name() == before  # the plain-ops backend was for the export only


class NoisyHead(nn.Module):
    """A network that is random at inference (a layer adding noise whatever its mode): no file can
    reproduce its outputs, and the export-time check must say so."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.bn = nn.BatchNorm1d(10)

    def forward(self, x):
        y = self.bn(self.fc(x.flatten(1)))
        return y + 10 * torch.randn_like(y)


@needs_export
def test_disagreeing_export_raises_and_leaves_no_file(tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=r"disagrees with PyTorch on 256 random images \(seed 0\): max \|diff\| \d.*"
                                          r"top-1 class differs on \d+/256 inputs; nothing written to"):
        to_onnx(NoisyHead().eval(), path, input_shape=(1, 8, 8), standardizer=SCALE)
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"an older export")  # a failed export does not touch an existing file either
    with pytest.raises(ExportError):
        to_onnx(NoisyHead().eval(), path, input_shape=(1, 8, 8), standardizer=SCALE)
    assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == b"an older export"


class Guarded(nn.Module):
    """A Python branch on tensor values: torch.export and torch.fx refuse it; TorchScript's tracer
    records the branch taken."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.bn = nn.BatchNorm1d(10)

    def forward(self, x):
        x = x.flatten(1)
        if x.abs().max() > 1e9:
            x = x * 0
        return self.bn(self.fc(x))


@needs_export
def test_falls_back_to_torchscript_and_unfolded(tmp_path):
    model = with_statistics(Guarded(), (1, 8, 8))
    report = to_onnx(model, tmp_path / "g.onnx", input_shape=(1, 8, 8), standardizer=SCALE)
    assert report.exporter == "torchscript" and report.batchnorm_nodes == 1
    assert report.left[0]["bn"] == "bn" and "cannot trace Guarded" in report.left[0]["reason"]
    x = torch.randint(0, 256, (3, 1, 8, 8)).float()
    with torch.no_grad():
        expected = model(SCALE(x)).numpy()
    assert np.abs(run_onnx(tmp_path / "g.onnx", x) - expected).max() <= 1e-4


@needs_export
def test_export_checkpoint(digits, tmp_path):
    res, ck_path, _, _ = digits
    ck = load_checkpoint(ck_path)
    report = export_checkpoint(ck, tmp_path / "ck.onnx", check_data=res.test)
    assert report.max_abs_diff <= 1e-4 and report.top1_agreement == "256/256" and report.batchnorm_nodes == 0
    meta = metadata(tmp_path / "ck.onnx")
    assert json.loads(meta["classes"]) == ck.classes
    assert meta["model"] == "keras-mlp bn=after" and meta["trained_on"] == "digits"
    assert json.loads(meta["standardization"])["mean"] == list(ck.standardizer.mean)
    with torch.no_grad():
        expected = ck.model(ck.standardizer(res.test.x)).numpy()
    assert np.abs(run_onnx(tmp_path / "ck.onnx", res.test.x.float()) - expected).max() <= 1e-4


@needs_export
def test_feature_table_takes_raw_features(tmp_path):
    res = train(TrainSettings(dataset="iris", model="keras-mlp", bn="after", batch_size=16, lr=0.01, epochs=2),
                progress=False)
    report = to_onnx(res.model, tmp_path / "iris.onnx", input_shape=res.train.input_shape,
                     standardizer=res.train.standardizer, classes=res.train.classes, check_data=res.test)
    assert report.input_name == "features" and report.input_shape == ("N", 4) and report.max_abs_diff <= 1e-4
    with torch.no_grad():
        expected = res.model.eval()(res.train.standardizer(res.test.x)).argmax(1).numpy()
    assert (run_onnx(tmp_path / "iris.onnx", res.test.x).argmax(1) == expected).all()


def test_missing_export_extra_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ConfigError, match=r"^bnlab export needs the export extra: pip install 'bnlab\[export\]'"):
        to_onnx(model, tmp_path / "m.onnx", input_shape=(1, 8, 8))
    assert list(tmp_path.iterdir()) == []


@needs_export
def test_arguments_that_do_not_fit_the_model(digits, tmp_path):
    res, _, _, _ = digits
    with pytest.raises(ConfigError, match="3 channel"):
        to_onnx(res.model, tmp_path / "m.onnx", input_shape=(1, 8, 8),
                standardizer=Standardizer("zscore", (1.0, 2.0, 3.0), (1.0, 1.0, 1.0)))
    with pytest.raises(ConfigError, match="3 class names for a network with 10 outputs"):
        to_onnx(res.model, tmp_path / "m.onnx", input_shape=(1, 8, 8), classes=["a", "b", "c"])
    with pytest.raises(ConfigError, match="has examples of shape"):
        to_onnx(res.model, tmp_path / "m.onnx", input_shape=(1, 8, 8),
                check_data=Dataset("iris", "test", torch.zeros(5, 4), torch.zeros(5, dtype=torch.long), NAMES))
    assert list(tmp_path.iterdir()) == []


def test_export_command(tmp_path, capsys):
    from bnlab.cli import main

    ck, out = tmp_path / "k.pt", tmp_path / "k.onnx"
    assert main(["train", "--dataset", "digits", "--model", "keras-mlp", "--bn", "before", "--batch-size", "64",
                 "-o", str(ck), "--json"]) == 0
    capsys.readouterr()
    assert main(["export", str(ck), "-o", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["batchnorm_nodes"] == 0 and rep["top1_agree"] == rep["checked"] == 256 and rep["baked"]
    assert rep["max_abs_diff"] <= 1e-4 and out.stat().st_size == rep["file_size"]
    assert main(["export", str(tmp_path / "absent.pt"), "-o", str(tmp_path / "x.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()
