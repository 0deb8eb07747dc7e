"""The run store: every sweep, run and epoch in one SQLite file (WAL mode).

Tables:

- ``sweeps(name, config, created, updated)``: the config each sweep was last run with;
- ``runs(run_id, settings, seed, status, error, started, ended, env, pid, host, attempts,
  stop_reason, summary)``: one row per distinct resolved settings; ``status`` is ``queued``,
  ``running``, ``done``, ``diverged`` or ``failed``;
- ``sweep_runs(sweep, run_id)``: which runs a sweep has (runs with equal settings are shared);
- ``epochs(run_id, epoch, train_loss, train_acc, test_loss, test_acc, seconds)``.

Crash safety: a run is claimed (``running``, old epochs deleted) in one transaction and becomes
``done`` in one transaction together with its last epoch, so a process killed at any moment
leaves either a finished run or one that the next sweep reruns from scratch. Every write is an
``BEGIN IMMEDIATE`` transaction with a generous busy timeout, so concurrent workers queue for
the lock instead of failing with "database is locked".
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from bnlab.errors import ConfigError

DEFAULT_STORE = "runs/bnlab.db"
STATUSES = ("queued", "running", "done", "diverged", "failed")
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "seconds")

SCHEMA = """
CREATE TABLE IF NOT EXISTS sweeps (
    name TEXT PRIMARY KEY, config TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, settings TEXT NOT NULL, seed INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'diverged', 'failed')),
    error TEXT, started REAL, ended REAL, env TEXT, pid INTEGER, host TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, stop_reason TEXT, summary TEXT);
CREATE TABLE IF NOT EXISTS sweep_runs (
    sweep TEXT NOT NULL REFERENCES sweeps(name), run_id TEXT NOT NULL REFERENCES runs(run_id),
    PRIMARY KEY (sweep, run_id));
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL REFERENCES runs(run_id), epoch INTEGER NOT NULL,
    train_loss REAL, train_acc REAL, test_loss REAL, test_acc REAL, seconds REAL,
    PRIMARY KEY (run_id, epoch));
CREATE TABLE IF NOT EXISTS activations (
    run_id TEXT NOT NULL REFERENCES runs(run_id), step INTEGER NOT NULL, layer TEXT NOT NULL,
    stats TEXT NOT NULL, PRIMARY KEY (run_id, step, layer));
