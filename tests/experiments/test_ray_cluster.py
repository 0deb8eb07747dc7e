"""Sweeps on a real two-node Ray cluster on this machine: a head started with ``ray start
--head`` on 127.0.0.1 and a second node joining it, 1 CPU each, as a user would start them.

Each ``ray start`` runs in a session of its own, so the processes of each node (its raylet and
the workers the raylet starts) are found by their session id: the worker node's raylet can be
killed alone, and everything is stopped at the end without killing any other Ray on the host.
(The cluster keeps its files in Ray's default /tmp/ray, and `ray start --head` points
/tmp/ray/ray_current_cluster at it: a head with a --temp-dir of its own refused the second node,
"InvalidAuthToken", with Ray 2.60.) The test that kills a node starts a cluster of its own.
"""

import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import make_idx_dataset

ray = pytest.importorskip("ray")

from bnlab.experiments import RunStore, load_config, run_sweep  # noqa: E402

from tests.experiments.test_sweeps import quiet, write_config  # noqa: E402

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")
BNLAB = str(Path(sys.executable).parent / "bnlab")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_processes(sid: int) -> list[tuple[int, list[str]]]:
    """``(pid, argv)`` of every live process in session ``sid``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) != sid or fields[0] in "ZX":  # field 6 of stat: the session id
                continue
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ValueError):
            continue
        found.append((int(pid), argv))
    return found


class Cluster:
    def __init__(self, tmp: Path):
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # token authentication off: on loopback, and a node joining (in its default mode) would not
        # send the token that `ray start --head` turns on once ~/.ray/auth_token exists
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
        self.head = self.worker = None
        try:
            self.head = self._start(["--head", f"--port={self.port}", f"--ray-client-server-port={_free_port()}",
                                     "--include-dashboard=false"], tmp)
            self.worker = self._start([f"--address={self.address}"], tmp)
        except BaseException:
            self.stop()
            raise

    def _start(self, args, cwd) -> int:
        proc = subprocess.Popen([RAY, "start", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                                 "--disable-usage-stats", *args], cwd=cwd, env=self.env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        return proc.pid  # the session id of the node's processes

    def raylet(self, sid: int) -> int:
        return next(pid for pid, argv in _session_processes(sid) if argv[0].endswith("/raylet"))

    def busy_worker(self, sid: int) -> int | None:
        """A worker process of that node running a run (Ray titles it after the task)."""
        return next((pid for pid, argv in _session_processes(sid) if argv[0].startswith("ray::execute_run")), None)

    def wait_busy(self, sid: int, timeout: float = 60) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pid = self.busy_worker(sid)
            if pid:
                return pid
            time.sleep(0.05)
        raise AssertionError("no run started on the node")

    def stop(self) -> None:
        for sid in (self.worker, self.head):
            for pid, _ in _session_processes(sid) if sid else ():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("ray"))
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def own_cluster(tmp_path):
    """A cluster for a test that breaks it."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()


def epochs_of(store_path, sweep):
    with RunStore(store_path) as st:
        return {r["run_id"]: [{k: v for k, v in e.items() if k != "seconds"} for e in st.epochs(r["run_id"])]
                for r in st.runs(sweep)}


def run_rows(store_path, sweep):
    with RunStore(store_path) as st:
        return st.runs(sweep)


def test_two_node_sweep_matches_local_and_workers_need_no_data_or_store(cluster, tmp_path, monkeypatch):
    data = make_idx_dataset(tmp_path / "mnist", n_train=300, n_test=60)
    path = write_config(tmp_path / "c.toml", name="two", epochs=2)
    path.write_text(path.read_text().replace('dataset = "digits"', 'dataset = "mnist"'))
    cfg = load_config(path)
    over = {"data_dir": str(data)}
    run_sweep(cfg, tmp_path / "local.db", workers=1, threads=1, overrides=over, log=quiet)

    import bnlab.train

    real = bnlab.train.load_data

    def load_then_delete(s):  # the driver's copy is the only one: a worker reading files would fail
        out = real(s)
        shutil.rmtree(data, ignore_errors=True)
        return out

    monkeypatch.setattr(bnlab.train, "load_data", load_then_delete)
    lines = []
    s = run_sweep(cfg, tmp_path / "ray.db", executor="ray", ray_address=cluster.address, overrides=over,
                  log=lines.append)
    assert not data.exists()
    assert set(s.finished.values()) == {"done"} and len(s.finished) == 4, lines
    assert f"on the Ray cluster at {cluster.address}, 1 thread(s) each" in lines[0]
    assert epochs_of(tmp_path / "ray.db", "two") == epochs_of(tmp_path / "local.db", "two")  # same thread count
    rows = run_rows(tmp_path / "ray.db", "two")
    assert {r["pid"] for r in rows} == {os.getpid()}  # claimed and written by the driver
    assert os.getpid() not in {r["env"]["pid"] for r in rows}  # trained elsewhere
    assert len({r["env"]["ray_node"] for r in rows}) == 2  # on both nodes
    assert all(r["attempts"] == 1 for r in rows)


