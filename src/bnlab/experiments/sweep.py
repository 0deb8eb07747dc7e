"""The sweep driver: expand a config, record it in the store, run what is not finished."""

from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass, field

from bnlab.errors import ConfigError
from bnlab.experiments.config import SweepConfig
from bnlab.experiments.execute import Task, run_local, run_ray
from bnlab.experiments.store import RunStore

EXECUTORS = ("local", "ray")


@dataclass
class SweepSummary:
    name: str
    total: int
    skipped: int
    finished: dict = field(default_factory=dict)  # run_id -> status
    seconds: float = 0.0


def describe(settings: dict, keys) -> str:
    return " ".join(f"{k}={settings[k]}" for k in keys)


def run_sweep(cfg: SweepConfig, store_path: str, *, workers: int = 1, executor: str = "local",
              ray_address: str | None = None, tensorboard: str | None = None, overrides: dict | None = None,
              threads: int | None = None, log=print) -> SweepSummary:
    """Run every run of ``cfg`` that the store does not have finished. Re-running resumes.

    Each worker uses ``threads`` torch threads (default cores / workers). Runs are deterministic
    for a given thread count; across thread counts, CPU matrix kernels sum in another order, so
    losses agree to ~1e-7 relative rather than bit for bit (pass the same ``threads`` to get
    bit-identical results from any number of workers).
    """
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"--threads must be a positive integer, got {threads}")
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}: choose local or ray")
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers must be a positive integer, got {workers}")
    if tensorboard:
        from bnlab.train.tensorboard import require_tensorboard

        require_tensorboard()
    runs = cfg.runs(overrides)
    unique = {r.run_id: r for r in runs}
    check_data(runs)
    store = RunStore(store_path)
    t0 = time.perf_counter()
    try:
        store.add_sweep(cfg.name, cfg.to_dict(), unique.values())
        reset = store.reset_stale(set(unique))
        if reset:
            log(f"{len(reset)} interrupted run(s) will run again from scratch")
        todo = [r for r in unique.values() if store.status(r.run_id) not in ("done", "diverged")]
        summary = SweepSummary(cfg.name, len(unique), len(unique) - len(todo))
        if summary.skipped:
            log(f"{summary.skipped} of {len(unique)} run(s) already finished in {store_path}: skipped")
        keys = cfg.grid_keys() + ["seed"]
        tasks = [Task(r.run_id, r.settings.to_dict(), describe(r.settings.to_dict(), keys)) for r in todo]
        if tasks:
            log(f"running {len(tasks)} run(s) of sweep {cfg.name!r} with {executor} executor, {workers} worker(s)")

            def report(task, out):
                summary.finished[task.run_id] = out["status"]
                final = (out.get("epochs") or [{}])[-1]
                metric = f" test_acc {final['test_acc']:.4f}" if final.get("test_acc") is not None else ""
                err = f" ({out['error'].strip().splitlines()[-1]})" if out.get("error") else ""
                done = summary.skipped + len(summary.finished)
                log(f"[{done}/{len(unique)}] {out['status']:<8} {task.label}{metric}{err}")

            if executor == "ray":
                run_ray(tasks, store, ray_address, tensorboard, cfg.name, report, workers)
            else:
                run_local(tasks, str(store_path), workers, tensorboard, cfg.name, report, threads)
        summary.seconds = time.perf_counter() - t0
        return summary
    finally:
        store.close()


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
