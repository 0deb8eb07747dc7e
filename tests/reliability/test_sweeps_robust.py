"""Sweeps that cannot lose, mix or hide runs: workers die with their driver, a run's owner is
checked beyond its pid, unfinished runs make the sweep exit non-zero, every mistake is found
before any run starts, grids are bounded and streamed, configs are versioned, the store file is
ours (or refused untouched, or read-only and still readable), and the thread count is part of a
run's identity.

Every test here failed before the fix it guards.
"""

import inspect
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from bnlab.cli import main
from bnlab.errors import ConfigError
from bnlab.experiments import RunStore, SweepConfig, load_config, run_sweep
from bnlab.experiments.config import run_id
from bnlab.train import TrainSettings

BNLAB = str(Path(sys.executable).parent / "bnlab")


def write_config(path, name="t", seeds=(0,), grid=None, **fixed):
    fixed = {"model": "keras-mlp", "epochs": 1, "batch_size": 64, "train_limit": 300, **fixed}
    grid = grid if grid is not None else {"bn": ["none", "after"]}
    lines = [f'name = "{name}"', 'dataset = "digits"', f"seeds = {list(seeds)}", "[fixed]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in fixed.items() if v is not None]
    lines += ["[grid]"] + [f"{k} = {json.dumps(v)}" for k, v in grid.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err
    assert err.startswith("bnlab: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def alive(pid: int) -> bool:
    """Exists and is not a zombie (an orphan's zombie may wait for a PID 1 that never reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] not in "ZX"


def quiet(*_):
    pass


# ---------------------------------------------------------------- 1. workers die with their driver

@pytest.mark.slow
def test_workers_die_with_a_sigkilled_driver_and_their_runs_rerun(tmp_path):
    p = write_config(tmp_path / "c.toml", epochs=20, batch_size=8, train_limit=None)
    store = tmp_path / "s.db"
    cmd = [BNLAB, "sweep", str(p), "--store", str(store), "--workers", "2"]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        deadline = time.time() + 120
        while len(pids) < 2 and time.time() < deadline and driver.poll() is None:
            time.sleep(0.2)
            if store.exists():
                try:
                    db = sqlite3.connect(store, timeout=30)
                    pids = [pid for (pid,) in db.execute("SELECT pid FROM runs WHERE status = 'running'")]
                    db.close()
                except sqlite3.OperationalError:
                    pids = []
        assert len(pids) == 2 and driver.pid not in pids, f"the two workers never got going: {driver.poll()}"
        driver.kill()
        driver.communicate(timeout=60)
        deadline = time.time() + 10
        while any(alive(pid) for pid in pids) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in pids), "workers outlived their driver"
    finally:
        for pid in pids:  # before the fix: do not leave orphans behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    with RunStore(store) as st:
        assert {r["status"] for r in st.runs("t")} == {"running"}  # as the killed workers left them
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "2 interrupted run(s) will run again" in r.stdout
    with RunStore(store) as st:
        runs = st.runs("t")
        assert len(runs) == 2 and {x["status"] for x in runs} == {"done"}
        for run in runs:
            assert [e["epoch"] for e in st.epochs(run["run_id"])] == list(range(1, 21))
            assert run["attempts"] == 2 and run["pid"] not in pids


def test_watchdog_fires_when_the_parent_is_gone():
    from bnlab.experiments.execute import watch_parent

    fired = threading.Event()
    watch_parent(os.getppid(), interval=1.0, on_gone=fired.set)
    assert not fired.wait(0.3)  # the parent is alive
    watch_parent(-1, interval=0.01, on_gone=fired.set)  # "-1 was our parent": it is gone
    assert fired.wait(5)


# ---------------------------------------------------------------- 2. run ownership

def _finished_sweep(tmp_path, **kw):
    p = write_config(tmp_path / "c.toml", grid={"bn": ["none"]}, **kw)
    db = tmp_path / "s.db"
    assert main(["sweep", str(p), "--store", str(db), "--quiet", "--threads", "1"]) == 0
    return p, db


def _fake_running(db, **owner):
    """Make the sweep's one run look like it is running in another process."""
    with RunStore(db) as st:
        rid = st.runs("t")[0]["run_id"]
        with st.write() as d:
            d.execute("DELETE FROM epochs WHERE run_id = ?", (rid,))
            row = {"status": "running", "owner": "someone-else", "host": socket_host(), "heartbeat": time.time(),
                   "ended": None, **owner}
            d.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in row)} WHERE run_id = ?", (*row.values(), rid))
    return rid


def socket_host():
    import socket

    return socket.gethostname()


def test_a_reused_pid_does_not_keep_a_run_forever(tmp_path, capsys):
    from bnlab.experiments.store import process_start

    p, db = _finished_sweep(tmp_path)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        start = process_start(sleeper.pid)
        assert start is not None
        # the pid is alive and started when it says: a live owner, left alone, and the sweep says so
        rid = _fake_running(db, pid=sleeper.pid, pid_start=start)
        capsys.readouterr()
        assert main(["sweep", str(p), "--store", str(db), "--quiet", "--threads", "1"]) == 3
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"1 run(s) still running in another process (pid {sleeper.pid} on host" in err
        # the same pid, but another process (another start time): the owner is gone, the run reruns
        _fake_running(db, pid=sleeper.pid, pid_start=start - 100)
        assert main(["sweep", str(p), "--store", str(db), "--threads", "1"]) == 0
        assert "1 interrupted run(s) will run again" in capsys.readouterr().out
        with RunStore(db) as st:
            assert st.status(rid) == "done" and len(st.epochs(rid)) == 1
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_expired_lease_frees_a_run_of_another_host(tmp_path, capsys):
    p, db = _finished_sweep(tmp_path)
    rid = _fake_running(db, pid=12345, host="elsewhere", heartbeat=time.time())
    assert main(["sweep", str(p), "--store", str(db), "--quiet", "--threads", "1"]) == 3
    assert "pid 12345 on host elsewhere" in capsys.readouterr().err
    _fake_running(db, pid=12345, host="elsewhere", heartbeat=time.time() - 120)
    assert main(["sweep", str(p), "--store", str(db), "--quiet", "--threads", "1", "--lease", "60"]) == 0
    with RunStore(db) as st:
        assert st.status(rid) == "done"


def test_heartbeats_renew_the_lease_and_a_taken_run_is_not_written(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.toml"))
    with RunStore(tmp_path / "s.db", lease=60) as st:
        st.add_sweep("t", cfg.to_dict(), cfg.runs())
        rid = cfg.runs()[0].run_id
        assert st.claim(rid)
        first = st.db.execute("SELECT heartbeat FROM runs WHERE run_id = ?", (rid,)).fetchone()[0]
        with st.heartbeats(interval=0.05):
            time.sleep(0.5)
        assert st.db.execute("SELECT heartbeat FROM runs WHERE run_id = ?", (rid,)).fetchone()[0] > first
        assert st.add_epoch(rid, {"epoch": 1, "train_loss": 1.0})
        with st.write() as d:  # another process reran it after our lease expired
            d.execute("UPDATE runs SET owner = 'another' WHERE run_id = ?", (rid,))
        assert not st.add_epoch(rid, {"epoch": 2, "train_loss": 0.5})
        assert not st.finish(rid, "done", last_epochs=[{"epoch": 3, "train_loss": 0.1}])
        assert not st.requeue(rid, "interrupted")
        assert st.status(rid) == "running" and [e["epoch"] for e in st.epochs(rid)] == [1]


# ---------------------------------------------------------------- 3. unfinished runs are reported

def test_failed_runs_make_the_sweep_exit_1_and_say_where_to_look(tmp_path, capsys, monkeypatch):
    import bnlab.experiments.execute as ex

    real = ex.train

    def flaky(s, **kw):
        if s.bn == "after":
            raise RuntimeError("out of luck")
        return real(s, **kw)

    monkeypatch.setattr(ex, "train", flaky)
    p = write_config(tmp_path / "c.toml")
    db = str(tmp_path / "s.db")
    assert main(["sweep", str(p), "--store", db, "--quiet", "--json", "--workers", "1"]) == 1  # in this process
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert summary["counts"] == {"done": 1, "failed": 1} and summary["failed"] == 1 and summary["exit_status"] == 1
    assert out.err.count("\n") == 1
    assert f"1 run(s) failed: see bnlab results --store {db} --sweep t --where status=failed" in out.err


# ---------------------------------------------------------------- 4. every mistake before any run

@pytest.mark.parametrize("fixed,grid,needles", [
    ({"model": "deeplizard-cnnn"}, None, ["sweep 't'", "model", "deeplizard-cnnn"]),
    ({"model": "nets/missing.toml"}, None, ["sweep 't'", "model", "missing.toml"]),
    ({"weight_decay": "abc"}, None, ["sweep 't'", "weight_decay", "number"]),
    ({"lr": "0.1"}, None, ["sweep 't'", "lr must be a number"]),
    ({"epochs": 2.5}, None, ["sweep 't'", "epochs", "whole number"]),
    ({"batch_size": True}, None, ["sweep 't'", "batch_size", "whole number"]),
    ({}, {"lr": [0.1, "fast"]}, ["sweep 't'", "lr", "fast"]),
    ({"batch_size": 1}, {"bn": ["none", "after"]}, ["sweep 't'", "at least 2 values per channel"]),
    ({}, {"bn": ["none", "tutorial"]}, ["sweep 't'", "tutorial", "keras-mlp"]),
    ({"model": "deeplizard-cnn"}, None, ["sweep 't'", "deeplizard-cnn", "does not fit"]),  # digits are 8x8
    ({"bn": "after"}, {"norm": ["batch", "ghost"], "bn_impl": ["bnlab", "torch"]}, ["sweep 't'", "ghost", "bn_impl"]),
])
def test_every_mistake_is_found_before_any_run(tmp_path, capsys, fixed, grid, needles):
    p = write_config(tmp_path / "c.toml", grid=grid if grid is not None else {"bn": ["none", "after"]}, **fixed)
    db = tmp_path / "s.db"
    assert main(["sweep", str(p), "--store", str(db)]) == 2
    one_line_error(capsys, *needles)
    assert not db.exists()


# ---------------------------------------------------------------- 5. bounded, streamed grids

def test_a_grid_too_large_is_refused_before_it_is_expanded(tmp_path, capsys, monkeypatch):
    grid = {"lr": [round(0.001 * (i + 1), 6) for i in range(200)],
            "weight_decay": [round(0.0001 * i, 6) for i in range(200)]}
    p = write_config(tmp_path / "c.toml", grid=grid)
    db = tmp_path / "s.db"
    assert main(["sweep", str(p), "--store", str(db)]) == 2
    one_line_error(capsys, "40,000 runs", "200 x 200 values x 1 seed(s)", "--max-runs 40000")
    assert not db.exists()
    cfg = load_config(p)
    made = []
    real = SweepConfig._run
    monkeypatch.setattr(SweepConfig, "_run", lambda self, *a: made.append(1) or real(self, *a))
    with pytest.raises(ConfigError, match="limit of 10,000"):
        run_sweep(cfg, db, log=quiet)
    assert made == [] and not db.exists()  # refused from the grid's lengths alone
    with pytest.raises(ConfigError, match="limit of 3"):
        run_sweep(load_config(write_config(tmp_path / "c4.toml", seeds=(0, 1))), db, max_runs=3, log=quiet)
    assert not db.exists()


def test_runs_are_expanded_lazily_and_recorded_from_an_iterator(tmp_path):
    huge = SweepConfig("huge", "digits", [0, 1], {"model": "keras-mlp"},
                       {"lr": [0.001 * (i + 1) for i in range(10_000)], "weight_decay": [0.0, 0.1, 0.2]})
    runs = huge.iter_runs()
    assert inspect.isgenerator(runs) and huge.size() == 60_000
    first = next(runs)
    assert first.settings.lr == 0.001 and first.settings.seed == 0 and next(runs).settings.seed == 1
    small = SweepConfig("s", "digits", list(range(2500)), {"model": "keras-mlp"}, {})
    with RunStore(tmp_path / "s.db") as st:
        version = st.add_sweep("s", small.to_dict(), small.iter_runs())  # a generator, not a list
        assert version == 1 and st.version_counts("s", 1) == {"queued": 2500}


# ---------------------------------------------------------------- 6. config versions

def test_config_versions_record_which_runs_each_config_had(tmp_path):
    a = load_config(write_config(tmp_path / "a.toml", grid={"bn": ["none", "after"]}))
    b = load_config(write_config(tmp_path / "b.toml", grid={"bn": ["after", "before"]}))
    ra, rb = a.runs(), b.runs()
    with RunStore(tmp_path / "s.db") as st:
        assert st.add_sweep("t", a.to_dict(), ra) == 1
        assert st.add_sweep("t", a.to_dict(), a.runs({"data_dir": "/moved"})) == 1  # same config: same version
        assert {r["settings"]["data_dir"] for r in st.runs("t")} == {"/moved"}  # unfinished runs: where data is now
        assert st.add_sweep("t", b.to_dict(), rb) == 2
        versions = st.sweep_versions("t")
        assert [v["version"] for v in versions] == [1, 2]
        assert versions[0]["config"]["grid"] == {"bn": ["none", "after"]} and versions[0]["created"] > 0
        assert versions[0]["run_ids"] == [r.run_id for r in ra] and versions[1]["run_ids"] == [r.run_id for r in rb]
        assert st.sweep_config("t")["grid"] == {"bn": ["after", "before"]}  # the latest
        by_bn = {r["settings"]["bn"]: r["config_versions"] for r in st.runs("t")}
        assert by_bn == {"none": [1], "after": [1, 2], "before": [2]}
        assert st.runs()[0]["config_versions"] is None  # no sweep named: no versions
        with pytest.raises(ConfigError, match="no sweep named 'x'"):
            st.sweep_versions("x")


OLD_SCHEMA = """
CREATE TABLE sweeps (name TEXT PRIMARY KEY, config TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE runs (run_id TEXT PRIMARY KEY, settings TEXT NOT NULL, seed INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'diverged', 'failed')),
    error TEXT, started REAL, ended REAL, env TEXT, pid INTEGER, host TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, stop_reason TEXT, summary TEXT);
CREATE TABLE sweep_runs (sweep TEXT NOT NULL REFERENCES sweeps(name), run_id TEXT NOT NULL REFERENCES runs(run_id),
    PRIMARY KEY (sweep, run_id));
CREATE TABLE epochs (run_id TEXT NOT NULL REFERENCES runs(run_id), epoch INTEGER NOT NULL,
    train_loss REAL, train_acc REAL, test_loss REAL, test_acc REAL, seconds REAL, PRIMARY KEY (run_id, epoch));
CREATE TABLE activations (run_id TEXT NOT NULL REFERENCES runs(run_id), step INTEGER NOT NULL, layer TEXT NOT NULL,
    stats TEXT NOT NULL, PRIMARY KEY (run_id, step, layer));
"""


def old_store(path, cfg, threads=2):
    """A store as the previous bnlab wrote it: no mark, no versions, run ids without threads."""
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("INSERT INTO sweeps VALUES (?, ?, 1.0, 1.0)", (cfg.name, json.dumps(cfg.to_dict())))
    for r in cfg.runs():
        db.execute("INSERT INTO runs(run_id, settings, seed, status, env, attempts) VALUES (?, ?, ?, 'done', ?, 1)",
                   (r.run_id, json.dumps(r.settings.to_dict(), sort_keys=True), r.settings.seed,
                    json.dumps({"threads": threads})))
        db.execute("INSERT INTO sweep_runs VALUES (?, ?)", (cfg.name, r.run_id))
        db.execute("INSERT INTO epochs VALUES (?, 1, 0.5, 0.8, 0.6, 0.75, 0.1)", (r.run_id,))
    db.commit()
    db.close()
    return [r.run_id for r in cfg.runs()]


def test_a_store_of_the_previous_version_opens_migrates_and_resumes(tmp_path):
    from bnlab.experiments.store import APPLICATION_ID, SCHEMA_VERSION

    p = write_config(tmp_path / "c.toml")
    cfg = load_config(p)
    ids = old_store(tmp_path / "s.db", cfg, threads=2)
    with RunStore(tmp_path / "s.db", create=False) as st:
        assert st.db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert st.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        [v1] = st.sweep_versions("t")
        assert v1["version"] == 1 and v1["config"] == cfg.to_dict() and v1["run_ids"] == ids
        assert {r["run_id"]: (r["config_versions"], r["settings"]["threads"]) for r in st.runs("t")} == {
            rid: ([1], 2) for rid in ids}
    # same thread count: the old runs are this sweep's runs, nothing reruns
    s = run_sweep(cfg, tmp_path / "s.db", threads=2, log=quiet)
    assert s.total == 2 and s.skipped == 2 and s.finished == {} and s.complete
    # another thread count: they run again, and the sweep says how to resume them instead
    logs = []
    s = run_sweep(cfg, tmp_path / "s.db", threads=1, log=logs.append)
    assert s.skipped == 0 and set(s.finished.values()) == {"done"} and not set(s.finished) & set(ids)
    assert any("2 run(s) of sweep 't' finished with 2 thread(s)" in m and "pass --threads 2" in m for m in logs), logs
    with RunStore(tmp_path / "s.db") as st:
        assert [v["version"] for v in st.sweep_versions("t")] == [1, 2, 3]


# ---------------------------------------------------------------- 7. the store file

def test_another_programs_sqlite_file_is_refused_untouched(tmp_path, capsys):
    foreign = tmp_path / "app.db"
    db = sqlite3.connect(foreign)
    db.executescript("CREATE TABLE foo (x); CREATE TABLE bar (y); INSERT INTO foo VALUES (1);")
    db.commit()
    db.close()
    before = foreign.read_bytes()
    with pytest.raises(ConfigError, match=r"is an SQLite database but not a bnlab run store \(tables: bar, foo\)"):
        RunStore(foreign)
    p = write_config(tmp_path / "c.toml")
    assert main(["sweep", str(p), "--store", str(foreign)]) == 2
    one_line_error(capsys, "not a bnlab run store", "pass another --store")
    assert main(["results", "--store", str(foreign)]) == 2
    one_line_error(capsys, "tables: bar, foo")
    assert foreign.read_bytes() == before  # no table added, not even switched to WAL


def test_empty_files_become_stores_and_junk_is_one_line(tmp_path, capsys):
    from bnlab.experiments.store import APPLICATION_ID

    (tmp_path / "empty.db").write_bytes(b"")
    with RunStore(tmp_path / "empty.db") as st:
        assert st.db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    (tmp_path / "junk.db").write_bytes(os.urandom(8192))
    assert main(["results", "--store", str(tmp_path / "junk.db")]) == 2
    one_line_error(capsys, "junk.db is not a bnlab run store (not an SQLite file)")
    (tmp_path / "torn.db").write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    assert main(["results", "--store", str(tmp_path / "torn.db")]) == 2
    one_line_error(capsys, "torn.db is not a bnlab run store")


def _read_only_checks(target: str, cfg) -> dict:
    """Read a store that cannot be written, then try to write it; returns what happened."""
    out = {}
    with RunStore(target, create=False) as st:
        out["statuses"] = sorted(r["status"] for r in st.runs("t"))
        try:
            st.add_sweep("t2", cfg.to_dict(), cfg.runs())
            out["write"] = "written"
        except ConfigError as e:
            out["write"] = str(e)
    try:
        RunStore(target).add_sweep("t2", cfg.to_dict(), cfg.runs())
        out["sweep"] = "written"
    except ConfigError as e:
        out["sweep"] = str(e)
    return out


def _in_unprivileged_child(fn, *args) -> dict:
    """``fn(*args)`` as user nobody when we are root (chmod does not stop root), else here."""
    if os.geteuid() != 0:
        return fn(*args)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            result = json.dumps(fn(*args))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            result = json.dumps({"error": repr(e)})
        os.write(w, result.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return json.loads(text)


def test_a_read_only_store_can_be_read_and_says_it_is_read_only(tmp_path, capsys):
    p = write_config(tmp_path / "c.toml")
    cfg = load_config(p)
    # a directory "nobody" can enter, holding a finished sweep, then made read-only
    base = Path(tempfile.mkdtemp(prefix="bnlab-ro-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        d = base / "media"
        d.mkdir()
        db = d / "s.db"
        assert main(["sweep", str(p), "--store", str(db), "--quiet"]) == 0
        capsys.readouterr()
        db.chmod(0o444)
        d.chmod(0o555)
        got = _in_unprivileged_child(_read_only_checks, str(db), cfg)
        assert got.get("statuses") == ["done", "done"], got
        for what in ("write", "sweep"):
            assert got[what].startswith(f"run store {db} is read-only") and "pass another --store" in got[what], got
        # the same through an SQLite read-only URI (works for root too), and through the CLI
        d.chmod(0o755)
        db.chmod(0o644)
        uri = f"file:{db}?mode=ro"
        got = _read_only_checks(uri, cfg)
        assert got["statuses"] == ["done", "done"] and "is read-only" in got["write"] and "is read-only" in got["sweep"]
        assert main(["results", "--store", uri, "--sweep", "t", "--format", "json"]) == 0
        assert len(json.loads(capsys.readouterr().out)) == 2
        assert main(["sweep", str(p), "--store", uri]) == 2
        one_line_error(capsys, "is read-only (attempt to write a readonly database)")
        with RunStore(db) as st:
            assert [s["name"] for s in st.sweeps()] == ["t"]  # nothing was written
    finally:
        if (base / "media").exists():
            (base / "media").chmod(0o755)
        shutil.rmtree(base)


def test_an_old_store_on_read_only_media_is_read_as_version_1(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.toml"))
    ids = old_store(tmp_path / "s.db", cfg)
    uri = f"file:{tmp_path / 's.db'}?mode=ro"
    with RunStore(uri, create=False) as st:
        assert st.readonly is not None
        assert [r["config_versions"] for r in st.runs("t")] == [[1], [1]]
        assert st.sweep_versions("t")[0]["run_ids"] == ids
    db = sqlite3.connect(tmp_path / "s.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0  # not migrated: it could not be written
    assert "sweep_configs" not in {n for (n,) in db.execute("SELECT name FROM sqlite_master")}


# ---------------------------------------------------------------- 8. thread count and run identity

def test_the_thread_count_is_part_of_a_runs_identity(tmp_path):
    s = TrainSettings(dataset="digits", model="keras-mlp")
    assert run_id(s, threads=1) != run_id(s, threads=2) != run_id(s)
    cfg = load_config(write_config(tmp_path / "c.toml"))
    db = tmp_path / "s.db"
    one = run_sweep(cfg, db, threads=1, log=quiet)
    assert one.threads == 1 and set(one.finished.values()) == {"done"}
    logs = []
    two = run_sweep(cfg, db, threads=2, log=logs.append)
    assert set(two.finished.values()) == {"done"} and not set(two.finished) & set(one.finished)
    assert any(m.startswith("2 run(s) of sweep 't' finished with 1 thread(s); this sweep uses 2 thread(s) per worker")
               and "pass --threads 1 to resume them" in m for m in logs), logs
    again = run_sweep(cfg, db, threads=1, log=quiet)
    assert again.skipped == 2 and again.finished == {}
    with RunStore(db) as st:
        threads = sorted(r["settings"]["threads"] for r in st.runs("t"))
        assert threads == [1, 1, 2, 2]


def test_opening_a_store_twice_in_one_process_keeps_its_locks(tmp_path):
    """A second RunStore in the same process (a sweep's driver and its in-process run) must not
    drop the first one's SQLite locks: closing any descriptor of the file would, after which
    another process that opens and closes the store deletes the WAL under the first connection
    ("disk I/O error" on its next query)."""
    import subprocess
    import sys

    path = tmp_path / "s.db"
    first = RunStore(path)
    first.db.execute("CREATE TABLE IF NOT EXISTS probe (x)")
    first.db.execute("INSERT INTO probe VALUES (1)")
    RunStore(path).close()
    subprocess.run([sys.executable, "-c", f"import sqlite3; c = sqlite3.connect({str(path)!r}); "
                    "c.execute('SELECT count(*) FROM sqlite_master').fetchall(); c.close()"], check=True)
    assert (tmp_path / "s.db-wal").exists()  # the other process saw our locks and left the WAL alone
    first.db.execute("INSERT INTO probe VALUES (2)")
    assert first.db.execute("SELECT count(*) FROM probe").fetchone()[0] == 2
    first.close()