def test_sigkilled_driver_rerun_resumes_nothing_lost_or_twice(cluster, tmp_path):
    cfg_path = write_config(tmp_path / "c.toml", name="driver", seeds=(0, 1, 2), epochs=8, batch_size=16)
    store = tmp_path / "s.db"
    cmd = [BNLAB, "sweep", str(cfg_path), "--store", str(store), "--executor", "ray", "--ray-address",
           cluster.address, "--quiet"]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        end = time.monotonic() + 90
        done = 0
        while time.monotonic() < end and driver.poll() is None:
            if store.exists():
                done = sum(r["status"] == "done" for r in run_rows(store, "driver"))
                if done:
                    break
            time.sleep(0.1)
        assert done and driver.poll() is None, "the driver ended before a run was done"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    left = [r for r in run_rows(store, "driver") if r["status"] != "done"]
    assert left and {r["status"] for r in left} <= {"running", "queued"}  # its claimed runs, under a dead pid
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=180)
    assert again.returncode == 0, again.stderr
    rows = run_rows(store, "driver")
    assert len(rows) == 6 and {r["status"] for r in rows} == {"done"}
    eps = epochs_of(store, "driver")
    assert all([e["epoch"] for e in eps[r["run_id"]]] == list(range(1, 9)) for r in rows)
    # the runs done before the kill were not run again; the others once more, by the second driver
    assert sorted(r["attempts"] for r in rows) == sorted([1] * (6 - len(left)) + [2] * len(left))


def test_a_run_ray_gives_up_on_is_queued_and_the_next_sweep_reruns_it(cluster, tmp_path, monkeypatch):
    import bnlab.experiments.sweep as sweep_mod

    monkeypatch.setattr(sweep_mod, "run_ray", functools.partial(sweep_mod.run_ray, max_retries=0))
    cfg = load_config(write_config(tmp_path / "c.toml", name="gaveup", seeds=(0,), epochs=8, batch_size=16))
    killed = []

    def kill_one_worker():
        pid = cluster.wait_busy(cluster.worker)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    lines = []
    s = run_sweep(cfg, tmp_path / "s.db", executor="ray", ray_address=cluster.address, log=lines.append)
    killer.join(5)
    assert killed
    assert sorted(s.finished.values()) == ["done", "interrupted"], lines
    assert s.interrupted == 1 and not s.complete
    assert any("interrupted" in line and "run the same command to resume" in line for line in lines)
    monkeypatch.undo()
    again = run_sweep(cfg, tmp_path / "s.db", executor="ray", ray_address=cluster.address, log=quiet)
    assert again.skipped == 1 and list(again.finished.values()) == ["done"] and again.complete


def test_killed_worker_node_its_run_is_retried_on_the_head(own_cluster, tmp_path):
    cluster = own_cluster
    cfg = load_config(write_config(tmp_path / "c.toml", name="node", epochs=8, batch_size=16))
    run_sweep(cfg, tmp_path / "local.db", workers=1, threads=1, log=quiet)
    killed = []

    def kill_worker_node():
        cluster.wait_busy(cluster.worker)  # the node's first run is in flight there
        os.kill(cluster.raylet(cluster.worker), signal.SIGKILL)
        killed.append(True)

    killer = threading.Thread(target=kill_worker_node, daemon=True)
    killer.start()
    s = run_sweep(cfg, tmp_path / "ray.db", executor="ray", ray_address=cluster.address, log=quiet)
    killer.join(5)
    assert killed
    assert set(s.finished.values()) == {"done"} and len(s.finished) == 4 and s.complete
    rows = run_rows(tmp_path / "ray.db", "node")
    # the worker node died in its first run, so every run, that one retried, finished on the head
    assert len({r["env"]["ray_node"] for r in rows}) == 1
    assert all(r["attempts"] == 1 for r in rows)  # the store saw each run once: Ray retried it
    assert epochs_of(tmp_path / "ray.db", "node") == epochs_of(tmp_path / "local.db", "node")
