import json

import pytest
import torch
from torch import nn

from bnlab import models
from bnlab.cli import main
from bnlab.data import load
from bnlab.inspect import ActivationTracker, default_layers, shift_summary, snapshot
from bnlab.train import TrainSettings, fit, train


def test_snapshot_percentiles_equal_torch_quantile():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 5, 5) * 2 + 1
    s = snapshot(x, (15, 50, 85))
    flat = x.reshape(-1).double()
    for p in (15, 50, 85):
        assert s[f"p{p}"] == pytest.approx(float(torch.quantile(flat, p / 100)), abs=1e-12)
    assert s["mean"] == pytest.approx(float(flat.mean())) and s["std"] == pytest.approx(float(flat.std(unbiased=False)))
    assert len(s["q"]) == 99 and s["q"][49] == pytest.approx(s["p50"])


def test_tracker_records_the_tensors_the_layers_saw():
    tr = load("digits", "train", standardize="zscore")
    torch.manual_seed(0)
    m = models.build("ioffe-mlp", bn="tutorial", input_shape=tr.input_shape, num_classes=10)
    seen = {}

    def grab(name):
        def hook(mod, args):
            seen.setdefault(name, []).append(args[0].detach().clone())
        return hook

    layers = default_layers(m)
    assert list(layers) == ["3:Sigmoid", "6:Sigmoid", "9:Sigmoid"]
    for name, mod in layers.items():
        mod.register_forward_pre_hook(grab(name))
    tracker = ActivationTracker(m, every=5, percentiles=(10, 50, 90), max_examples=40)
    fit(m, tr, None, optimizer="sgd", lr=0.1, batch_size=100, epochs=1, callbacks=[tracker], progress=False)
    steps = sorted({r["step"] for r in tracker.records})
    assert steps == [1, 5, 10]
    for r in tracker.records:
        x = seen[r["layer"]][r["step"] - 1][:40].reshape(-1).double()  # the first 40 examples of the batch
        assert r["p10"] == pytest.approx(float(torch.quantile(x, 0.10)))
        assert r["p90"] == pytest.approx(float(torch.quantile(x, 0.90)))
    # hooks are removed after training
    assert all(len(mod._forward_pre_hooks) == 1 for mod in layers.values())  # only our `grab`


