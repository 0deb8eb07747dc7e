"""One training run in several processes: ``bnlab train --nproc N`` and ``torchrun``.

``bnlab train --nproc N`` starts N copies of the same command on this machine, each with the
environment ``torchrun`` would give it (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``) and ``cores / N`` torch threads; the copies
see that environment and join one process group. Under ``torchrun`` (``torchrun --nnodes 2
--nproc-per-node 2 --rdzv-endpoint HOST:PORT -m bnlab train ...``, across machines) the same
environment comes from torchrun and nothing is started here.

In the group, :func:`bnlab.train.fit` trains with ``DistributedDataParallel``; rank 0 alone
prints, writes the checkpoint and the TensorBoard files. The backend is gloo on the CPU and nccl
on CUDA.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
import socket
import subprocess
import sys

from bnlab.errors import ConfigError


def env_rank_world() -> tuple[int, int] | None:
    """``(rank, world size)`` when this process was started as part of a group (by
    :func:`launch` or torchrun), else ``None``."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], nproc: int, threads: int | None = None, module: str = "bnlab") -> int:
    """Run ``python -m <module> <argv>`` (``bnlab <argv>``) in ``nproc`` processes forming one
    group on 127.0.0.1, with ``threads`` torch threads each (default: cores / nproc); wait for all.

    If one fails, the others are stopped (they would wait for it forever). Returns the first
    non-zero exit code, else 0.
    """
    port = _free_port()
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": str(threads)}
        procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], env=env))
    codes: dict[int, int] = {}
    try:
        while len(codes) < nproc:
            for i, p in enumerate(procs):
                if i in codes:
                    continue
                try:
                    codes[i] = p.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
                if codes[i] != 0:
                    for q in procs:
                        if q.poll() is None:
                            q.terminate()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return next((c for c in codes.values() if c != 0), 0)


@contextlib.contextmanager
def process_group(device):
    """Join the group this process was started in (gloo on the CPU, nccl on CUDA) for the
    duration; nothing outside a group. Yields ``(rank, world)``."""
    found = env_rank_world()
    if found is None:
        yield 0, 1
        return
    import torch
    import torch.distributed as dist

    from bnlab.devices import resolve_device

    backend = "nccl" if resolve_device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def check_world(nproc: int) -> None:
    """Refuse ``--nproc N`` that disagrees with the group torchrun started (its size rules)."""
    found = env_rank_world()
    if found is not None and nproc not in (1, found[1]):
        raise ConfigError(f"--nproc {nproc} under a launcher that started {found[1]} processes: leave out --nproc "
                          "(the launcher's world size is used)")


@dataclass
class ProcessesResult:
    """What :func:`train_in_processes` gives back: the run's ``history`` (rank 0's), and the
    activation tracker's and landscape probe's records and summary, as :class:`RunResult` has them."""

    history: "History"
    summary_: dict
    records_: list

    def summary(self) -> dict:
        return self.summary_

    def records(self) -> list[dict]:
        return self.records_


def train_in_processes(settings, *, threads: int | None = None, tensorboard=None, name: str = "train",
                       run_id: str | None = None) -> ProcessesResult:
    """Train a run with ``settings.nproc > 1`` from a single process (a sweep's worker): start
    its processes (:func:`launch`), wait, and return rank 0's result.

    Raises:
        BnlabError: the run's own error (a bad setting, missing data), as rank 0 reported it.
        RuntimeError: a process died without a report (killed, out of memory).
    """
    import json
    import tempfile
    from pathlib import Path

    from bnlab.errors import BnlabError
    from bnlab.train.loop import History

    with tempfile.TemporaryDirectory(prefix="bnlab-ddp-") as tmp:
        src, out = Path(tmp) / "settings.json", Path(tmp) / "result.json"
        src.write_text(json.dumps({"settings": settings.to_dict(), "tensorboard": str(tensorboard) if tensorboard else None,
                                   "name": name, "run_id": run_id}))
        code = launch([str(src), str(out)], settings.nproc, threads=threads, module="bnlab.train.distributed")
        if not out.exists():
            raise RuntimeError(f"the {settings.nproc} processes of the run ended (exit code {code}) without a result")
        got = json.loads(out.read_text())
    if got.get("error"):
        raise BnlabError(got["error"])
    h = got["history"]
    return ProcessesResult(History(h["status"], h["epochs"], h["steps"], h.get("stop_reason")), got["summary"],
                           got["records"])


def _main(src: str, out: str) -> int:
    """One process of :func:`train_in_processes`: join the group, train, rank 0 writes the result."""
    import json

    from bnlab._files import atomic_path
    from bnlab.errors import BnlabError
    from bnlab.train import TrainSettings, train

    job = json.loads(open(src).read())
    s = TrainSettings.from_dict(job["settings"])
    with process_group(s.device) as (rank, _):
        try:
            res = train(s, progress=False, tensorboard=job["tensorboard"] if rank == 0 else None, name=job["name"],
                        run_id=job["run_id"])
            result = {"history": res.history.to_dict(), "summary": res.summary(), "records": res.records()}
        except BnlabError as e:
            result = {"error": str(e)}
        if rank == 0:
            with atomic_path(out) as tmp:
                tmp.write_text(json.dumps(result))
    return 0


def exit_group_process(code: int) -> None:
    """End a process of a data-parallel group whose work is written and whose group is destroyed,
    without interpreter finalization: in it, gloo's C++ threads now and then abort the process
    (SIGABRT, "terminate called without an active exception"; seen once in 30 runs of `bnlab
    reproduce syncbn`, and in CI as a failed torchrun whose run had finished)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_group_process(_main(*sys.argv[1:3]))
