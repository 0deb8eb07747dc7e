"""Running the runs of a sweep: one function per run, and the executors that call it.

``execute_run`` trains one run. Given a store path it claims the run, renews its lease while it
trains and writes each epoch as it finishes (the last one together with the final status);
without one it returns everything, for executors whose workers cannot reach the store (Ray).
Executors: ``local`` with 1 worker (in this process), ``local`` with N workers (N spawned
processes, cores/N torch threads each, which end when the driver process ends, however it
ends), ``ray``.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import sys
import threading
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from bnlab.errors import BnlabError, ConfigError
from bnlab.experiments.store import DEFAULT_LEASE, pid_alive
from bnlab.train import train
from bnlab.train.callbacks import Callback

_DATA_CACHE: dict = {}


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def environment() -> dict:
    """Where a run ran: versions, threads, host and process, and the Ray node when in a Ray task."""
    from bnlab import __version__
    from bnlab.nn import backend_name

    env = {"torch": str(torch.__version__), "bnlab": __version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "host": socket.gethostname(), "pid": os.getpid(),
           "bn_backend": backend_name()}
    ray = sys.modules.get("ray")  # imported only where a Ray worker runs this
    if ray is not None and ray.is_initialized():
        env["ray_node"] = ray.get_runtime_context().get_node_id()
    return env


def _datasets(settings):
    from bnlab.train import load_data

    key = data_key(settings)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()  # keep one dataset in memory per process
        _DATA_CACHE[key] = load_data(settings)
    return _DATA_CACHE[key]


class RunTakenOver(Exception):
    """The run's lease expired and another process reran it: this process must stop writing it."""


class StoreEpochs(Callback):
    """Writes each epoch to the store as it ends, holding back the latest so the last one lands
    together with the run's final status. Without a store it only collects them."""

    def __init__(self, store, run_id):
        self.store, self.run_id, self.held, self.all = store, run_id, None, []

    def on_epoch_end(self, state) -> None:
        record = dict(state.history.epochs[-1])
        if self.held is not None and self.store is not None and not self.store.add_epoch(self.run_id, self.held):
            raise RunTakenOver(self.run_id)
        self.held = record
        self.all.append(record)

    def tail(self):
        if self.store is None:
            return self.all
        return [self.held] if self.held is not None else []


