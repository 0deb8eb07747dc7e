"""The CLI a newcomer meets: recipes by name, overrides, one flag per meaning, help with defaults,
the effective settings up front; and the callbacks and DataFrames under it."""

import json
import os

import pytest

from bnlab.cli import build_parser, main
from bnlab.experiments import RunStore, load_config, recipe_names, results


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("bnlab: error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err


def test_recipes_list_and_show_work_from_any_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing of the repository around
    assert main(["recipes", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in listed] == recipe_names() and "deeplizard" in recipe_names()
    assert all(r["runs"] >= 2 for r in listed)
    assert main(["recipes", "show", "deeplizard"]) == 0
    (tmp_path / "mine.toml").write_text(capsys.readouterr().out)
    assert load_config(tmp_path / "mine.toml").to_dict() == load_config("deeplizard").to_dict() | {}
    assert main(["recipes", "show", "deeplizzard"]) == 2
    one_line_error(capsys, "no recipe named 'deeplizzard'", "did you mean 'deeplizard'")


def test_sweep_by_recipe_name_with_overrides_recorded(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = str(tmp_path / "s.db")
    args = ["sweep", "keras-mlp", "--store", db, "--quiet", "--json", "--threads", "1", "--set", "dataset=digits",
            "--set", "epochs=1", "--set", "seeds=[0]", "--set", "bn=after", "--set", "batch_size=64"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total"] == 1 and out["counts"] == {"done": 1}  # the gridded bn became fixed: one run
    with RunStore(db) as st:
        (version,) = st.sweep_versions(out["sweep"])
        run = st.runs(out["sweep"])[0]
    assert version["config"]["overrides"] == {"dataset": "digits", "epochs": 1, "seeds": [0], "bn": "after",
                                              "batch_size": 64}
    assert run["settings"]["bn"] == "after" and run["settings"]["dataset"] == "digits"
    assert main(args[:-2] + ["--set", "batch_sise=64"]) == 2
    one_line_error(capsys, "--set batch_sise: no such setting", "did you mean 'batch_size'")
    assert main(args[:-2] + ["--set", "batch_size"]) == 2
    one_line_error(capsys, "write KEY=VALUE")
    assert main(args[:-2] + ["--set", "batch_size=1"]) == 2  # checked like any config value
    one_line_error(capsys, "batch_size")


def test_results_as_a_dataframe(tmp_path):
    db = str(tmp_path / "s.db")
    cfg = load_config("keras-mlp").override({"dataset": "digits", "epochs": 1, "seeds": [0, 1], "batch_size": 64,
                                             "train_limit": 300})
    from bnlab.experiments import run_sweep

    run_sweep(cfg, db, threads=1, log=lambda m: None)
    df = results(db, cfg.name)
    assert len(df) == 4 and {"bn", "seed", "test_acc", "train_acc", "status"} <= set(df.columns)
    assert list(df["test_acc"]) == sorted(df["test_acc"], reverse=True)  # best first
    g = results(db, cfg.name, by="bn")
    assert sorted(g["bn"]) == ["after", "none"] and list(g["runs"]) == [2, 2]
    assert list(g["test_acc_mean"]) == sorted(g["test_acc_mean"], reverse=True)
    assert results(db, cfg.name, where="bn=none")["bn"].unique().tolist() == ["none"]


def test_every_option_shows_its_default_and_the_same_flags_mean_the_same():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    nested = {f"{name} {n}": q for name, p in sub.items() for a in p._actions
              if not a.option_strings and isinstance(a.choices, dict) for n, q in a.choices.items()}
    assert {"data show", "models show", "recipes list"} <= set(nested)
    for name, p in {**sub, **nested}.items():
        for action in p._actions:
            if not action.option_strings or action.help == "==SUPPRESS==" or action.dest == "help":
                continue
            assert action.help, f"bnlab {name} {action.option_strings[0]} has no help"
            if action.default not in (None, False, []):
                text = " ".join(p.format_help().split())
                assert "default" in (action.help or "") or f"(default {action.default}" in text, (name, action.dest)
        outputs = [a for a in p._actions if "-o" in a.option_strings]
        for a in outputs:
            assert "--output" in a.option_strings and a.dest == "output", name
    for name in ("results", "plot", "compare", "report"):
        assert any("--by" in a.option_strings for a in sub[name]._actions), name
    for name in ("evaluate", "predict", "doctor", "fold", "plot-activations"):
        first = next(a for a in sub[name]._actions if not a.option_strings)
        assert first.dest == "checkpoint", name


def test_old_spellings_still_work(tmp_path, capsys):
    ck = tmp_path / "m.pt"
    assert main(["train", "--dataset", "digits", "--model", "keras-mlp", "--batch-size", "64", "--checkpoint", str(ck),
                 "--json"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(ck), "--confusion", str(tmp_path / "cm.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["confusion_png"] == str(tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"


def test_train_prints_its_effective_settings_first(capsys):
    assert main(["train", "--dataset", "digits", "--model", "keras-mlp", "--bn", "after", "--batch-size", "64",
                 "--optimizer", "momentum", "--lr", "0.05", "--quiet"]) == 0
    first, second, third = capsys.readouterr().out.splitlines()[:3]
    assert first.startswith("keras-mlp (bn=after, norm=batch") and "digits: 1347 train / 450 test" in first
    assert "momentum lr 0.05" in second and "batch size 64" in second and "momentum 0.9" in second
    assert "device cpu" in second and "thread(s)" in second
    assert third.startswith("epoch   1")


def test_unknown_names_get_a_did_you_mean(capsys):
    assert main(["train", "--model", "keras-mpl", "--dataset", "digits"]) == 2
    one_line_error(capsys, "unknown model 'keras-mpl'", "did you mean 'keras-mlp'")
    assert main(["sweep", "deeplizrd"]) == 2
    one_line_error(capsys, "did you mean 'deeplizard'")
    assert main(["data", "info", "fashon-mnist"]) == 2
    one_line_error(capsys, "did you mean 'fashion-mnist'")
    assert main(["reproduce", "iofe"]) == 2
    one_line_error(capsys, "did you mean 'ioffe'")


def test_callbacks_see_the_end_even_when_training_raises():
    import torch

    from bnlab import data, models
    from bnlab.train import Callback, fit

    tr, te = data.load_splits("digits")
    net = models.build("keras-mlp", input_shape=tr.input_shape, num_classes=10, seed=0)
    seen = []

    class Boom(Callback):
        def on_batch_end(self, state):
            if state.step == 3:
                raise RuntimeError("boom")

    class Watch(Callback):
        def on_train_end(self, state):
            seen.append((state.history.status, state.step, net.training))

    with pytest.raises(RuntimeError, match="boom"):
        fit(net, tr, te, batch_size=64, callbacks=[Watch(), Boom()], progress=False)
    assert seen == [("failed", 3, False)]
    assert isinstance(torch.get_num_threads(), int)


def test_tensorboard_logger_is_a_callback_with_activation_histograms(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bnlab import data, models
    from bnlab.train import ActivationTracker, fit
    from bnlab.train.tensorboard import TensorBoardLogger

    tr, te = data.load_splits("digits")
    net = models.build("ioffe-mlp", bn="tutorial", input_shape=tr.input_shape, num_classes=10, seed=0)
    tracker = ActivationTracker(every=5)
    tb = TensorBoardLogger(tmp_path, "t", "r1", {"bn": "tutorial"}, tracker=tracker)
    fit(net, tr, te, batch_size=64, epochs=2, callbacks=[tracker, tb], progress=False)
    acc = EventAccumulator(str(tb.dir), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("test/acc")] == [1, 2]
    hist = acc.Histograms("activations/9:Sigmoid")
    steps = sorted({r["step"] for r in tracker.records if r["layer"] == "9:Sigmoid"})
    assert [h.step for h in hist] == steps and len(steps) > 3
    h = hist[-1].histogram_value
    snap = [r for r in tracker.records if r["layer"] == "9:Sigmoid"][-1]
    assert h.min == pytest.approx(snap["q"][0]) and h.max == pytest.approx(snap["q"][-1])
    assert os.listdir(tb.dir)


def test_unwritable_figure_and_report_outputs_are_one_line(tmp_path, capsys):
    """Every -o that cannot be written is one line and exit 2 (not a traceback); reproduce -o is
    checked before any run starts."""
    folder = tmp_path / "a-folder"
    folder.mkdir()
    for target in ("/proc/no-such-place/x.png", str(folder)):
        assert main(["data", "show", "digits", "-o", target]) == 2
        one_line_error(capsys, target)
    db = tmp_path / "r.db"
    assert main(["reproduce", "resnet20", "--quick", "--store", str(db), "-o", "/proc/f.png"]) == 2
    one_line_error(capsys, "cannot write figure /proc/f.png")
    assert not db.exists()  # refused before the sweep touched the store


def test_compare_names_every_setting_to_fix_at_once(tmp_path, capsys):
    from bnlab.experiments import run_sweep
    from bnlab.experiments.config import parse_config

    db = str(tmp_path / "c.db")
    for lr, epochs in ((0.01, 1), (0.05, 2)):
        cfg = parse_config({"name": "mix", "dataset": "digits", "seeds": [0, 1],
                            "fixed": {"model": "keras-mlp", "lr": lr, "epochs": epochs, "batch_size": 256},
                            "grid": {"bn": ["none", "after"]}})
        run_sweep(cfg, db, log=lambda m: None)
    assert main(["compare", "--store", db, "--sweep", "mix", "--by", "bn"]) == 2
    err = capsys.readouterr().err
    suggestion = err.split("choose one with --where ")[1].strip()
    assert set(dict(kv.split("=") for kv in suggestion.split(","))) == {"lr", "epochs"}
    assert main(["compare", "--store", db, "--sweep", "mix", "--by", "bn", "--where", suggestion, "--json"]) == 0
    tests = json.loads(capsys.readouterr().out)["tests"]
    assert tests and "points" in tests[0]["verdict"]  # accuracy differences in points, not fractions


def test_train_checks_the_model_before_loading_data_or_printing(capsys, tmp_path):
    for model, needle in (("deeplizrd-cnn", "did you mean 'deeplizard-cnn'"),
                          (f"{tmp_path}/nothere.py:make", "does not exist"),
                          ("fast-cnn --bn tutorial", "has no tutorial BN placement")):
        assert main(["train", "--model", *model.split(), "--dataset", "digits"]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # no settings printed for a run that cannot start
        assert captured.err.startswith("bnlab: error: ") and captured.err.count("\n") == 1 and needle in captured.err


def test_a_data_dir_without_the_dataset_is_an_error(tmp_path, capsys):
    from tests.conftest import FMNIST_DIR

    if not os.path.isdir(FMNIST_DIR):
        pytest.skip("Fashion-MNIST is not installed")
    assert main(["data", "info", "fashion-mnist", "--data-dir", str(tmp_path)]) == 2
    one_line_error(capsys, f"--data-dir {tmp_path} does not hold fashion-mnist", "leave out --data-dir")


def test_quick_size_of_a_recipe():
    cfg = load_config("resnet20")
    quick = cfg.quick_size()
    assert quick.name == "resnet20-quick" and quick.size() == cfg.size()
    assert quick.fixed["epochs"] < cfg.fixed["epochs"] and quick.fixed["train_limit"] < cfg.fixed["train_limit"]
    assert quick.overrides == cfg.quick
    from bnlab.experiments.config import parse_config

    plain = parse_config({"name": "p", "dataset": "digits", "fixed": {"model": "keras-mlp"}})
    with pytest.raises(Exception, match="no --quick size"):
        plain.quick_size()
    for name in recipe_names():  # every shipped recipe has a quick size, and it is smaller
        full = load_config(name)
        q = full.quick_size()
        assert q.name.endswith("-quick") and q.overrides

        def work(c):  # runs x epochs x training examples (60,000 when not limited)
            return c.size() * c.fixed.get("epochs", 1) * c.fixed.get("train_limit", 60000)

        assert work(q) < work(full), name


@pytest.mark.parametrize("argv,needle", [
    (["trian"], "invalid choice: 'trian'"), (["sweep"], "the following arguments are required: config"),
    (["train", "--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
    (["train", "--bn", "befor"], "did you mean 'before'?"),
    (["sweep", "c.toml", "--executer", "ray"], "unrecognized arguments: --executer ray; did you mean '--executor'?"),
])
def test_usage_mistakes_are_one_line_naming_the_help(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bnlab: error: ") and needle in err
    assert err.rstrip().endswith(f"(see 'bnlab{' ' + argv[0] if argv[0] != 'trian' else ''} --help')")
