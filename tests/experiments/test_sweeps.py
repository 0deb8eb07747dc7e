import json
import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from bnlab.cli import main
from bnlab.errors import ConfigError
from bnlab.experiments import RunStore, compare, group, load_config, parse_config, rows, run_sweep
from bnlab.train import TrainSettings

BNLAB = str(Path(sys.executable).parent / "bnlab")


def write_config(path, name="t", seeds=(0, 1), grid=None, **fixed):
    fixed = {"model": "keras-mlp", "epochs": 2, "batch_size": 64, **fixed}
    grid = grid if grid is not None else {"bn": ["none", "after"]}

    def val(v):
        return json.dumps(v)

    lines = [f'name = "{name}"', 'dataset = "digits"', f"seeds = {list(seeds)}", "[fixed]"]
    lines += [f"{k} = {val(v)}" for k, v in fixed.items()]
    lines += ["[grid]"] + [f"{k} = {val(v)}" for k, v in grid.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def quiet(*_):
    pass


def test_grid_expansion_and_identity(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.toml", seeds=(0, 1, 2), grid={"bn": ["none", "after"], "lr": [0.01, 0.1]}))
    runs = cfg.runs()
    assert len(runs) == 2 * 2 * 3 and len({r.run_id for r in runs}) == 12
    combos = {(r.settings.bn, r.settings.lr, r.settings.seed) for r in runs}
    assert len(combos) == 12 and all(r.settings.epochs == 2 and r.settings.dataset == "digits" for r in runs)
    again = load_config(tmp_path / "c.toml").runs()
    assert [r.run_id for r in runs] == [r.run_id for r in again]  # stable identity
    moved = cfg.runs({"data_dir": "/elsewhere"})
    assert [r.run_id for r in moved] == [r.run_id for r in runs]  # data location is not identity


@pytest.mark.parametrize("text,needle", [
    ('name = "x"\ndataset = "digits"\ncolour = 1', "unknown key"),
    ('name = "x"\ndataset = "digits"\n[fixed]\nlearning_rate = 1', "unknown setting"),
    ('name = "x"\ndataset = "digits"\n[grid]\nlr = [0.1, -1.0]', "lr=-1.0"),
    ('name = "x"\ndataset = "digits"\n[grid]\nlr = 0.1', "non-empty list"),
    ('name = "x"\ndataset = "digits"\nseeds = [1, 1]', "duplicates"),
    ('name = "x"\ndataset = "nope"', "unknown dataset"),
    ('dataset = "digits"', "'name' must be"),
    ('name = "x"\ndataset = "digits"\n[fixed]\nseed = 3', "seeds"),
    ('name = "x"\ndataset = "digits"\n[fixed]\nbn = "after"\n[grid]\nbn = ["none"]', "both fixed and gridded"),
    ("name = ", "not valid TOML"),
])
def test_bad_configs_refused_before_anything_runs(tmp_path, capsys, text, needle):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    store = tmp_path / "s.db"
    code = main(["sweep", str(p), "--store", str(store)])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not store.exists()


def test_store_round_trip(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.toml", seeds=(0,)))
    runs = cfg.runs()
    with RunStore(tmp_path / "s.db") as st:
        st.add_sweep(cfg.name, cfg.to_dict(), runs)
        rid = runs[0].run_id
        assert st.status(rid) == "queued"
        assert st.claim(rid, os.getpid(), {"threads": 1})
        assert not st.claim(rid)  # taken by a live process
        st.add_epoch(rid, {"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.1, "test_acc": 0.4, "seconds": 1.5})
        st.finish(rid, "done", last_epochs=[{"epoch": 2, "train_loss": 0.5, "train_acc": 0.8, "test_loss": 0.6,
                                              "test_acc": 0.7, "seconds": 1.0}])
        assert not st.claim(rid)  # finished runs are never rerun
        got = {r["run_id"]: r for r in st.runs(cfg.name)}[rid]
        assert got["status"] == "done" and got["epochs_done"] == 2 and got["final"]["test_acc"] == 0.7
        assert got["final"]["seconds"] == 2.5 and got["settings"]["bn"] == runs[0].settings.bn
        assert [e["epoch"] for e in st.epochs(rid)] == [1, 2]
        assert st.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(ConfigError, match="does not exist"):
        RunStore(tmp_path / "missing.db", create=False)
    (tmp_path / "junk.db").write_bytes(b"x" * 4096)
    with pytest.raises(ConfigError, match="not a bnlab run store"):
        RunStore(tmp_path / "junk.db")


def test_sweep_resume_and_single_vs_two_workers_identical(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.toml"))
    s1 = run_sweep(cfg, tmp_path / "one.db", workers=1, log=quiet)
    assert s1.total == 4 and set(s1.finished.values()) == {"done"}
    s2 = run_sweep(cfg, tmp_path / "two.db", workers=2, log=quiet)
    again = run_sweep(cfg, tmp_path / "one.db", workers=1, log=quiet)
    assert again.skipped == 4 and again.finished == {}
    run_sweep(cfg, tmp_path / "one-t1.db", workers=1, threads=1, log=quiet)
    run_sweep(cfg, tmp_path / "two-t1.db", workers=2, threads=1, log=quiet)

    def epochs_of(path):  # keyed by the settings but for the thread count, which is part of the run id
        with RunStore(path) as st:
            return {json.dumps({k: v for k, v in r["settings"].items() if k != "threads"}, sort_keys=True):
                    [{k: v for k, v in e.items() if k != "seconds"} for e in st.epochs(r["run_id"])]
                    for r in st.runs()}

    one, two = epochs_of(tmp_path / "one.db"), epochs_of(tmp_path / "two.db")
    assert set(one) == set(two) and len(one) == 4
    for rid in one:  # 2 threads vs 1 thread each: float rounding, compounded over training, only
        for a, b in zip(one[rid], two[rid]):
            assert abs(a["test_acc"] - b["test_acc"]) <= 0.01 and a["train_loss"] == pytest.approx(b["train_loss"], rel=0.01)
    assert epochs_of(tmp_path / "one-t1.db") == epochs_of(tmp_path / "two-t1.db")  # same threads: bit-identical
    with RunStore(tmp_path / "two.db") as b:
        assert {r["env"]["threads"] for r in b.runs()} == {max(1, len(os.sched_getaffinity(0)) // 2)}
    assert s2.total == 4


def test_diverged_run_inside_a_sweep(tmp_path, capsys):
    p = write_config(tmp_path / "c.toml", seeds=(0,), grid={"lr": [0.01, 1e12]}, optimizer="sgd")
    assert main(["sweep", str(p), "--store", str(tmp_path / "s.db"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["results", "--store", str(tmp_path / "s.db"), "--sweep", "t", "--format", "json"]) == 0
    res = json.loads(capsys.readouterr().out)
    by_lr = {r["lr"]: r for r in res}
    assert by_lr[1e12]["status"] == "diverged" and by_lr[0.01]["status"] == "done"
    assert {"run_id", "status", "seed", "bn", "lr", "train_acc", "test_acc", "train_loss", "test_loss", "seconds"} <= set(res[0])


def test_results_where_group_and_compare(tmp_path, capsys):
    cfg = load_config(write_config(tmp_path / "c.toml", seeds=(0, 1, 2)))
    run_sweep(cfg, tmp_path / "s.db", workers=2, log=quiet)
    with RunStore(tmp_path / "s.db") as st:
        flat = rows(st.runs("t"), "bn=after")
        assert len(flat) == 3 and {r["bn"] for r in flat} == {"after"}
        g = {x["bn"]: x for x in group(rows(st.runs("t")), ["bn"])}
        vals = [r["test_acc"] for r in rows(st.runs("t"), "bn=none")]
        import statistics

        assert g["none"]["runs"] == 3 and g["none"]["test_acc_mean"] == pytest.approx(statistics.fmean(vals))
        assert g["none"]["test_acc_ci95"] == pytest.approx(4.302653 * statistics.stdev(vals) / 3 ** 0.5, rel=1e-4)
        c = compare(rows(st.runs("t")), "bn", "test_acc")
        from scipy.stats import ttest_ind

        a = [r["test_acc"] for r in rows(st.runs("t"), f"bn={c['tests'][0]['a']}")]
        b = [r["test_acc"] for r in rows(st.runs("t"), f"bn={c['tests'][0]['b']}")]
        assert c["tests"][0]["p"] == pytest.approx(ttest_ind(a, b, equal_var=False).pvalue)
        assert c["tests"][0]["verdict"].startswith(f"bn={c['tests'][0]['a']} vs bn={c['tests'][0]['b']}")
    for argv in (["results", "--sweep", "t", "--group-by", "bn"], ["results", "--sweep", "t", "--format", "csv"],
                 ["compare", "--sweep", "t", "--by", "bn"], ["results", "--sweep", "t", "--where", "bn=after"]):
        assert main(argv + ["--store", str(tmp_path / "s.db")]) == 0
    out = capsys.readouterr().out
    assert "test_acc_ci95" in out and "Welch" in out
    for argv, needle in ((["results", "--sweep", "t", "--where", "colour=red"], "unknown setting"),
                         (["results", "--sweep", "nope"], "no sweep named 'nope'"),
                         (["compare", "--sweep", "t", "--by", "lr"], "two or more values"),
                         (["results", "--sweep", "t", "--where", "bn"], "key=value")):
        assert main(argv + ["--store", str(tmp_path / "s.db")]) == 2
        assert needle in capsys.readouterr().err


def _hammer(path, worker, n):
    from bnlab.experiments.store import RunStore

    st = RunStore(path)
    for i in range(n):
        rid = f"w{worker}-{i}"
        with st.write() as db:
            db.execute("INSERT INTO runs(run_id, settings, seed, status) VALUES (?, '{}', 0, 'queued')", (rid,))
        st.claim(rid)
        st.add_epoch(rid, {"epoch": 1, "train_loss": 1.0})
        st.finish(rid, "done", last_epochs=[{"epoch": 2, "train_loss": 0.5}])
    st.close()


def test_concurrent_writers_never_fail(tmp_path):
    path = tmp_path / "s.db"
    RunStore(path).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(str(path), w, 60)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    db = sqlite3.connect(path)
    assert db.execute("SELECT COUNT(*) FROM runs WHERE status = 'done'").fetchone()[0] == 240
    assert db.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 480


@pytest.mark.slow
def test_resume_after_a_worker_is_sigkilled(tmp_path):
    p = write_config(tmp_path / "c.toml", seeds=(0, 1), epochs=15, batch_size=8)
    store = tmp_path / "s.db"
    proc = subprocess.Popen([BNLAB, "sweep", str(p), "--store", str(store), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline:
        time.sleep(0.2)
        if store.exists():
            try:
                db = sqlite3.connect(store, timeout=30)
                row = db.execute("SELECT run_id, pid FROM runs r WHERE status = 'running' AND "
                                 "(SELECT COUNT(*) FROM epochs e WHERE e.run_id = r.run_id) >= 2").fetchone()
                db.close()
            except sqlite3.OperationalError:
                row = None
            if row:
                victim = row
    assert victim is not None, "no run got going"
    os.kill(victim[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "worker process died" in err and "Traceback" not in err
    with RunStore(store) as st:
        statuses = {r["run_id"]: r["status"] for r in st.runs("t")}
        assert statuses[victim[0]] in ("running", "queued")  # never 'done' with half its epochs
        assert len(st.epochs(victim[0])) < 15
    # run the same command again: finished runs are kept, the interrupted one reruns from scratch
    r = subprocess.run([BNLAB, "sweep", str(p), "--store", str(store), "--workers", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "interrupted run(s) will run again" in r.stdout
    run_sweep(load_config(p), tmp_path / "clean.db", workers=2, log=quiet)
    with RunStore(store) as st, RunStore(tmp_path / "clean.db") as clean:
        assert {r["status"] for r in st.runs("t")} == {"done"}
        for run in st.runs("t"):
            got = [{k: v for k, v in e.items() if k != "seconds"} for e in st.epochs(run["run_id"])]
            want = [{k: v for k, v in e.items() if k != "seconds"} for e in clean.epochs(run["run_id"])]
            assert len(got) == 15 and got == want


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tables, self.external = [], 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "table":
            self.tables += 1
        for key in ("src", "href"):
            if a.get(key) and not a[key].startswith("data:"):
                self.external.append(a[key])


def test_tensorboard_plot_and_report(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    long_name = "a-very-long-sweep-name-" + "with-every-setting-in-it-" * 12
    p = write_config(tmp_path / "c.toml", name=long_name, seeds=(0, 1), epochs=3)
    store = tmp_path / "s.db"
    tb = tmp_path / "tb"
    assert main(["sweep", str(p), "--store", str(store), "--tensorboard", str(tb), "--quiet"]) == 0
    dirs = [d for d in tb.rglob("*") if d.is_dir() and list(d.glob("events.out.tfevents.*"))]
    assert len(dirs) == 4 and all(len(str(d.relative_to(tb))) <= 60 for d in dirs)
    acc = EventAccumulator(str(dirs[0]))
    acc.Reload()
    assert {"train/loss", "train/acc", "test/loss", "test/acc"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("test/acc")] == [1, 2, 3]
    with RunStore(store) as st:
        rid = dirs[0].name
        want = [e["test_acc"] for e in st.epochs(rid)]
    assert [e.value for e in acc.Scalars("test/acc")] == pytest.approx(want, rel=1e-6)
    capsys.readouterr()
    assert main(["plot", "--store", str(store), "--sweep", long_name, "-o", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["report", "--store", str(store), "--sweep", long_name, "-o", str(tmp_path / "r.html")]) == 0
    parser = _Tags()
    parser.feed((tmp_path / "r.html").read_text())
    assert len(parser.imgs) == 3 and all(s.startswith("data:image/png;base64,") for s in parser.imgs)
    assert parser.tables >= 2 and parser.external == []
    import base64

    assert base64.b64decode(parser.imgs[0].split(",", 1)[1])[:4] == b"\x89PNG"


@pytest.mark.slow
def test_ray_executor_on_local_two_cpu_ray(tmp_path):
    pytest.importorskip("ray")
    cfg = load_config(write_config(tmp_path / "c.toml", seeds=(0,)))
    s = run_sweep(cfg, tmp_path / "ray.db", executor="ray", workers=2, log=quiet)
    assert set(s.finished.values()) == {"done"}
    run_sweep(cfg, tmp_path / "local.db", workers=1, threads=1, log=quiet)  # Ray tasks use 1 thread each
    with RunStore(tmp_path / "ray.db") as a, RunStore(tmp_path / "local.db") as b:
        for r in a.runs("t"):
            ea = [{k: v for k, v in e.items() if k != "seconds"} for e in a.epochs(r["run_id"])]
            eb = [{k: v for k, v in e.items() if k != "seconds"} for e in b.epochs(r["run_id"])]
            assert ea == eb and len(ea) == 2
    again = run_sweep(cfg, tmp_path / "ray.db", executor="ray", workers=2, log=quiet)
    assert again.skipped == 2


def test_reproduce_recipes_parse_and_adapt():
    from bnlab.experiments.reproduce import adapt, load_recipe, recipe_names

    assert recipe_names() == ["cifar", "deeplizard", "groupnorm", "ioffe", "keras-mlp", "lr-range", "renorm", "resnet20",
                              "s4tf", "santurkar", "syncbn"]
    for name in recipe_names():
        cfg = load_recipe(name)
        assert cfg.claim.get("text") and cfg.runs()
    small = adapt(load_recipe("deeplizard"), epochs=2, seeds=1)
    assert small.name == "deeplizard-e2-s1" and [r.settings.epochs for r in small.runs()] == [2, 2]
    assert {r.settings.bn for r in small.runs()} == {"none", "tutorial"}
    with pytest.raises(ConfigError, match="no recipe named .nope."):
        load_recipe("nope")


def test_settings_hash_ignores_data_dir():
    from bnlab.experiments import run_id

    assert run_id(TrainSettings(data_dir="/a")) == run_id(TrainSettings(data_dir="/b"))
    assert run_id(TrainSettings(lr=0.1)) != run_id(TrainSettings(lr=0.2))


def test_workers_auto_follows_the_networks(tmp_path, capsys):
    from bnlab.experiments.sweep import auto_workers, check_runs

    assert auto_workers({"conv": False, "nproc": 1}, cores=2)[:2] == (2, 1)   # dense: one process per core
    assert auto_workers({"conv": True, "nproc": 1}, cores=2)[:2] == (1, 2)    # conv: one process, every core
    assert auto_workers({"conv": False, "nproc": 2}, cores=4)[:2] == (1, 4)   # runs with processes of their own
    assert auto_workers({"conv": True, "nproc": 1}, "ray", cores=3)[:2] == (3, 1)
    dense = load_config(write_config(tmp_path / "d.toml", name="d", seeds=(0,)))
    assert check_runs(dense) == {"conv": False, "nproc": 1}
    conv = parse_config({"name": "c", "dataset": "fashion-mnist", "seeds": [0], "fixed": {"bn": "after"},
                         "grid": {"model": ["keras-mlp", "deeplizard-cnn"]}})
    assert check_runs(conv)["conv"] is True  # one convolutional network in the grid decides
    lines = []
    s = run_sweep(dense, tmp_path / "a.db", workers="auto", log=lines.append)
    cores = len(os.sched_getaffinity(0))
    # 2 runs (one seed, bn none/after): at most that many processes, one thread each
    assert s.threads == 1 and f"{min(cores, 2)} worker(s), 1 thread(s) each (auto: dense networks" in lines[0]
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(tmp_path / "d.toml"), "--store", str(tmp_path / "b.db"), "--workers", "two"])
    assert exit_.value.code == 2
    assert "--workers: expected a positive whole number or auto, got 'two'" in capsys.readouterr().err


def test_workers_use_the_drivers_directory_for_relative_paths(tmp_path, monkeypatch):
    """Workers forked from a fork server started elsewhere still read and write where the
    driver means: a relative store path lands in the driver's directory."""
    from bnlab.experiments.workers import start_worker_server

    start_worker_server()  # started here, in the test's directory
    (tmp_path / "w").mkdir()
    monkeypatch.chdir(tmp_path / "w")
    cfg = load_config(write_config(tmp_path / "w" / "c.toml", seeds=(0,)))
    s = run_sweep(cfg, "rel.db", workers=2, log=quiet)
    assert set(s.finished.values()) == {"done"} and len(s.finished) == 2
    with RunStore(tmp_path / "w" / "rel.db") as st:
        assert {r["status"] for r in st.runs()} == {"done"}


@pytest.mark.parametrize("argv,starts", [
    (["sweep", "c.toml"], True), (["sweep", "c.toml", "--workers", "2"], True), (["reproduce", "no-such-recipe"], True),
    (["sweep", "--set", "epochs=1", "c.toml", "--workers=2"], True),
    (["sweep", "c.toml", "--workers", "1"], False), (["sweep", "c.toml", "--workers", "01"], False),
    (["sweep", "c.toml", "--workers", "x"], False), (["sweep", "c.toml", "--executor", "ray"], False),
    (["train", "--model", "no-such-model"], False), (["sweep", "--help"], False), (["sweep", "c.toml", "--workers"], False),
])
def test_the_cli_starts_the_fork_server_before_it_imports_torch(argv, starts):
    # the server imports torch in parallel with the driver only if it starts first (measured: runs
    # of a 2-worker sweep began ~1 s later when importing bnlab.experiments pulled in torch first).
    # Through main(): each command then fails at once (no such file, recipe or model) or prints
    # help; what counts is whether and when the server was started.
    code = """if True:
        import sys
        import bnlab.experiments.workers as w
        seen = []
        real = w.start_worker_server
        w.start_worker_server = lambda: seen.append('torch' in sys.modules)
        from bnlab.cli import main
        try:
            main(sys.argv[1:])
        except SystemExit:
            pass
        print('RESULT', seen)
    """
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    got = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert got == ["RESULT [False]" if starts else "RESULT []"], out.stdout + out.stderr


def test_a_ray_address_where_nothing_listens_is_one_line_before_anything_is_written(tmp_path):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(write_config(tmp_path / "c.toml", seeds=(0,)))
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=f"127.0.0.1:{port}: nothing answers there .*ray status --address"):
        run_sweep(cfg, tmp_path / "s.db", executor="ray", ray_address=f"127.0.0.1:{port}", log=quiet)
    assert time.monotonic() - t0 < 10  # Ray alone retries for ~14 minutes
    with pytest.raises(ConfigError, match="99999 is not a port"):
        run_sweep(cfg, tmp_path / "s.db", executor="ray", ray_address="127.0.0.1:99999", log=quiet)
    assert not (tmp_path / "s.db").exists()
