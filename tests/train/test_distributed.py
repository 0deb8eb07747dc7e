"""One run in several processes (DistributedDataParallel over gloo on 127.0.0.1): real processes,
started by `bnlab train --nproc 2` and by torchrun, against one process on the whole batch."""

import json
import subprocess
import sys

import pytest
import torch

from bnlab.cli import main
from bnlab.train import load_checkpoint
from tests.conftest import FMNIST_DIR

pytestmark = pytest.mark.skipif(not __import__("os").path.isdir(FMNIST_DIR), reason="Fashion-MNIST not installed")

# 5 steps of 64 examples, SGD with momentum. A network without max-pooling and dropout: a
# rounding difference (summing over 64 vs 2 x 32) can flip a max-pool's choice between equal
# values and then grow, and dropout masks would differ per process.
COMMON = ["train", "--model", "allconv-cnn", "--bn", "tutorial", "--optimizer", "momentum", "--lr", "0.01",
          "--train-limit", "320", "--test-limit", "200", "--epochs", "1", "--quiet"]


def run(tmp_path, name, *extra):
    ck = tmp_path / f"{name}.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the 2 processes: the same kernels, the same rounding
    try:
        assert main([*COMMON, *extra, "-o", str(ck)]) == 0
    finally:
        torch.set_num_threads(threads)
    return load_checkpoint(ck)


def close(a, b, keys=None, tol=1e-5):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for k in keys or sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=tol, atol=tol, msg=k)


def test_two_processes_with_sync_bn_train_exactly_as_one_on_the_whole_batch(tmp_path, capfd):
    two = run(tmp_path, "two", "--nproc", "2", "--batch-size", "32", "--sync-bn")
    out = capfd.readouterr().out
    assert out.count("epoch   1") == 1  # rank 0 alone prints
    assert "2 processes x batch size 32 = 64 per step, BN synchronized" in out
    one = run(tmp_path, "one", "--batch-size", "64")
    close(two, one)  # weights and running statistics, within 1e-5
    assert two.history["steps"] == one.history["steps"] == 5
    for e2, e1 in zip(two.history["epochs"], one.history["epochs"]):
        assert e2["train_loss"] == pytest.approx(e1["train_loss"], rel=1e-5)
        assert e2["test_acc"] == pytest.approx(e1["test_acc"], abs=1e-9)
    assert two.settings["nproc"] == 2 and two.settings["sync_bn"] is True and one.settings["nproc"] == 1


def test_without_sync_bn_each_process_normalizes_its_own_part_as_ghost_bn(tmp_path):
    two = run(tmp_path, "two", "--nproc", "2", "--batch-size", "32")
    ghost = run(tmp_path, "ghost", "--batch-size", "64", "--norm", "ghost", "--virtual-batch-size", "32")
    plain = run(tmp_path, "plain", "--batch-size", "64")
    weights = [k for k in two.model.state_dict() if not k.endswith(("running_mean", "running_var"))]
    close(two, ghost, weights)
    with pytest.raises(AssertionError):
        close(two, plain, weights)  # BN over 64 is another function
    assert two.history["epochs"][0]["train_loss"] == pytest.approx(ghost.history["epochs"][0]["train_loss"], rel=1e-5)


def test_torchrun_starts_the_same_run(tmp_path):
    ck = tmp_path / "tr.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "bnlab",
           *COMMON, "--batch-size", "32", "--sync-bn", "--json", "-o", str(ck)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["settings"]["nproc"] == 2 and report["status"] == "done"
    one = run(tmp_path, "one", "--batch-size", "64")
    close(load_checkpoint(ck), one)


def test_nproc_mistakes_are_one_line(tmp_path, capsys):
    assert main([*COMMON, "--nproc", "2", "--batch-size", "32", "--track-landscape"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "track_landscape with nproc > 1" in err
    assert main([*COMMON, "--nproc", "2", "--model", "nope"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
