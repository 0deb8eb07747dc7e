"""--device: resolution, the refusal of a device the machine lacks, and one training path for every
device. CUDA and MPS tests are marked and skipped where the device is absent (pytest -ra counts
them in the summary); on this project's machines they are skipped and the CPU runs the same code."""

import subprocess
import sys

import pytest
import torch

from bnlab.devices import DEVICES, available, model_device, resolve_device, to_device
from bnlab.errors import ConfigError
from bnlab.train import TrainSettings, load_checkpoint, train
from bnlab.train.settings import identity_hash

HAS_CUDA = torch.cuda.is_available()
HAS_MPS = available("mps")

ON_EVERY_DEVICE = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device here")]),
    pytest.param("mps", marks=[pytest.mark.mps, pytest.mark.skipif(not HAS_MPS, reason="no MPS device here")]),
]


def small(**kw):
    return TrainSettings(**{"dataset": "digits", "model": "keras-mlp", "bn": "after", "epochs": 2,
                            "batch_size": 64, "train_limit": 600, "test_limit": 200, **kw})


def test_auto_picks_the_best_device_there_is():
    expected = "cuda" if HAS_CUDA else "mps" if HAS_MPS else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_cuda_on_a_machine_without_one_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"device cuda: .* on this machine: use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="device cuda"):
        small(device="cuda").validate()  # refused before any data is loaded


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["train", "evaluate", "doctor"])
def test_cli_device_cuda_without_one_exits_2_with_one_line(command, tmp_path):
    out = tmp_path / "m.pt"
    if command != "train":
        train(small(epochs=1), progress=False, checkpoint=out)
        args = [command, str(out), "--device", "cuda"]
    else:
        args = ["train", "--dataset", "digits", "--model", "keras-mlp", "--device", "cuda", "-o", str(out)]
    p = subprocess.run([sys.executable, "-m", "bnlab.cli", *args], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "device cuda" in p.stderr and "Traceback" not in p.stderr
    assert out.exists() == (command != "train")  # train wrote nothing


def test_unknown_device_names_the_choices():
    with pytest.raises(ConfigError, match="choose one of auto, cpu, cuda, mps"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="device"):
        small(device="gpu").validate()


def test_to_device_is_free_on_the_same_device():
    x = torch.randn(3, 4)
    assert to_device(x, torch.device("cpu")) is x
    assert model_device(torch.nn.Linear(2, 2)).type == "cpu"
    assert model_device(torch.nn.ReLU()).type == "cpu"  # no parameters: the CPU


def test_identity_of_older_runs_is_kept():
    """Runs stored before --device existed keep their ids: device at the value they ran with (the
    CPU) is left out of the identity, so an old store resumes instead of rerunning everything."""
    s = small()
    old = {k: v for k, v in s.to_dict().items() if k != "device"}  # a run stored by an older bnlab
    if resolve_device("auto").type == "cpu":
        assert s.identity() == identity_hash(old)
        assert small(device="cpu").identity() == s.identity()
    assert identity_hash({**old, "device": "cpu"}) == identity_hash(old)
    assert identity_hash({**old, "device": "cuda"}) != identity_hash(old)
    assert s.identity(threads=2) != s.identity()


def test_every_batch_goes_through_to_device(monkeypatch):
    """The device plumbing runs on the CPU too: every training and evaluation batch is moved to
    the model's device by the one helper (which on CUDA pins memory)."""
    import bnlab.train.loop as loop

    seen = []

    def spy(x, device):
        seen.append(device.type)
        return to_device(x, device)

    monkeypatch.setattr(loop, "to_device", spy)
    res = train(small(epochs=1, device="cpu"), progress=False)
    train_batches = -(-600 // 64)
    assert len(seen) == 2 * train_batches + 1  # inputs and labels of each step, one test batch
    assert set(seen) == {"cpu"}
    assert res.history.status == "done"


@pytest.mark.parametrize("device", ON_EVERY_DEVICE)
def test_train_checkpoint_and_tools_on_device(device, tmp_path):
    """Training on a device gives (nearly) the CPU's numbers, the checkpoint holds CPU tensors and
    loads onto any device, and the doctor, folding and activation tracking work there."""
    from bnlab.inspect import diagnose
    from bnlab.nn import fold_batchnorm
    from bnlab.train import evaluate

    ckpt = tmp_path / "m.pt"
    res = train(small(device=device, track_activations=True, track_every=5), progress=False, checkpoint=ckpt)
    assert {p.device.type for p in res.model.parameters()} == {device}
    cpu = train(small(device="cpu"), progress=False)
    tol = 0 if device == "cpu" else 0.05
    assert abs(res.history[-1]["test_acc"] - cpu.history[-1]["test_acc"]) <= tol
    assert res.tracker.records and all(isinstance(r.get("p50", 0.0), float) for r in res.tracker.records)

    raw = torch.load(ckpt, weights_only=True)["state_dict"]  # no map_location: tensors where they were saved
    assert {t.device.type for t in raw.values()} == {"cpu"}

    for where in ("cpu", device):
        ck = load_checkpoint(ckpt, device=where)
        assert model_device(ck.model).type == where
        acc = evaluate(ck.model, res.test)["accuracy"]
        assert abs(acc - res.history[-1]["test_acc"]) <= (1e-9 if where == device else tol)
    rep = diagnose(res.model, res.train, res.test, batch_size=64)
    assert rep["bn_layers"] >= 1 and "eval_acc" in rep
    folded, report = fold_batchnorm(res.model)
    assert model_device(folded).type == device and report.folded
    x = to_device(next(res.test.batches(50))[0], resolve_device(device))
    with torch.no_grad():
        diff = (folded(x) - res.model(x)).abs().max()
    assert float(diff) < 1e-4


def test_device_options_default_sensibly():
    from bnlab.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train"]).device == "auto"  # training uses the best device there is
    assert parser.parse_args(["evaluate", "m.pt"]).device == "cpu"  # checkpoints load on the CPU unless asked
    for d in DEVICES:
        assert parser.parse_args(["train", "--device", d]).device == d


def test_a_sweep_stores_the_device_its_runs_used(tmp_path):
    """Stored settings name the device that ran (not "auto"): rows of runs stored before the
    setting existed read as that device, and the stored settings hash to the run's id."""
    from bnlab.experiments import RunStore, run_sweep
    from bnlab.experiments.analysis import rows
    from bnlab.experiments.config import parse_config

    cfg = parse_config({"name": "dev", "dataset": "digits", "seeds": [0],
                        "fixed": {"model": "keras-mlp", "bn": "after", "epochs": 1, "batch_size": 256}})
    db = str(tmp_path / "d.db")
    run_sweep(cfg, db, threads=1, log=lambda m: None)
    with RunStore(db) as st:
        (run,) = st.runs("dev")
    stored = dict(run["settings"])
    assert stored["device"] == resolve_device("auto").type
    threads = stored.pop("threads")
    assert identity_hash({**stored, "threads": threads}) == run["run_id"]
    old = {k: v for k, v in run["settings"].items() if k != "device"}  # as an older bnlab stored it
    (new_row,), (old_row,) = rows([run]), rows([{**run, "settings": old}])
    assert new_row["device"] == old_row["device"] == "cpu" or HAS_CUDA or HAS_MPS
