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


def launch(argv: list[str], nproc: int) -> int:
    """Run ``bnlab <argv>`` in ``nproc`` processes forming one group on 127.0.0.1; wait for all.

    If one fails, the others are stopped (they would wait for it forever). Returns the first
    non-zero exit code, else 0.
    """
    port = _free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": str(threads)}
        procs.append(subprocess.Popen([sys.executable, "-m", "bnlab", *argv], env=env))
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
