"""Where a local sweep's worker processes come from, without importing torch here.

On Linux they are forked from a fork server: one clean process, started as early as possible,
that imports torch and bnlab once (about 4 s on this machine) and then forks each worker in a few
milliseconds with all of that already in memory. The server is started before torch's thread
pools exist anywhere in it and holds no run store connection, so nothing a fork must not copy is
copied (OpenMP pools, SQLite handles). Elsewhere (macOS, Windows) workers are spawned, each
importing torch itself.

``bnlab sweep``/``reproduce`` start the server first thing, so it imports torch while the
driver does the same and checks the sweep; :func:`bnlab.experiments.run_sweep` starts it (if it
is not running yet) before checking the runs.
"""

from __future__ import annotations

import multiprocessing as mp

# torch, bnlab.nn (its compiled kernels), bnlab.train, the data code; and torch._dynamo, which
# torch imports when the first optimizer is made (its constructor is wrapped by
# torch._disable_dynamo): ~2.5 s that every worker would otherwise pay before its first run
PRELOAD = ["torch._dynamo", "bnlab.experiments.execute"]


def worker_context():
    """The multiprocessing context of sweep workers: the preloading fork server where the
    platform has one, else spawn."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return mp.get_context("spawn")


def start_worker_server() -> None:
    """Start the fork server now, in the background (no-op where workers are spawned, or when it
    already runs)."""
    ctx = worker_context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def stop_worker_server() -> None:
    """Stop the fork server at once, even while it is still importing (when the sweep turns
    out to need no worker processes: its import would only take CPU from the runs)."""
    import os
    import signal
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGKILL)
        server._stop()  # closes its pipes and collects it (CPython's own, used by its tests)
    except (OSError, AttributeError):
        pass
