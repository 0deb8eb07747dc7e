"""The sweep driver: check a config, record it in the store, run what is not finished."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bnlab.errors import ConfigError
from bnlab.experiments.config import MAX_RUNS, NOT_IDENTITY, Run, SweepConfig, identity_hash, run_id
from bnlab.experiments.execute import Task, check_ray_address, cpu_count, run_local, run_ray
from bnlab.experiments.store import DEFAULT_LEASE, FINISHED, RunStore

EXECUTORS = ("local", "ray")


@dataclass
class SweepSummary:
    """What a sweep did (``finished``: the runs that ended in this call) and where its runs
    stand in the store afterwards (``counts``: runs of this config per status).

    What :func:`run_sweep` returns. ``total`` is the number of runs of the config, ``skipped``
    how many were already finished when it started, ``seconds`` how long it took.

    Example::

        summary = run_sweep(cfg, "runs/bnlab.db")
        if not summary.complete:
            print(summary.unfinished("runs/bnlab.db"))
    """

    name: str
    total: int
    skipped: int
    finished: dict = field(default_factory=dict)  # run_id -> status, for the runs that ended in this call
    seconds: float = 0.0
    counts: dict = field(default_factory=dict)  # status -> runs of this config in the store at the end
    running_elsewhere: list = field(default_factory=list)  # [{run_id, pid, host, ...}] owned by other processes
    threads: int | None = None  # torch threads per run (part of each run's identity)
    version: int | None = None  # the config's version in the store

    def __repr__(self) -> str:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items())) or "nothing in the store"
        return (f"SweepSummary({self.name!r}: {self.total} run(s), {self.skipped} already finished, "
                f"{len(self.finished)} ended now in {self.seconds:.1f}s; store: {counts})")

    @property
    def failed(self) -> int:
        """Runs of this config that failed."""
        return self.counts.get("failed", 0)

    @property
    def interrupted(self) -> int:
        """Runs still queued: interrupted, or never started."""
        return self.counts.get("queued", 0)

    @property
    def still_running(self) -> int:
        """Runs still running in another process (this one left them alone)."""
        return self.counts.get("running", 0)

    @property
    def complete(self) -> bool:
        """Every run is done or diverged."""
        return self.failed + self.interrupted + self.still_running == 0

    def unfinished(self, store: str | Path) -> str:
        """One line on the runs that are neither done nor diverged ("" when there are none)."""
        parts = []
        where = f"bnlab results --store {store} --sweep {self.name} --where status="
        if self.failed:
            parts.append(f"{self.failed} run(s) failed: see {where}failed")
        if self.interrupted:
            parts.append(f"{self.interrupted} run(s) interrupted or not started: run the same command again to "
                         f"resume (see {where}queued)")
        if self.still_running:
            owners = ", ".join(f"pid {r['pid']} on host {r['host']}" for r in self.running_elsewhere[:3])
            more = ", ..." if self.still_running > 3 else ""
            parts.append(f"{self.still_running} run(s) still running in another process ({owners}{more}): run the "
                         "same command again when it is done")
        return "; ".join(parts)


def describe(settings: dict, keys) -> str:
    return " ".join(f"{k}={settings[k]}" for k in keys)


def run_sweep(cfg: SweepConfig, store_path: str, *, workers: int = 1, executor: str = "local",
              ray_address: str | None = None, tensorboard: str | None = None, overrides: dict | None = None,
              threads: int | None = None, max_runs: int = MAX_RUNS, lease: float = DEFAULT_LEASE,
              log=print) -> SweepSummary:
    """Run every run of ``cfg`` that the store does not have finished. Re-running resumes.

    Before the store is opened, every run is checked (:func:`check_runs`): a mistake anywhere in
    the grid is a :class:`ConfigError` and nothing runs. A grid of more than ``max_runs`` runs is
    refused; runs are expanded one at a time, never held all at once.

    Threads and identity: each run uses ``threads`` torch threads (default: cores / workers for
    ``local``, 1 for ``ray``). Runs are deterministic for a given thread count, but across thread
    counts CPU kernels sum in another order, so results differ in the last digits (~1e-5 after an
    epoch). The resolved thread count is therefore part of each run's identity (and of its stored
    settings, as ``threads``): a resume with another thread count, say after changing
    ``workers``, does not mix numerically different runs into one sweep; it runs them again at
    the new count, and says so, naming the ``--threads`` value that resumes the finished ones.
    Finished runs of an older bnlab (identity without the thread count) are resumed when the
    thread count their environment recorded is the one this sweep uses.

    Ownership: a running run is rerun when its owner is gone or its heartbeat is older than
    ``lease`` seconds (see :mod:`bnlab.experiments.store`). The summary counts the runs left
    failed, queued (interrupted) or running in another process.

    A run that fails is recorded as ``failed`` and the sweep goes on; it does not raise.

    Args:
        cfg: the sweep (:func:`load_config`, :func:`parse_config`).
        store_path: the run store file (created if missing).
        workers: runs at a time: ``local`` runs them in this process (1) or in as many spawned
            processes; ``ray`` uses it as the CPU count of a new local Ray instance. ``"auto"``
            (the CLI's default): chosen from the cores and the networks (:func:`auto_workers`).
        executor: ``local`` or ``ray``.
        ray_address: the Ray cluster to connect to (``None``: ``$RAY_ADDRESS``, else start a local
            one); where nothing answers it is a :class:`ConfigError` at once.
        tensorboard: a folder for TensorBoard event files, under ``<folder>/<sweep>/<run id>``.
        overrides: settings applied to every run after the grid (e.g. ``{"data_dir": ...}``).
        threads: torch threads per run (see above).
        max_runs: the largest grid accepted.
        lease: see above, in seconds.
        log: called with each progress line (default ``print``).

    Returns:
        A :class:`SweepSummary`.

    Raises:
        ConfigError: an invalid argument, config value or run, a network that does not fit its
            data, a grid larger than ``max_runs``, an unusable store, or a missing optional
            package (tensorboard, ray).
        DataNotFoundError: a run's dataset cannot be found.
        WorkerDied: a worker process was killed; run the same sweep again to resume.

    Example::

        cfg = load_config("deeplizard").override({"epochs": 1, "train_limit": 10000})
        summary = run_sweep(cfg, "runs/bnlab.db", workers=2)
        results("runs/bnlab.db", cfg.name, by="bn")
    """
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"--threads must be a positive integer, got {threads}")
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}: choose local or ray")
    if workers != "auto" and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise ConfigError(f"--workers must be a positive integer or auto, got {workers}")
    if not isinstance(max_runs, int) or isinstance(max_runs, bool) or max_runs < 1:
        raise ConfigError(f"--max-runs must be a positive integer, got {max_runs}")
    if not isinstance(lease, (int, float)) or isinstance(lease, bool) or not lease > 0:
        raise ConfigError(f"--lease must be a positive number of seconds, got {lease}")
    callers_ray = False
    if executor == "ray":
        ray_address = ray_address or os.environ.get("RAY_ADDRESS")  # set by `ray job submit` for its entrypoint
        ray = sys.modules.get("ray")
        callers_ray = ray is not None and ray.is_initialized()  # run_ray then uses that one
        if ray_address and not callers_ray:
            check_ray_address(ray_address)  # before anything is checked or written
    if executor == "local" and workers != 1:
        from bnlab.experiments.workers import start_worker_server

        start_worker_server()  # it imports torch while the runs are checked
    if tensorboard:
        from bnlab.train.tensorboard import require_tensorboard

        require_tensorboard()
    profile = check_runs(cfg, overrides, max_runs)
    why = ""
    if workers == "auto":
        workers, auto_threads, why = auto_workers(profile, executor)
        threads = threads or auto_threads
        why = f" (auto: {why})"
        if workers == 1 and executor == "local":
            from bnlab.experiments.workers import stop_worker_server

            stop_worker_server()  # started in case it was needed: one process runs everything here
    threads = threads or (1 if executor == "ray" else max(1, cpu_count() // workers))
    store = RunStore(store_path, lease=lease)
    t0 = time.perf_counter()
    try:
        adopt = _legacy_adopter(store, threads)
        runs = (adopt(r) for r in cfg.iter_runs(overrides, threads))
        version = store.add_sweep(cfg.name, sweep_record(cfg, overrides, threads), runs)
        _log_other_thread_counts(store, cfg.name, version, threads, log)
        reset = store.reset_stale(sweep=cfg.name, version=version)
        if reset:
            log(f"{len(reset)} interrupted run(s) will run again from scratch")
        counts = store.version_counts(cfg.name, version)
        total = sum(counts.values())
        finished = sum(counts.get(s, 0) for s in FINISHED)
        summary = SweepSummary(cfg.name, total, finished, threads=threads, version=version)
        if summary.skipped:
            log(f"{summary.skipped} of {total} run(s) already finished in {store_path}: skipped")
        keys = cfg.grid_keys() + ["seed"]
        if total > finished:
            workers = min(workers, total - finished)  # no idle processes for the last few runs
            if executor == "ray" and callers_ray:
                where = "on the Ray instance this process is connected to"
            elif executor == "ray" and ray_address:
                where = f"on the Ray cluster at {ray_address}"
            else:
                where = f"with {executor} executor, {workers} worker(s)"
            log(f"running {total - finished} run(s) of sweep {cfg.name!r} {where}, {threads} thread(s) each{why}")

            def report(task, out):
                summary.finished[task.run_id] = out["status"]
                final = (out.get("epochs") or [{}])[-1]
                metric = f" test_acc {final['test_acc']:.4f}" if final.get("test_acc") is not None else ""
                err = f" ({out['error'].strip().splitlines()[-1]})" if out.get("error") else ""
                done = summary.skipped + len(summary.finished)
                log(f"[{done}/{total}] {out['status']:<8} {task.label}{metric}{err}")

            tasks = _unfinished_tasks(store, cfg.name, version, keys)
            if executor == "ray":
                run_ray(tasks, store, ray_address, tensorboard, cfg.name, report, workers, threads)
            else:
                run_local(tasks, str(store_path), workers, tensorboard, cfg.name, report, threads, lease)
        summary.counts = store.version_counts(cfg.name, version)
        summary.running_elsewhere = store.running(cfg.name, version)
        summary.seconds = time.perf_counter() - t0
        return summary
    finally:
        store.close()


def sweep_record(cfg: SweepConfig, overrides: dict | None, threads: int) -> dict:
    """The config as the store versions it: the sweep config, the torch threads of its runs and
    any override that changes their identity (``data_dir`` does not)."""
    record = {**cfg.to_dict(), "threads": threads}
    changed = {k: v for k, v in (overrides or {}).items() if k not in NOT_IDENTITY}
    if changed:
        record["overrides"] = changed
    return record


def check_runs(cfg: SweepConfig, overrides: dict | None = None, max_runs: int = MAX_RUNS) -> dict:
    """Find every mistake in a sweep before anything runs or is written: more than ``max_runs``
    runs (counted without expanding the grid), a bad value or combination in any run, a dataset
    that cannot be found, a network that does not build for its dataset's inputs (each distinct
    network built once).

    Returns what ``--workers auto`` decides on: ``{"conv": any network has a convolution,
    "nproc": the most processes one run uses}``."""
    n = cfg.size()
    if n > max_runs:
        raise ConfigError(f"sweep {cfg.name!r} has {n:,} runs ({cfg.size_text()}), more than the limit of "
                          f"{max_runs:,}: shrink the grid, or pass --max-runs {n} to run them all")
    cfg.check(overrides)
    data: dict = {}
    nets: dict = {}
    batch_classes: dict = {}  # the most classes a batch of each dataset is drawn from
    for run in cfg.iter_runs(overrides):
        s = run.settings
        where = (s.dataset, s.data_dir, s.image_size, s.channels)
        data.setdefault(where, run)
        nets.setdefault((where, s.model, *s.build_options().values()), run)
        batch_classes[where] = max(batch_classes.get(where, 0), s.batch_classes or 0)
    check_data(data.values())
    shapes = {where: _input_shape(*where) for where in data}
    import torch
    from torch import nn

    from bnlab.models import build

    profile = {"conv": False, "nproc": max(run.settings.nproc for run in nets.values())}
    for where, wanted in batch_classes.items():
        if wanted > shapes[where][1]:
            raise ConfigError(f"sweep {cfg.name!r}: batch_classes = {wanted} but {where[0]} has {shapes[where][1]} "
                              "classes; each batch can be drawn from at most that many")
    for (where, *_), run in nets.items():
        s = run.settings
        input_shape, classes = shapes[where]
        try:
            with torch.device("meta"):  # shapes only: no memory for the weights, however large
                net = build(s.model, input_shape=input_shape, num_classes=classes, **s.build_options())
            profile["conv"] |= any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in net.modules())
        except ConfigError as e:
            point = {"model": s.model, "bn": s.bn, **{k: getattr(s, k) for k in cfg.grid_keys()}}
            raise ConfigError(f"sweep {cfg.name!r} ({', '.join(f'{k}={v}' for k, v in point.items())}): "
                              f"{e}") from None
    return profile


def auto_workers(profile: dict, executor: str = "local", cores: int | None = None) -> tuple[int, int, str]:
    """``--workers auto``: ``(processes, torch threads per run, why)`` for a sweep's networks.

    The rule, measured on 2 cores (docs/benchmarks.md, benchmarks/sweep_scaling.py): a network
    with convolutions keeps every core busy from one process (its ops are large enough to split
    across threads), so one process with every core's thread is fastest; networks of dense
    layers only have ops too small to split, so one process per core with one thread each is;
    runs that start their own processes (``nproc`` > 1) run one at a time with every core. Ray
    runs one thread per task on as many CPUs as it has.
    """
    cores = cores or cpu_count()
    if executor == "ray":
        return cores, 1, "Ray: one thread per task"
    if profile.get("nproc", 1) > 1:
        return 1, cores, f"runs of {profile['nproc']} processes each: one run at a time"
    if profile.get("conv"):
        return 1, cores, "convolutional networks: one process uses every core"
    return cores, 1, "dense networks: one process per core"

def _input_shape(dataset: str, data_dir, image_size, channels) -> tuple[tuple, int]:
    """``(input shape, classes)`` of a dataset, from its test split (the smaller one)."""
    from bnlab.data import load

    opts = {k: v for k, v in (("image_size", image_size), ("channels", channels)) if v is not None}
    ds = load(dataset, "test", data_dir, **opts)
    return tuple(ds.input_shape), ds.num_classes


def check_data(runs) -> None:
    """Fail before anything runs (or is written) when a run's dataset cannot be found."""
    from bnlab.data import find, get_source
    from bnlab.errors import DataNotFoundError

    for dataset, data_dir in {(r.settings.dataset, r.settings.data_dir) for r in runs}:
        src = get_source(dataset)
        if src.marker is not None:
            find(dataset, data_dir)
        elif src.needs_files and (data_dir is None or not Path(data_dir).is_dir()):
            raise DataNotFoundError(f"{dataset} needs --data-dir: {src.missing_hint}")