"""


def _pid_alive(pid: int | None, host: str | None) -> bool:
    if host is not None and host != socket.gethostname():
        return True  # another machine's process: no way to check, assume it is alive
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunStore:
    """A SQLite run store. Open one per process; it is safe to share the file between processes."""

    def __init__(self, path: str | Path = DEFAULT_STORE, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise ConfigError(f"run store {self.path} does not exist: run a sweep first (or pass --store)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=120, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA busy_timeout = 120000")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
            self.db.execute("PRAGMA foreign_keys = ON")
            with self.write():
                # statement by statement: executescript() would commit outside our transaction
                for stmt in SCHEMA.strip().split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"{self.path} is not a bnlab run store ({e})") from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextmanager
    def write(self):
        """One write transaction, taken with BEGIN IMMEDIATE (waits for the lock, never fails fast)."""
        for attempt in range(50):
            try:
                self.db.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                time.sleep(0.05 * (attempt + 1))
        else:
            raise RuntimeError(f"could not lock {self.path} for writing")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")

    # ---------------------------------------------------------------- sweeps and runs

    def add_sweep(self, name: str, config: dict, runs) -> None:
        """Record a sweep and its runs; runs already present keep their status and results."""
        now = time.time()
        with self.write() as db:
            db.execute("INSERT INTO sweeps(name, config, created, updated) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT(name) DO UPDATE SET config = excluded.config, updated = excluded.updated",
                       (name, json.dumps(config), now, now))
            for run in runs:
                db.execute("INSERT OR IGNORE INTO runs(run_id, settings, seed, status) VALUES (?, ?, ?, 'queued')",
                           (run.run_id, json.dumps(run.settings.to_dict(), sort_keys=True), run.settings.seed))
                db.execute("INSERT OR IGNORE INTO sweep_runs(sweep, run_id) VALUES (?, ?)", (name, run.run_id))

    def status(self, run_id: str) -> str | None:
        row = self.db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return row[0] if row else None

    def reset_stale(self, run_ids=None) -> list[str]:
        """Runs left ``running`` by a process that no longer exists go back to ``queued``."""
        reset = []
        with self.write() as db:
            rows = db.execute("SELECT run_id, pid, host FROM runs WHERE status = 'running'").fetchall()
            for rid, pid, host in rows:
                if (run_ids is None or rid in run_ids) and not _pid_alive(pid, host):
                    self._requeue(db, rid, None)
                    reset.append(rid)
        return reset

    @staticmethod
    def _clear_results(db, run_id: str) -> None:
        """Delete whatever a run wrote before it was interrupted (it reruns from scratch)."""
        db.execute("DELETE FROM epochs WHERE run_id = ?", (run_id,))
        db.execute("DELETE FROM activations WHERE run_id = ?", (run_id,))

    def _requeue(self, db, run_id: str, error: str | None) -> None:
        self._clear_results(db, run_id)
        db.execute("UPDATE runs SET status = 'queued', pid = NULL, error = ? WHERE run_id = ? AND status = 'running'",
                   (error, run_id))

    def claim(self, run_id: str, pid: int | None = None, env: dict | None = None) -> bool:
        """Mark a run ``running`` (deleting any partial epochs) unless it is finished or taken."""
        with self.write() as db:
            row = db.execute("SELECT status, pid, host FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(run_id)
            status, old_pid, host = row
            if status in ("done", "diverged") or (status == "running" and _pid_alive(old_pid, host)):
                return False
            self._clear_results(db, run_id)
            db.execute("UPDATE runs SET status = 'running', started = ?, ended = NULL, error = NULL, pid = ?, host = ?, "
                       "attempts = attempts + 1, env = ?, stop_reason = NULL, summary = NULL WHERE run_id = ?",
                       (time.time(), pid or os.getpid(), socket.gethostname(), json.dumps(env or {}), run_id))
        return True

    def add_epoch(self, run_id: str, record: dict) -> None:
        with self.write() as db:
            self._insert_epoch(db, run_id, record)

    @staticmethod
    def _insert_epoch(db, run_id: str, r: dict) -> None:
        db.execute("INSERT OR REPLACE INTO epochs(run_id, epoch, train_loss, train_acc, test_loss, test_acc, seconds) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (run_id, r["epoch"], r.get("train_loss"), r.get("train_acc"), r.get("test_loss"), r.get("test_acc"),
                    r.get("seconds")))

    def add_activations(self, run_id: str, rows: list[tuple[int, str, dict]]) -> None:
        with self.write() as db:
            db.executemany("INSERT OR REPLACE INTO activations(run_id, step, layer, stats) VALUES (?, ?, ?, ?)",
                           [(run_id, step, layer, json.dumps(stats)) for step, layer, stats in rows])

    def finish(self, run_id: str, status: str, *, last_epochs=(), error: str | None = None,
               stop_reason: str | None = None, summary: dict | None = None, env: dict | None = None) -> None:
        """End a run: its remaining epochs and its final status land in one transaction."""
        if status not in ("done", "diverged", "failed"):
            raise ValueError(status)
        with self.write() as db:
            for r in last_epochs:
                self._insert_epoch(db, run_id, r)
            db.execute("UPDATE runs SET status = ?, ended = ?, error = ?, stop_reason = ?, summary = ?, "
                       "env = COALESCE(?, env) WHERE run_id = ?",
                       (status, time.time(), error, stop_reason, json.dumps(summary) if summary else None,
                        json.dumps(env) if env else None, run_id))

    def requeue(self, run_id: str, error: str | None = None) -> None:
        """Put a run this process was running back in the queue (it was interrupted)."""
        with self.write() as db:
            self._requeue(db, run_id, error)

    # ---------------------------------------------------------------- queries

    def sweeps(self) -> list[dict]:
        rows = self.db.execute("SELECT s.name, s.updated, COUNT(r.run_id), "
                               "SUM(r.status IN ('done', 'diverged')) FROM sweeps s "
                               "LEFT JOIN sweep_runs sr ON sr.sweep = s.name LEFT JOIN runs r ON r.run_id = sr.run_id "
                               "GROUP BY s.name ORDER BY s.updated").fetchall()
        return [{"name": n, "updated": u, "runs": c, "finished": f or 0} for n, u, c, f in rows]

    def sweep_config(self, name: str) -> dict:
        row = self.db.execute("SELECT config FROM sweeps WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = ", ".join(s["name"] for s in self.sweeps()) or "none yet"
            raise ConfigError(f"no sweep named {name!r} in {self.path} (sweeps: {known})")
        return json.loads(row[0])

    def runs(self, sweep: str | None = None) -> list[dict]:
        """Every run (of ``sweep``) with its settings, status and final-epoch metrics."""
        if sweep is not None:
            self.sweep_config(sweep)  # clear error for an unknown sweep
            q = ("SELECT r.* FROM runs r JOIN sweep_runs sr ON sr.run_id = r.run_id WHERE sr.sweep = ? "
                 "ORDER BY r.rowid")
            rows = self.db.execute(q, (sweep,))
        else:
            rows = self.db.execute("SELECT * FROM runs ORDER BY rowid")
        cols = [c[0] for c in rows.description]
        out = []
        for row in rows.fetchall():
            r = dict(zip(cols, row))
            r["settings"] = json.loads(r["settings"])
            r["env"] = json.loads(r["env"]) if r["env"] else {}
            r["summary"] = json.loads(r["summary"]) if r["summary"] else {}
            last = self.db.execute(f"SELECT epoch, {', '.join(METRICS)} FROM epochs WHERE run_id = ? "
                                   "ORDER BY epoch DESC LIMIT 1", (r["run_id"],)).fetchone()
            r["epochs_done"] = last[0] if last else 0
            total = self.db.execute("SELECT SUM(seconds) FROM epochs WHERE run_id = ?", (r["run_id"],)).fetchone()[0]
            r["final"] = dict(zip(METRICS, last[1:])) if last else {}
            if last:
                r["final"]["seconds"] = total
            out.append(r)
        return out

    def epochs(self, run_id: str) -> list[dict]:
        rows = self.db.execute(f"SELECT epoch, {', '.join(METRICS)} FROM epochs WHERE run_id = ? ORDER BY epoch",
                               (run_id,)).fetchall()
        return [dict(zip(("epoch", *METRICS), r)) for r in rows]

    def activations(self, run_id: str) -> list[dict]:
        rows = self.db.execute("SELECT step, layer, stats FROM activations WHERE run_id = ? ORDER BY step, layer",
                               (run_id,)).fetchall()
        return [{"step": s, "layer": layer, **json.loads(st)} for s, layer, st in rows]

    def find_run(self, prefix: str) -> str:
        rows = self.db.execute("SELECT run_id FROM runs WHERE run_id LIKE ?", (prefix + "%",)).fetchall()
        if not rows:
            raise ConfigError(f"no run with id {prefix!r} in {self.path}: see the run_id column of 'bnlab results'")
        if len(rows) > 1:
            raise ConfigError(f"run id {prefix!r} is ambiguous ({len(rows)} runs match): give more characters")
        return rows[0][0]
