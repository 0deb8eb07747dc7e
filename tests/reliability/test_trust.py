"""Trust: no silent wrong answers, no lost work, one-line errors (docs/reliability.md lists each promise).

Every test here failed before the fix it guards.
"""

import json
import os
import resource
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnlab.cli import main
from bnlab.errors import CheckpointError, ConfigError
from bnlab.train import TrainSettings, fit, load_checkpoint, train

BNLAB = str(Path(sys.executable).parent / "bnlab")
DIGITS = dict(dataset="digits", model="keras-mlp", batch_size=64)


def one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("bnlab: error: ") and err.count("\n") == 1 and needle in err, err
    return err


def write_sweep(path, epochs, seeds=(0, 1)):
    path.write_text(f'name = "mix"\ndataset = "digits"\nseeds = {list(seeds)}\n[fixed]\nmodel = "keras-mlp"\n'
                    f'batch_size = 128\nepochs = {epochs}\ntrain_limit = 600\n[grid]\nbn = ["none", "after"]\n')
    return path


# ---------------------------------------------------------------- 1. statistics never pool experiments

@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory):
    """One sweep name run twice: 1 epoch, then (config edited) 2 epochs."""
    d = tmp_path_factory.mktemp("mixed")
    db = d / "s.db"
    for epochs in (1, 2):
        assert main(["sweep", str(write_sweep(d / "c.toml", epochs)), "--store", str(db), "--quiet"]) == 0
    return db


def test_results_group_by_splits_experiments(mixed_store, capsys):
    capsys.readouterr()
    assert main(["results", "--store", str(mixed_store), "--sweep", "mix", "--group-by", "bn", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)
    # 2 bn levels x 2 epoch settings, 2 seeds each: never 4 runs pooled per bn level
    assert sorted((g["bn"], g["epochs"], g["runs"]) for g in groups) == [
        ("after", 1, 2), ("after", 2, 2), ("none", 1, 2), ("none", 2, 2)]
    assert main(["results", "--store", str(mixed_store), "--sweep", "mix", "--group-by", "bn"]) == 0
    out = capsys.readouterr().out
    assert "grouped by epochs too" in out and "--where epochs=2" in out
    assert "was run with 2 configs" in out and "epochs: 1 -> 2" in out


def test_compare_refuses_to_pool_and_where_chooses(mixed_store, capsys):
    assert main(["compare", "--store", str(mixed_store), "--sweep", "mix", "--by", "bn"]) == 2
    one_line_error(capsys, "--where epochs=2")
    assert main(["compare", "--store", str(mixed_store), "--sweep", "mix", "--by", "bn", "--where", "epochs=2",
                 "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert [lv["n"] for lv in c["levels"]] == [2, 2]
    assert main(["compare", "--store", str(mixed_store), "--sweep", "mix", "--by", "bn", "--where", "epochs=3"]) == 2
    one_line_error(capsys, "epochs is one of 1, 2")


def test_report_and_plot_show_each_experiment(mixed_store, tmp_path, capsys):
    from bnlab.experiments import RunStore
    from bnlab.report.sweeps import curves_by

    assert main(["report", "--store", str(mixed_store), "--sweep", "mix", "-o", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "run with 2 configs" in page and "config version 1" in page and "config version 2" in page
    assert "Effect of bn on test accuracy (runs with epochs=1)" in page
    assert "Effect of bn on test accuracy (runs with epochs=2)" in page
    with RunStore(mixed_store) as st:
        labels = set(curves_by(st, "mix", ["bn"]))
    assert labels == {"bn=after, epochs=1", "bn=after, epochs=2", "bn=none, epochs=1", "bn=none, epochs=2"}


# ---------------------------------------------------------------- 2. lost work

def test_unwritable_checkpoint_refused_before_training(tmp_path, capsys):
    code = main(["train", *_digits_args(), "--epochs", "1", "--checkpoint", "/proc/no/such/dir/m.pt"])
    assert code == 2
    out = capsys.readouterr()
    assert "epoch" not in out.out  # nothing trained
    assert "cannot write checkpoint" in out.err and out.err.count("\n") == 1
    (tmp_path / "adir").mkdir()
    assert main(["train", *_digits_args(), "--checkpoint", str(tmp_path / "adir")]) == 2
    one_line_error(capsys, "is a directory")


def test_failed_final_write_keeps_the_weights(tmp_path, monkeypatch):
    import bnlab.train.run as run_mod

    real = run_mod.save_checkpoint
    target = tmp_path / "m.pt"

    def flaky(path, model, **kw):
        if Path(path) == target:
            raise OSError(28, "No space left on device")
        return real(path, model, **kw)

    monkeypatch.setattr(run_mod, "save_checkpoint", flaky)
    with pytest.raises(CheckpointError, match="saved to .* instead") as e:
        train(TrainSettings(**DIGITS, epochs=1), checkpoint=target)
    rescued = Path(str(e.value).split("saved to ")[1].split(" instead")[0])
    assert rescued.is_file() and str(rescued).startswith(os.environ["BNLAB_CACHE_DIR"])
    assert load_checkpoint(rescued).settings["model"] == "keras-mlp"


# ---------------------------------------------------------------- 3. checkpoints cannot take the machine down

@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "m.pt"
    train(TrainSettings(**DIGITS, bn="after", epochs=1), checkpoint=path)
    return path


def _edited(small_ckpt, tmp_path, edit) -> Path:
    d = torch.load(small_ckpt, weights_only=True)
    edit(d)
    out = tmp_path / "edited.pt"
    torch.save(d, out)
    return out


def test_checkpoint_spec_checked_against_weights_before_building(small_ckpt, tmp_path):
    def huge(d):
        dense = next(layer for layer in d["spec"]["layers"] if layer["type"] == "dense")
        dense["out"] = 2_000_000_000  # a dense layer of 784 x 2e9 float32 = 6 TB

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="weights do not match its network spec .*2000000000"):
        load_checkpoint(_edited(small_ckpt, tmp_path, huge))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d["spec"].update(layers="x"), "network spec is invalid"),
    (lambda d: d["build"].update(input_shape=[-5]), "network spec"),
    (lambda d: d.pop("state_dict"), "incomplete"),
    (lambda d: d["state_dict"].update({"0.weight": torch.zeros(3)}), "weights do not match"),
])
def test_damaged_checkpoints_one_line(small_ckpt, tmp_path, capsys, edit, needle):
    path = _edited(small_ckpt, tmp_path, edit)
    assert main(["evaluate", str(path)]) == 2
    one_line_error(capsys, needle)


def test_checkpoint_with_code_refused_with_the_reason(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "bnlab-checkpoint", "payload": os.system}, path)
    assert main(["evaluate", str(path)]) == 2
    err = one_line_error(capsys, "refused: it holds pickled Python objects (code)")
    assert "weights_only=False" not in err.replace("torch.load(weights_only=True)", "")