def _legacy_adopter(store: RunStore, threads: int):
    """Map a run to the finished run an older bnlab stored for the same settings at the same
    thread count (its id has no thread count in it), when there is one; else leave it."""
    legacy = {rid: t for rid, t in store.legacy_finished().items() if t == threads}

    def adopt(run: Run) -> Run:
        if legacy:
            old = run_id(run.settings)
            if old in legacy:
                return Run(old, run.settings, run.threads)
        return run

    return adopt


def _log_other_thread_counts(store: RunStore, name: str, version: int, threads: int, log) -> None:
    """Say so when runs this sweep is about to run were finished before at another thread count."""
    other: dict[str, int] = {}
    for _, settings, env_threads in store.finished_runs(name):
        t = settings.pop("threads", None) or env_threads
        if t is not None and t != threads:
            other[identity_hash(settings)] = t
    if not other:
        return
    found = Counter()
    for _, settings in store.version_runs(name, version, unfinished=True):
        settings.pop("threads", None)
        t = other.get(identity_hash(settings))
        if t is not None:
            found[t] += 1
    for t, n in sorted(found.items()):
        log(f"{n} run(s) of sweep {name!r} finished with {t} thread(s); this sweep uses {threads} thread(s) per "
            f"worker, which gives slightly different numbers, so they run again: pass --threads {t} to resume them "
            "instead")


def _unfinished_tasks(store: RunStore, name: str, version: int, keys):
    """The tasks of the runs of this config that the store does not have finished, read from the
    store a chunk at a time (the settings without ``threads``, which is not a training setting)."""
    for rid, settings in store.version_runs(name, version, unfinished=True):
        settings.pop("threads", None)
        yield Task(rid, settings, describe(settings, keys))
