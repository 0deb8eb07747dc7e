import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bnlab.cli import main
from bnlab.errors import CheckpointError, ConfigError, DataFormatError
from bnlab.train import (Augment, Callback, TrainSettings, evaluate, fit, load_checkpoint, predict_images, train)
from conftest import make_idx_dataset

DIGITS = dict(dataset="digits", model="keras-mlp", batch_size=64, lr=0.01)


def test_same_seed_same_history():
    a = train(TrainSettings(**DIGITS, bn="after", epochs=2, seed=3, dropout=0.3)).history.epochs
    b = train(TrainSettings(**DIGITS, bn="after", epochs=2, seed=3, dropout=0.3)).history.epochs
    c = train(TrainSettings(**DIGITS, bn="after", epochs=2, seed=4, dropout=0.3)).history.epochs
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)


def test_learns_digits_and_records_metrics():
    h = train(TrainSettings(**DIGITS, bn="before", epochs=3, seed=0)).history
    assert h.status == "done" and len(h.epochs) == 3
    assert set(h.epochs[0]) == {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"}
    assert h.epochs[-1]["test_acc"] > 0.9 and h.epochs[-1]["train_loss"] < h.epochs[0]["train_loss"]
    assert h.steps == 3 * -(-1347 // 64)


def test_huge_lr_diverges_without_crash():
    h = train(TrainSettings(**{**DIGITS, "lr": 1e12, "optimizer": "sgd"}, epochs=3, seed=0)).history
    assert h.status == "diverged" and "non-finite loss" in h.stop_reason


def test_early_stopping_and_callbacks():
    seen = []

    class Count(Callback):
        def on_batch_end(self, state):
            seen.append(state.step)

    res = train(TrainSettings(**{**DIGITS, "lr": 0.5, "optimizer": "sgd"}, epochs=30, seed=0, early_stopping=1),
                callbacks=[Count()])
    h = res.history
    assert len(h.epochs) < 30 and "early stopping" in h.stop_reason
    assert seen == list(range(1, h.steps + 1))


def test_last_batch_of_one_is_dropped_for_bn(tmp_path):
    d = make_idx_dataset(tmp_path / "m", n_train=21, n_test=5)
    h = train(TrainSettings(dataset="mnist", data_dir=str(d), model="keras-mlp", bn="after", batch_size=10, epochs=1)).history
    assert h.status == "done" and h.steps == 2


def test_augment_keeps_shape_and_is_seeded():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    a = Augment(flip=1.0, shift=0)(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, x.flip(-1))
    s1 = Augment(flip=0.0, shift=2)(x, torch.Generator().manual_seed(1))
    s2 = Augment(flip=0.0, shift=2)(x, torch.Generator().manual_seed(1))
    assert s1.shape == x.shape and torch.equal(s1, s2)
    # every output pixel is either an input pixel or the padding value
    assert set(s1.unique().tolist()) <= set(x.unique().tolist())
    h = train(TrainSettings(**DIGITS, epochs=1, augment=True)).history
    assert h.status == "done"


@pytest.mark.parametrize("opt", ["adam", "sgd", "momentum", "adamw"])
def test_optimizers(opt):
    h = train(TrainSettings(**{**DIGITS, "optimizer": opt, "lr": 0.05 if "sgd" in opt or opt == "momentum" else 0.01},
                            epochs=1)).history
    assert h.status == "done" and h.epochs[0]["test_acc"] > 0.5


def test_settings_validation():
    for bad, needle in [({"lr": -1.0}, "lr must be a positive"), ({"epochs": 0}, "epochs must be"),
                        ({"batch_size": 0}, "batch_size"), ({"dataset": "imagenet"}, "unknown dataset"),
                        ({"bn": "sideways"}, "bn='sideways'"), ({"optimizer": "lbfgs"}, "optimizer")]:
        with pytest.raises(ConfigError, match=needle):
            TrainSettings(**bad).validate()
    with pytest.raises(ConfigError, match="unknown setting"):
        TrainSettings.from_dict({"learning_rate": 1})


def test_checkpoint_round_trip_and_evaluate_matches(tmp_path):
    ck = tmp_path / "sub" / "m.pt"
    res = train(TrainSettings(**DIGITS, bn="after", epochs=2), checkpoint=ck)
    payload = torch.load(ck, weights_only=True)  # no arbitrary pickles
    assert payload["format"] == "bnlab-checkpoint"
    loaded = load_checkpoint(ck)
    rep = evaluate(loaded.model, res.test)
    assert rep["accuracy"] == pytest.approx(res.history.epochs[-1]["test_acc"])
    assert rep["loss"] == pytest.approx(res.history.epochs[-1]["test_loss"], rel=1e-5)
    assert loaded.standardizer == res.train.standardizer and loaded.classes == res.train.classes


def test_evaluate_report_against_sklearn():
    from sklearn.metrics import classification_report

    res = train(TrainSettings(**DIGITS, epochs=1))
    rep = evaluate(res.model, res.test)
    res.model.eval()
    with torch.no_grad():
        pred = torch.cat([res.model(x).argmax(1) for x, _ in res.test.batches(100)]).numpy()
    ref = classification_report(res.test.y.numpy(), pred, output_dict=True, zero_division=0)
    for i, row in enumerate(rep["per_class"]):
        assert row["precision"] == pytest.approx(ref[str(i)]["precision"])
        assert row["recall"] == pytest.approx(ref[str(i)]["recall"])
        assert row["support"] == ref[str(i)]["support"]
    assert rep["accuracy"] == pytest.approx(ref["accuracy"])
    assert np.asarray(rep["confusion"]).sum() == len(res.test)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a bnlab checkpoint"):
        load_checkpoint(other)


def test_predict_on_written_pngs(tmp_path):
    d = make_idx_dataset(tmp_path / "m", n_train=200, n_test=50)
    ck = tmp_path / "m.pt"
    res = train(TrainSettings(dataset="mnist", data_dir=str(d), model="keras-mlp", bn="after", batch_size=50,
                              epochs=2), checkpoint=ck)
    loaded = load_checkpoint(ck)
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(res.test.x[i, 0].numpy()).save(p)
        paths.append(p)
    big = tmp_path / "big.png"
    Image.fromarray(np.full((56, 40, 3), 200, np.uint8)).save(big)  # RGB, other size: converted
    out = predict_images(loaded, paths + [big], top_k=3)
    res.model.eval()
    with torch.no_grad():
        expected = res.model(next(res.test.batches(3))[0]).softmax(1)
    for i in range(3):
        top = out[i]["top"]
        assert len(top) == 3 and top[0]["probability"] >= top[1]["probability"]
        assert top[0]["index"] == int(expected[i].argmax())
        assert top[0]["probability"] == pytest.approx(float(expected[i].max()), rel=1e-5)
    inv = tmp_path / "inv.png"
    Image.fromarray(255 - res.test.x[0, 0].numpy()).save(inv)
    again = predict_images(loaded, [inv], top_k=1, invert=True)[0]["top"][0]
    assert again["index"] == out[0]["top"][0]["index"]
    assert again["probability"] == pytest.approx(out[0]["top"][0]["probability"], rel=1e-6)
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    with pytest.raises(DataFormatError, match="notes.png is not an image"):
        predict_images(loaded, [bad])


def test_cli_train_json_and_errors(capsys, tmp_path):
    code = main(["train", "--dataset", "digits", "--model", "keras-mlp", "--batch-size", "64", "--epochs", "2",
                 "--bn", "after", "--json", "--checkpoint", str(tmp_path / "c.pt")])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["status"] == "done" and len(out["epochs"]) == 2
    assert set(out["epochs"][0]) == {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"}
    assert out["settings"]["bn"] == "after"
    code = main(["evaluate", str(tmp_path / "c.pt"), "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert code == 0 and rep["accuracy"] == pytest.approx(out["epochs"][-1]["test_acc"])
    code = main(["evaluate", str(tmp_path / "c.pt"), "--confusion", str(tmp_path / "cm.png")])
    assert code == 0 and (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
    for argv, needle in [(["train", "--lr", "-1"], "lr must be a positive"),
                         (["train", "--model", "nope"], "unknown model 'nope'"),
                         (["train", "--dataset", "nope"], "unknown dataset 'nope'"),
                         (["train", "--epochs", "0"], "epochs must be at least 1"),
                         (["evaluate", str(tmp_path / "missing.pt")], "does not exist"),
                         (["predict", str(tmp_path / "c.pt"), str(tmp_path / "c.pt")], "is not an image")]:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and needle in err and err.startswith("bnlab: error:"), (argv, err)


def test_cli_diverged_json(capsys):
    code = main(["train", "--dataset", "digits", "--model", "keras-mlp", "--optimizer", "sgd", "--lr", "1e12",
                 "--batch-size", "64", "--epochs", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["status"] == "diverged"


def test_progress_bar_silent_when_not_a_tty(tmp_path):
    r = subprocess.run([str(Path(sys.executable).parent / "bnlab"), "train", "--dataset", "digits", "--model",
                        "keras-mlp", "--batch-size", "64", "--epochs", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "batch/s" not in r.stderr and "it/s" not in r.stderr and "\r" not in r.stderr
    assert "epoch   1" in r.stdout


def test_progress_bar_shows_on_a_tty():
    import io

    class FakeTTY(io.StringIO):
        def isatty(self):
            return True

    from bnlab.data import load

    train_ds = load("digits", "train", standardize="zscore")
    from bnlab import models

    m = models.build("keras-mlp", input_shape=train_ds.input_shape, num_classes=10)
    err = FakeTTY()
    old = sys.stderr
    sys.stderr = err
    try:
        fit(m, train_ds, None, batch_size=32, epochs=1)
    finally:
        sys.stderr = old
    assert "epoch 1/1" in err.getvalue()


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_lr_schedules_peak_at_lr_and_anneal(schedule):
    from bnlab import models
    from bnlab.data import load

    seen = []

    class LR(Callback):
        def on_batch_end(self, state):
            seen.append(state.optimizer.param_groups[0]["lr"])

    tr = load("digits", "train", standardize="zscore")
    m = models.build("keras-mlp", input_shape=tr.input_shape, num_classes=10)
    fit(m, tr, None, lr=0.05, batch_size=128, epochs=3, schedule=schedule, callbacks=[LR()], progress=False)
    assert max(seen) == pytest.approx(0.05, rel=0.05) and seen[-1] < 0.05 * 0.05
    if schedule == "onecycle":
        assert seen[0] < 0.05 * 0.1 and seen.index(max(seen)) > 0
    with pytest.raises(ConfigError, match="schedule"):
        TrainSettings(schedule="step").validate()


@pytest.mark.slow
def test_demo_runs_end_to_end(capsys, tmp_path):
    from conftest import FMNIST_DIR

    if not Path(FMNIST_DIR).is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    code = main(["demo", "--epochs", "1", "--seeds", "1", "--workers", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "train 60000, test 10000" in out and "bn=tutorial vs bn=none" in out
    for name in ("fashion-mnist-grid.png", "curves.png", "report.html", "bnlab.db"):
        assert (tmp_path / name).is_file()


def test_early_stopping_watches_accuracy_upwards():
    from types import SimpleNamespace

    from bnlab.train.callbacks import EarlyStopping

    def run(cb, values, key):
        state = SimpleNamespace(history=SimpleNamespace(epochs=[]), stop=False, stop_reason=None)
        for i, v in enumerate(values, 1):
            state.history.epochs.append({key: v})
            cb.on_epoch_end(state)
            if state.stop:
                return i
        return None

    assert run(EarlyStopping(patience=2, metric="test_acc"), [0.5, 0.6, 0.7, 0.8], "test_acc") is None  # improving
    assert run(EarlyStopping(patience=2, metric="test_acc"), [0.8, 0.7, 0.6, 0.9], "test_acc") == 3
    assert run(EarlyStopping(patience=2), [1.0, 0.9, 0.95, 0.97], "test_loss") == 4
    assert run(EarlyStopping(patience=1, metric="test_loss", mode="max"), [1.0, 0.5], "test_loss") == 2


def test_zoo_specs_are_copies_and_tracker_arguments_are_checked():
    from bnlab.errors import ConfigError
    from bnlab.models.zoo import get_spec
    from bnlab.train.activations import ActivationTracker

    get_spec("keras-mlp")["layers"].clear()
    assert get_spec("keras-mlp")["layers"]  # the zoo itself is unchanged
    with pytest.raises(ConfigError, match="every"):
        ActivationTracker(every=0)