# ---------------------------------------------------------------- 4. one-line errors everywhere

def _digits_args():
    return ["--dataset", "digits", "--model", "keras-mlp", "--quiet"]


def test_batch_size_one_with_bn_refused_before_training(capsys):
    assert main(["train", *_digits_args(), "--bn", "after", "--batch-size", "1"]) == 2
    one_line_error(capsys, "batch norm needs at least 2 values per channel")


@pytest.mark.parametrize("line,needle", [
    ('weight_decay = "abc"', "must be a number"),
    ('lr = "0.1"', "must be a number"),
    ("epochs = 2.5", "must be a whole number"),
    ("batch_size = true", "must be a whole number"),
    ("augment = 1", "must be true or false"),
])
def test_wrong_types_in_a_config(tmp_path, capsys, line, needle):
    p = tmp_path / "c.toml"
    p.write_text(f'name = "x"\ndataset = "digits"\n[fixed]\nmodel = "keras-mlp"\n{line}\n')
    assert main(["sweep", str(p), "--store", str(tmp_path / "s.db")]) == 2
    assert line.split(" =")[0] in one_line_error(capsys, needle)
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize("key,value,needle", [
    ("weight_decay", "abc", "weight_decay must be a number, got 'abc'"),
    ("epochs", 2.5, "epochs must be a whole number"),
    ("augment", 1, "augment must be true or false"),
    ("lr", 1, None),  # an int where a float is expected is the same number
])
def test_wrong_types_in_the_python_api(key, value, needle):
    s = TrainSettings(**{**DIGITS, key: value})
    if needle is None:
        assert s.validate().lr == 1.0 and isinstance(s.lr, float)
        return
    with pytest.raises(ConfigError, match=needle):
        s.validate()


def test_config_not_utf8(tmp_path, capsys):
    p = tmp_path / "c.toml"
    p.write_bytes(b'name = "\xff\xfe"\ndataset = "digits"\n')
    assert main(["sweep", str(p), "--store", str(tmp_path / "s.db")]) == 2
    one_line_error(capsys, "is not UTF-8")


def test_output_piped_to_a_closed_reader():
    # the reader is gone before bnlab writes: it must stop quietly, not print a traceback
    p = subprocess.Popen([BNLAB, "models", "list", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141 and "Traceback" not in err, err


def test_doctor_exit_status_says_whether_it_found_a_problem(small_ckpt, tmp_path, capsys):
    # one short epoch leaves the running statistics behind the weights: a real finding
    assert main(["doctor", str(small_ckpt), "--fix", "-o", str(tmp_path / "fixed.pt")]) == 1
    assert main(["doctor", str(tmp_path / "fixed.pt")]) == 0
    small_ckpt = tmp_path / "fixed.pt"

    def stale(d):
        for k, v in d["state_dict"].items():
            if k.endswith("running_mean"):
                v.add_(5.0)

    assert main(["doctor", str(_edited(small_ckpt, tmp_path, stale))]) == 1
    assert "problem(s) found" in capsys.readouterr().out


# ---------------------------------------------------------------- 5. honest edge cases

def test_no_training_step_is_an_error(capsys):
    assert main(["train", *_digits_args(), "--train-limit", "1"]) == 2
    one_line_error(capsys, "train_limit must be at least 2")
    from bnlab.data import load_splits

    tr, te = load_splits("digits")
    with pytest.raises(ConfigError, match="give no training step"):
        fit(torch.nn.Sequential(torch.nn.Linear(64, 10), torch.nn.BatchNorm1d(10)), tr.subset(1), te, batch_size=64)


def test_written_files_respect_the_umask(small_ckpt, tmp_path):
    from bnlab.report.plots import confusion_matrix

    old = os.umask(0o022)
    try:
        ck = tmp_path / "m.pt"
        train(TrainSettings(**DIGITS, epochs=1), checkpoint=ck)
        png = confusion_matrix([[1, 0], [0, 1]], ["a", "b"], tmp_path / "cm.png")
        for f in (ck, png):
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
        os.umask(0o077)
        png2 = confusion_matrix([[1, 0], [0, 1]], ["a", "b"], tmp_path / "cm2.png")
        assert stat.S_IMODE(png2.stat().st_mode) == 0o600
    finally:
        os.umask(old)