def test_tracking_leaves_outputs_and_gradients_unchanged():
    tr = load("digits", "train", standardize="zscore")
    results = []
    for track in (False, True):
        torch.manual_seed(0)
        m = models.build("ioffe-mlp", bn="before", input_shape=tr.input_shape, num_classes=10)
        cbs = [ActivationTracker(every=1)] if track else []
        h = fit(m, tr, None, optimizer="sgd", lr=0.1, batch_size=64, epochs=2, callbacks=cbs, progress=False)
        results.append((h.epochs, [p.detach().clone() for p in m.parameters()]))
    strip = lambda es: [{k: v for k, v in e.items() if k != "seconds"} for e in es]  # noqa: E731
    assert strip(results[0][0]) == strip(results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_shift_summary_is_mean_w1_between_snapshots():
    recs = [{"step": 1, "layer": "a", "q": [0.0] * 99}, {"step": 2, "layer": "a", "q": [1.0] * 99},
            {"step": 3, "layer": "a", "q": [1.5] * 99}, {"step": 1, "layer": "b", "q": [0.0] * 99},
            {"step": 2, "layer": "b", "q": [0.0] * 99}, {"step": 2, "layer": "test", "test_acc": 0.5}]
    s = shift_summary(recs)
    assert s["ics_w1_per_layer"] == {"a": pytest.approx(0.75), "b": 0.0}
    assert s["ics_w1"] == pytest.approx(0.375)
    # against scipy's 1-D Wasserstein distance on samples
    from scipy.stats import wasserstein_distance

    torch.manual_seed(0)
    a, b = torch.randn(20000), torch.randn(20000) * 1.5 + 0.7
    sa, sb = snapshot(a), snapshot(b)
    w = shift_summary([{"step": 1, "layer": "x", **sa}, {"step": 2, "layer": "x", **sb}])["ics_w1"]
    assert w == pytest.approx(wasserstein_distance(a.numpy(), b.numpy()), rel=0.05)


def test_bn_reduces_shift_and_sweep_stores_activations(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('name = "ics"\ndataset = "digits"\nseeds = [0]\n[fixed]\nmodel = "ioffe-mlp"\noptimizer = "sgd"\n'
                   'lr = 0.5\nbatch_size = 60\nepochs = 3\ntrack_activations = true\ntrack_every = 10\n'
                   'track_test_acc = true\n[grid]\nbn = ["none", "tutorial"]\n')
    store = str(tmp_path / "s.db")
    assert main(["sweep", str(cfg), "--store", store, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["results", "--store", store, "--sweep", "ics", "--format", "json"]) == 0
    res = {r["bn"]: r for r in json.loads(capsys.readouterr().out)}
    assert res["none"]["summary.ics_w1"] > 0 and res["tutorial"]["summary.ics_w1"] > 0
    from bnlab.experiments import RunStore

    with RunStore(store) as st:
        acts = st.activations(res["tutorial"]["run_id"])
    assert {a["layer"] for a in acts} == {"3:Sigmoid", "6:Sigmoid", "9:Sigmoid", "test"}
    assert all(0 <= a["test_acc"] <= 1 for a in acts if a["layer"] == "test")
    capsys.readouterr()
    assert main(["results", "--store", store, "--sweep", "ics", "--sort", "summary.ics_w1"]) == 0
    assert "summary.ics_w1" in capsys.readouterr().out
    from bnlab.experiments import compare, rows

    with RunStore(store) as st:
        c = compare(rows(st.runs("ics")), "bn", "summary.ics_w1")
    assert {lv["bn"] for lv in c["levels"]} == {"none", "tutorial"} and c["levels"][0]["n"] == 1
    out = tmp_path / "ics.png"
    assert main(["plot-activations", "--store", store, "--run", res["tutorial"]["run_id"][:8], "--layer", "9",
                 "-o", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["plot-activations", "--store", store, "--run", res["none"]["run_id"], "--layer", "42",
                 "-o", str(out)]) == 2
    assert "no tracked layer '42'" in capsys.readouterr().err


def test_train_cli_tracks_into_checkpoint(tmp_path, capsys):
    ck = tmp_path / "m.pt"
    assert main(["train", "--dataset", "digits", "--model", "ioffe-mlp", "--bn", "tutorial", "--batch-size", "64",
                 "--epochs", "1", "--track-activations", "--every", "5", "--checkpoint", str(ck), "--json",
                 "--tensorboard", str(tmp_path / "tb")]) == 0
    out = json.loads(capsys.readouterr().out)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(out["tensorboard"], size_guidance={"histograms": 0})
    acc.Reload()
    assert "test/acc" in acc.Tags()["scalars"] and "activations/9:Sigmoid" in acc.Tags()["histograms"]
    assert out["activations"]["ics_w1"] is not None and set(out["activations"]["ics_w1_per_layer"]) == {"3:Sigmoid", "6:Sigmoid", "9:Sigmoid"}
    assert main(["plot-activations", "--checkpoint", str(ck), "-o", str(tmp_path / "a.png")]) == 0


# ------------------------------------------------------------------ doctor

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("doc") / "m.pt"
    train(TrainSettings(dataset="digits", model="keras-mlp", bn="before", batch_size=64, epochs=8, seed=0),
          checkpoint=path)
    return path


def test_doctor_flags_corrupted_running_mean_and_fix_restores(trained, tmp_path, capsys):
    code = main(["doctor", str(trained), "--json"])
    healthy = json.loads(capsys.readouterr().out)
    assert code == (1 if healthy["problems"] else 0)  # the exit status tells scripts about problems
    d = torch.load(trained, weights_only=True)
    d["state_dict"]["2.running_mean"] += 5.0  # the first BN layer
    bad = tmp_path / "bad.pt"
    torch.save(d, bad)
    assert main(["doctor", str(bad), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    first = rep["layers"][0]
    assert first["layer"] == "2" and first["status"] == "warn" and first["mean_error_max"] > 1
    assert "running statistics disagree" in first["findings"][0]
    assert rep["eval_acc"] < healthy["eval_acc"] - 0.2
    assert rep["network_findings"] and rep["problems"] > healthy["problems"]
    fixed = tmp_path / "fixed.pt"
    assert main(["doctor", str(bad), "--fix", "-o", str(fixed)]) == 1  # the status describes the input
    text = capsys.readouterr().out
    assert "recalibrated" in text and str(fixed) in text
    assert main(["evaluate", str(fixed), "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)["accuracy"]
    assert acc >= healthy["eval_acc"] - 0.01
    code = main(["doctor", str(fixed), "--json"])
    after = json.loads(capsys.readouterr().out)
    assert after["layers"][0]["status"] == "ok" and code == (1 if after["problems"] else 0)


def test_doctor_small_batches_and_odd_settings(tmp_path, capsys):
    ck = tmp_path / "small.pt"
    train(TrainSettings(dataset="digits", model="keras-mlp", bn="after", batch_size=4, epochs=1, seed=0), checkpoint=ck)
    assert main(["doctor", str(ck), "--json"]) == 1  # a finding: exit status 1
    rep = json.loads(capsys.readouterr().out)
    assert any("values per channel" in f and "Ghost BN" in f for r in rep["layers"] for f in r["findings"])
    assert main(["doctor", str(ck), "--fix"]) == 2
    assert "--fix needs -o" in capsys.readouterr().err


def test_doctor_on_net_without_bn(tmp_path, capsys):
    ck = tmp_path / "plain.pt"
    train(TrainSettings(dataset="digits", model="keras-mlp", batch_size=64, epochs=1), checkpoint=ck)
    assert main(["doctor", str(ck)]) == 0
    assert "no batch-norm layers" in capsys.readouterr().out