def execute_run(run_id: str, settings: dict, *, store_path: str | None = None, threads: int | None = None,
                tensorboard: str | None = None, sweep: str = "", lease: float = DEFAULT_LEASE,
                datasets=None) -> dict:
    """Train one run; returns ``{run_id, status, epochs, error, stop_reason, summary, env, activations}``.

    With a store, ``status`` is ``skipped`` when the run is finished or running elsewhere, and
    ``lost`` when its lease expired while it ran and another process took it over (nothing more
    is written for it here). ``lease``: seconds the store waits for a heartbeat of a running run.

    An error of the run itself (in :func:`bnlab.train.train`) does not raise here: its status is
    ``failed`` and ``error`` holds the message (a :class:`BnlabError`) or the traceback. Anything
    else propagates (an interruption, a store that cannot be opened, an unknown setting); a run
    this call claimed is then put back in the store's queue.

    Args:
        run_id: the run's id (a key of the store's ``runs`` table when there is a store).
        settings: the run's settings as a dict (:meth:`TrainSettings.to_dict`).
        store_path: the run store to claim the run in and write it to; ``None``: write nothing.
        threads: torch threads for this process (``None``: leave as is).
        tensorboard: a folder for TensorBoard event files (``None``: none).
        sweep: the sweep's name (names the TensorBoard folder).
        lease: see above.
        datasets: the run's ``(train, test)`` (:func:`bnlab.train.load_data`); ``None``: loaded
            here (and kept for the next run of this process with the same data).

    Returns:
        ``status`` is ``done``, ``diverged``, ``failed``, ``skipped`` (only ``run_id`` and
        ``status`` then) or ``lost``; ``epochs`` are the epoch records, ``summary`` and
        ``activations`` the activation tracker's and landscape probe's (empty without them),
        ``env`` where it ran.

    Example::

        run = load_config("deeplizard").override({"epochs": 1}).runs()[0]
        out = execute_run(run.run_id, run.settings.to_dict())   # no store: everything returned
        out["status"], out["epochs"][-1]["test_acc"]
    """
    from bnlab.experiments.store import RunStore
    from bnlab.train import TrainSettings

    if threads:
        torch.set_num_threads(threads)
    store = RunStore(store_path, lease=lease) if store_path else None
    env = environment()
    lost = {"run_id": run_id, "status": "lost", "epochs": [],
            "error": "its lease expired and another process took it over (see --lease)"}
    try:
        if store is not None and not store.claim(run_id, os.getpid(), env):
            return {"run_id": run_id, "status": "skipped"}
        with store.heartbeats() if store is not None else nullcontext():
            s = TrainSettings.from_dict(settings)
            sink = StoreEpochs(store, run_id)
            res = None
            try:
                if s.nproc > 1:  # a data-parallel run: its own processes, started from here
                    from bnlab.train.distributed import train_in_processes

                    per_rank = max(1, (threads or cpu_count()) // s.nproc)  # the run's threads, shared by its processes
                    res = train_in_processes(s, threads=per_rank, tensorboard=tensorboard, name=sweep, run_id=run_id)
                    for i in range(len(res.history.epochs)):  # into the store as train() would have written them
                        sink.on_epoch_end(SimpleNamespace(history=SimpleNamespace(epochs=res.history.epochs[:i + 1])))
                else:
                    data = _datasets(s) if datasets is None else datasets
                    res = train(s, datasets=data, callbacks=[sink], progress=False, tensorboard=tensorboard, name=sweep,
                                run_id=run_id)
                status, error, stop = res.history.status, None, res.history.stop_reason
            except RunTakenOver:
                return lost
            except BnlabError as e:
                status, error, stop = "failed", str(e), None
            except Exception:  # noqa: BLE001 - a failed run must not take the sweep down; the store keeps the traceback
                status, error, stop = "failed", traceback.format_exc(limit=8), None
            summary = res.summary() if res is not None else {}
            activations = [(r["step"], r["layer"], {k: v for k, v in r.items() if k not in ("step", "layer")})
                           for r in (res.records() if res is not None else [])]
            out = {"run_id": run_id, "status": status, "epochs": sink.all, "error": error, "stop_reason": stop,
                   "summary": summary, "env": env, "activations": activations}
            if store is not None:
                if activations and not store.add_activations(run_id, activations):
                    return lost
                if not store.finish(run_id, status, last_epochs=sink.tail(), error=error, stop_reason=stop, env=env,
                                    summary=summary):
                    return lost
        return out
    except BaseException:
        if store is not None:
            store.requeue(run_id, "interrupted")
        raise
    finally:
        if store is not None:
            store.close()


def watch_parent(parent_pid: int, interval: float = 0.5, on_gone=None) -> threading.Thread:
    """Call ``on_gone`` (default: end this process at once) as soon as process ``parent_pid``
    (the sweep's driver) is gone or a zombie, checked every ``interval`` seconds from a daemon
    thread.

    A driver killed with SIGKILL cannot stop its workers; without this they would live on,
    orphaned, holding runs. Their runs stay ``running`` with a dead pid, and the next sweep
    reruns them. The driver need not be the worker's parent (a fork server's workers are the
    server's children, and the server lives as long as any of them does)."""
    def gone():
        os._exit(1)

    def watch():
        while pid_alive(parent_pid):
            time.sleep(interval)
        (on_gone or gone)()

    thread = threading.Thread(target=watch, name="bnlab-watch-driver", daemon=True)
    thread.start()
    return thread


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (the portable watchdog of
    :func:`watch_parent` covers the rest, and the moment before this call)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_start(driver_pid: int, cwd: str | None = None) -> None:
    """Initializer of each worker process of a local sweep: work in the driver's directory (a
    fork server's workers start in the server's, which may be another by now), and die with the
    driver (the kernel kills a spawned worker with its parent; the watchdog covers a fork
    server's workers, whose parent is the server)."""
    if cwd is not None:
        os.chdir(cwd)  # relative store, data, model and TensorBoard paths mean what they meant to the driver
    _die_with_parent()
    watch_parent(driver_pid)


@dataclass
class Task:
    run_id: str
    settings: dict
    label: str


def run_local(tasks, store_path: str, workers: int, tensorboard: str | None, sweep: str, report,
              threads: int | None = None, lease: float = DEFAULT_LEASE) -> None:
    """Run tasks (any iterable, read as workers become free) here (1 worker) or in ``workers``
    processes sharing the store file (forked from a fork server that has torch loaded, see
    :mod:`bnlab.experiments.workers`; spawned where there is none), each with ``threads`` torch
    threads (default: cores / workers). The worker processes end when this process ends, even
    when it is killed."""
    threads = threads or max(1, cpu_count() // workers)
    if workers == 1:
        old = torch.get_num_threads()
        try:
            for t in tasks:
                report(t, execute_run(t.run_id, t.settings, store_path=store_path, threads=threads,
                                      tensorboard=tensorboard, sweep=sweep, lease=lease))
        finally:
            torch.set_num_threads(old)
        return
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from bnlab.experiments.workers import worker_context

    ctx = worker_context()
    todo = iter(tasks)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_start,
                             initargs=(os.getpid(), os.getcwd())) as pool:
        pending: dict = {}
        broken = False

        def submit_more():
            # a few tasks ahead of the workers, not all of them: the tasks stay lazy
            while len(pending) < 2 * workers:
                t = next(todo, None)
                if t is None:
                    return
                pending[pool.submit(execute_run, t.run_id, t.settings, store_path=store_path, threads=threads,
                                    tensorboard=tensorboard, sweep=sweep, lease=lease)] = t

        try:
            submit_more()
        except BrokenProcessPool:
            broken = True
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                t = pending.pop(fut)
                try:
                    report(t, fut.result())
                except BrokenProcessPool:
                    broken = True
                    report(t, {"run_id": t.run_id, "status": "interrupted",
                               "error": "a worker process died (killed?); rerun the sweep to resume"})
            if not broken:
                try:
                    submit_more()
                except BrokenProcessPool:
                    broken = True
        if broken:
            raise WorkerDied("a worker process died; finished runs are kept: run the same command again to resume")


class WorkerDied(BnlabError):
    """A worker process ended abruptly (killed, out of memory).

    Raised by :func:`run_sweep` with ``workers > 1`` after the other runs in flight are reported;
    finished runs are kept in the store, so running the same sweep again resumes. Its exit code
    in the CLI is 1, not 2: the command was right, the machine failed it.
    """

    exit_code = 1


def _compact(ds):
    """``ds`` with tensors that hold only its examples (a limited split is a view of the whole
    split, and pickling a view copies all of its storage)."""
    import dataclasses

    return dataclasses.replace(ds, x=ds.x.clone(), y=ds.y.clone())


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Refuse a ``HOST:PORT`` Ray address where nothing listens, at once (Ray itself retries for
    about 14 minutes before it gives up). Other forms (``auto``, ``ray://...``) are left to Ray."""
    import re

    m = re.fullmatch(r"\[?([^\]/]+?)\]?:(\d+)", address)
    if not m:
        return
    host, port = m.group(1), int(m.group(2))
    if not 0 < port < 65536:
        raise ConfigError(f"--ray-address {address}: {port} is not a port (1-65535)")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise ConfigError(f"--ray-address {address}: nothing answers there ({e.strerror or e}): is the Ray head up? "
                          f"check with: ray status --address {address}") from None


def data_key(settings) -> tuple:
    """What decides a run's data: runs with equal keys train on the same ``(train, test)``."""
    return (settings.dataset, settings.data_dir, settings.standardize, settings.train_limit, settings.test_limit,
            settings.image_size, settings.channels)


def run_ray(tasks, store, address: str | None, tensorboard: str | None, sweep: str, report,
            workers: int | None = None, threads: int = 1, max_retries: int = 3) -> None:
    """Run tasks as Ray tasks (``threads`` torch threads and as many Ray CPUs each) on the cluster at
    ``address`` (``None``: a new local instance of ``workers`` CPUs; a Ray this process is
    already connected to is used as it is); results come
    back to this process, the driver, which alone claims the runs, renews their leases and writes
    the store: the workers need neither the store nor a shared filesystem.

    Data: the driver loads each distinct dataset once (uint8, as every run holds it; a limited
    split as a compact copy) and puts it in Ray's object store; every task reads its data from
    there, so a worker node needs no copy of the data. Runs of several processes each (``nproc``
    > 1) load their data on the node.

    Faults: a task whose worker process or node dies is retried by Ray (on any live node) up to
    ``max_retries`` times; when Ray gives up, or loses the task's result, the run goes back in
    the store's queue (reported as ``interrupted``) and the next ``bnlab sweep`` reruns it. A
    killed driver leaves its claimed runs ``running`` under its dead pid; the next sweep reruns
    them (see :mod:`bnlab.experiments.store`). A run's own error, and a Ray error that would
    repeat (an out-of-memory kill, a task that cannot be scheduled or deserialized), is
    ``failed`` with its message.
    """
    try:
        import ray
        from ray.exceptions import LocalRayletDiedError, NodeDiedError, ObjectLostError, RayError, WorkerCrashedError
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'bnlab[ray]'") from None
    from bnlab.train import TrainSettings, load_data

    machine_failed = (WorkerCrashedError, NodeDiedError, LocalRayletDiedError, ObjectLostError)
    started_here = not ray.is_initialized()
    if started_here:
        kwargs = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
        if address:
            kwargs["address"] = address
        else:  # a new instance of our own, even when a `ray start` cluster runs on this machine
            kwargs.update(address="local", num_cpus=workers or cpu_count())
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[-1]  # Ray's messages run to many lines
            hint = (" (a cluster with token authentication needs RAY_AUTH_MODE=token and its token here, see "
                    "docs/cluster.md)" if address else "")
            raise ConfigError(f"could not connect to Ray at {address or 'a new local instance'}: {why}{hint}") from None
    # a task asking for more CPUs than any node has would wait forever: ask for at most that many
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if largest < 1:
        raise ConfigError(f"the Ray cluster at {address or 'this machine'} has no node with a CPU: add one, or use "
                          "--executor local")
    refs = {}
    claimed = None  # a run claimed and not yet submitted
    shipped: dict = {}  # data key -> the object store's copy of (train, test)
    try:
        with store.heartbeats():  # this process owns the runs: it keeps their leases
            remote = ray.remote(max_retries=max_retries, retry_exceptions=False)(execute_run)
            for t in tasks:
                if not store.claim(t.run_id, os.getpid(), {"executor": "ray"}):
                    continue
                claimed = t
                s = TrainSettings.from_dict(t.settings)
                data = None
                if s.nproc == 1:
                    key = data_key(s)
                    if key not in shipped:
                        shipped[key] = ray.put(tuple(_compact(d) for d in load_data(s)))
                    data = shipped[key]
                run_threads = max(threads, s.nproc)  # a data-parallel run's processes share them
                refs[remote.options(num_cpus=int(min(run_threads, largest))).remote(
                    t.run_id, t.settings, threads=run_threads, tensorboard=tensorboard, sweep=sweep, datasets=data)] = t
                claimed = None
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                t = refs[done[0]]
                try:
                    out = ray.get(done[0])
                except machine_failed as e:  # the cluster failed the run: it is not the run's fault
                    store.requeue(t.run_id, f"interrupted: {type(e).__name__} (Ray gave up after {max_retries} "
                                            "retries)")
                    report(t, {"run_id": t.run_id, "status": "interrupted", "epochs": [],
                               "error": f"{type(e).__name__}: the run is queued again; run the same command to resume"})
                    continue
                except RayError as e:  # the task raised (execute_run keeps a run's own errors), or cannot run
                    out = {"run_id": t.run_id, "status": "failed", "epochs": [],
                           "error": f"ray task failed ({type(e).__name__}): {e}"}
                if out.get("activations"):
                    store.add_activations(t.run_id, out["activations"])
                if not store.finish(t.run_id, out["status"], last_epochs=out.get("epochs", []), error=out.get("error"),
                                    stop_reason=out.get("stop_reason"), env=out.get("env"), summary=out.get("summary")):
                    out = {"run_id": t.run_id, "status": "lost", "epochs": [],
                           "error": "its lease expired and another process took it over (see --lease)"}
                report(t, out)
    except BaseException:
        for ref, t in refs.items():
            if store.status(t.run_id) == "running":
                try:
                    ray.cancel(ref, force=True)  # the caller's Ray (not ours) would otherwise go on running them
                except Exception:  # noqa: BLE001 - Ray itself may be what failed; the requeue matters more
                    pass
                store.requeue(t.run_id, "interrupted")
        if claimed is not None:
            store.requeue(claimed.run_id, "interrupted")
        raise
    finally:
        if started_here:
            ray.shutdown()
