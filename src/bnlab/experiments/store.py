"""The run store: every sweep, run and epoch in one SQLite file (WAL mode).

Tables:

- ``sweeps(name, config, created, updated)``: the config each sweep was last run with;
- ``sweep_configs(sweep, version, config, created)``: every config a sweep was run with,
  numbered 1, 2, ... (a new version only when the config differs from the latest one);
- ``runs(run_id, settings, seed, status, error, started, ended, env, pid, host, attempts,
  stop_reason, summary, owner, pid_start, heartbeat)``: one row per distinct resolved settings;
  ``status`` is ``queued``, ``running``, ``done``, ``diverged`` or ``failed``;
- ``sweep_runs(sweep, run_id)``: which runs a sweep has (runs with equal settings are shared);
- ``sweep_run_versions(sweep, version, run_id)``: which runs each config version of a sweep has;
- ``epochs(run_id, epoch, train_loss, train_acc, test_loss, test_acc, seconds)``;
- ``activations(run_id, step, layer, stats)``.

A bnlab store is marked with ``PRAGMA application_id`` (:data:`APPLICATION_ID`) and
``PRAGMA user_version`` (:data:`SCHEMA_VERSION`); a store of an older bnlab (no mark, our
tables only) is migrated when opened for writing, and read as it is from read-only media.
Any other SQLite file is refused untouched.

Crash safety: a run is claimed (``running``, old epochs deleted) in one transaction and becomes
``done`` in one transaction together with its last epoch, so a process killed at any moment
leaves either a finished run or one that the next sweep reruns from scratch. Every write is an
``BEGIN IMMEDIATE`` transaction with a generous busy timeout, so concurrent workers queue for
the lock instead of failing with "database is locked".

Ownership: a claim records who runs the run: an owner token (random per process), the pid, the
pid's start time (Linux) and the host, and a heartbeat the owner refreshes while it runs (see
:meth:`RunStore.heartbeat`). A ``running`` run is *stale*, and the next sweep reruns it, when
its pid is gone, when the pid now belongs to another process (another start time), or when its
heartbeat is older than the lease (``lease`` seconds, default 10 minutes; the only test for a run
on another host). Writes of an owner whose run was taken over are refused.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from urllib.parse import unquote, urlsplit

from bnlab.errors import ConfigError

DEFAULT_STORE = "runs/bnlab.db"
STATUSES = ("queued", "running", "done", "diverged", "failed")
FINISHED = ("done", "diverged")
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "seconds")
APPLICATION_ID = 0x626E6C62  # "bnlb": marks a file as a bnlab run store (PRAGMA application_id)
SCHEMA_VERSION = 2  # PRAGMA user_version; 0 = the first stores (no mark); 2 = run ownership and config versions
DEFAULT_LEASE = 600.0  # seconds without a heartbeat after which a running run is taken to be dead
CHUNK = 1000  # rows per executemany when a sweep's runs are recorded

SCHEMA = """
CREATE TABLE IF NOT EXISTS sweeps (
    name TEXT PRIMARY KEY, config TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, settings TEXT NOT NULL, seed INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'diverged', 'failed')),
    error TEXT, started REAL, ended REAL, env TEXT, pid INTEGER, host TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, stop_reason TEXT, summary TEXT,
    owner TEXT, pid_start INTEGER, heartbeat REAL);
CREATE TABLE IF NOT EXISTS sweep_runs (
    sweep TEXT NOT NULL REFERENCES sweeps(name), run_id TEXT NOT NULL REFERENCES runs(run_id),
    PRIMARY KEY (sweep, run_id));
CREATE TABLE IF NOT EXISTS sweep_configs (
    sweep TEXT NOT NULL REFERENCES sweeps(name), version INTEGER NOT NULL, config TEXT NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (sweep, version));
CREATE TABLE IF NOT EXISTS sweep_run_versions (
    sweep TEXT NOT NULL, version INTEGER NOT NULL, run_id TEXT NOT NULL REFERENCES runs(run_id),
    PRIMARY KEY (sweep, version, run_id), FOREIGN KEY (sweep, version) REFERENCES sweep_configs(sweep, version));
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL REFERENCES runs(run_id), epoch INTEGER NOT NULL,
    train_loss REAL, train_acc REAL, test_loss REAL, test_acc REAL, seconds REAL,
    PRIMARY KEY (run_id, epoch));
CREATE TABLE IF NOT EXISTS activations (
    run_id TEXT NOT NULL REFERENCES runs(run_id), step INTEGER NOT NULL, layer TEXT NOT NULL,
    stats TEXT NOT NULL, PRIMARY KEY (run_id, step, layer));
"""
TABLES = {"sweeps", "runs", "sweep_runs", "sweep_configs", "sweep_run_versions", "epochs", "activations"}
# the tables every store has had: a file without our mark is an older bnlab's store only if it has these
FIRST_TABLES = {"sweeps", "runs", "sweep_runs", "epochs"}
ADDED_RUN_COLUMNS = {"owner": "TEXT", "pid_start": "INTEGER", "heartbeat": "REAL"}
# an older store read from read-only media: its runs are all of version 1 of their sweep
LEGACY_VERSIONS = {
    "sweep_configs": "SELECT name AS sweep, 1 AS version, config, created FROM sweeps ORDER BY rowid",
    "sweep_run_versions": "SELECT sweep, 1 AS version, run_id FROM sweep_runs ORDER BY rowid",
}

OWNER = secrets.token_hex(8)
HOST = socket.gethostname()


def _new_owner() -> None:
    global OWNER
    OWNER = secrets.token_hex(8)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_owner)  # a forked child is another owner


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (field 22 of ``/proc/<pid>/stat``);
    None where that cannot be read (not Linux, no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
        return int(text[text.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int | None) -> bool:
    """Whether process ``pid`` exists on this host and has not exited (a zombie has)."""
    if pid is None or pid <= 0:  # 0 and negatives name process groups, not a process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OverflowError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
        return text[text.rindex(")") + 2:][:1] not in ("Z", "X")
    except (OSError, ValueError):
        return True  # no /proc: os.kill said it exists


def is_stale(pid, host, pid_start, heartbeat, started, lease: float, now: float | None = None) -> bool:
    """Whether a ``running`` run's owner is gone: its lease expired (no heartbeat for ``lease``
    seconds), or, on this host, its pid is dead or belongs to a process started at another time."""
    now = time.time() if now is None else now
    last = heartbeat if heartbeat is not None else started
    if last is not None and now - last > lease:
        return True
    if host is not None and host != HOST:
        return False  # another machine's process: only its lease tells
    if not pid_alive(pid):
        return True
    if pid_start is not None:
        current = process_start(pid)
        if current is not None and current != pid_start:
            return True  # the pid was reused by another process
    return False


def _chunks(iterable, n: int):
    it = iter(iterable)
    while chunk := list(islice(it, n)):
        yield chunk


def _readonly_error(e: sqlite3.Error) -> bool:
    name = getattr(e, "sqlite_errorname", "") or ""
    return name.startswith("SQLITE_READONLY") or "readonly" in str(e)


def _cannot_open(e: sqlite3.Error) -> bool:
    name = getattr(e, "sqlite_errorname", "") or ""
    return _readonly_error(e) or name.startswith("SQLITE_CANTOPEN") or "unable to open" in str(e)


class RunStore:
    """A SQLite run store. Open one per process; it is safe to share the file between processes.

    ``path`` is a file (created with ``create=True``) or an SQLite ``file:`` URI (e.g.
    ``file:runs/bnlab.db?mode=ro``). ``create=False`` opens an existing store for reading: it
    also works on read-only media, where any write raises a :class:`ConfigError`. ``lease`` is
    how many seconds a running run may go without a heartbeat before it is taken to be dead.

    It is a context manager (``with RunStore(...) as store:`` closes it).

    Args:
        path: the store file or ``file:`` URI (default ``runs/bnlab.db``).
        create: create the file (and its folder) when missing, and migrate an older store;
            ``False``: the store must exist.
        lease: seconds without a heartbeat after which a running run counts as dead.

    Raises:
        ConfigError: the path is a directory, does not exist (``create=False``), cannot be
            created or opened, or is not a bnlab store (any other file is left untouched); with
            ``create=True`` also a store that is read-only or was written by a newer bnlab.

    Example::

        with RunStore("runs/bnlab.db", create=False) as store:
            [s["name"] for s in store.sweeps()]
            store.runs("deeplizard-bn")[0]["final"]["test_acc"]
    """

    def __init__(self, path: str | Path = DEFAULT_STORE, create: bool = True, lease: float = DEFAULT_LEASE):
        self.target = str(path)
        self.uri = self.target.startswith("file:")
        self.path = Path(unquote(urlsplit(self.target).path)) if self.uri else Path(self.target)
        self.lease = float(lease)
        self.readonly: str | None = None  # why this store cannot be written, when it is read-only
        self.newer: str | None = None  # why not to write to it, when a newer bnlab wrote it
        if self.path.is_dir():
            raise ConfigError(f"run store {self.target} is a directory: pass a file path with --store")
        # no header check with open()/close() here: closing any descriptor of the file drops every
        # POSIX lock this process holds on it (other RunStores' included, SQLite's own locks), after
        # which another process may delete the WAL under them; SQLite itself refuses a non-SQLite file
        if not self.path.exists() and not create:
            raise ConfigError(f"run store {self.target} does not exist: run a sweep first (or pass --store)")
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"cannot create run store {self.target}: {e.strerror} ({self.path.parent}): "
                                  "pass another --store") from None
        self.db = self._open(create)

    # ---------------------------------------------------------------- opening

    def _connect(self, mode: str | None) -> sqlite3.Connection:
        """``mode``: None (read-write, or as the URI says), ``ro`` or ``immutable`` (read-only media)."""
        if mode is None:
            target, uri = self.target, self.uri
        else:
            escaped = str(self.path.absolute()).replace("?", "%3f").replace("#", "%23")
            base = self.target if self.uri else "file:" + escaped
            target = base + ("&" if "?" in base else "?") + ("mode=ro" if mode == "ro" else "immutable=1")
            uri = True
        db = sqlite3.connect(target, uri=uri, timeout=120, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout = 120000")
        return db

    def _open(self, create: bool) -> sqlite3.Connection:
        last = None
        for mode in (None,) if create else (None, "ro", "immutable"):
            db = None
            try:
                db = self._connect(mode)
                names = sorted(n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                               if not n.startswith("sqlite_"))
                app_id = db.execute("PRAGMA application_id").fetchone()[0]
                version = db.execute("PRAGMA user_version").fetchone()[0]
            except sqlite3.DatabaseError as e:
                if db is not None:
                    db.close()
                if not _cannot_open(e):
                    why = "not an SQLite file" if "not a database" in str(e) else str(e)
                    raise ConfigError(f"{self.target} is not a bnlab run store ({why}): pass another --store") from None
                last = e
                continue
            if mode is not None:  # read-only media: the WAL index cannot be created next to the file
                self.readonly = str(last)
            break
        else:
            if _readonly_error(last) and create:
                raise self._readonly_error(last)
            raise ConfigError(f"cannot open run store {self.target} ({last}): check its permissions, or pass "
                              "another --store") from None
        self.db = db
        ours = app_id == APPLICATION_ID or (app_id == 0 and (not names or (set(names) <= TABLES
                                                                             and FIRST_TABLES <= set(names))))
        if not ours:
            db.close()
            raise ConfigError(f"{self.target} is an SQLite database but not a bnlab run store (tables: "
                              f"{', '.join(names) or 'none'}): pass another --store")
        if version > SCHEMA_VERSION:
            self.newer = (f"run store {self.target} was written by a newer bnlab (store schema {version}; this "
                          f"bnlab knows {SCHEMA_VERSION}): upgrade bnlab to write to it")
            if create:
                db.close()
                raise ConfigError(self.newer)
        elif self.readonly is None and not (app_id == APPLICATION_ID and version == SCHEMA_VERSION):
            try:
                self._initialize(version if app_id == APPLICATION_ID else 0)
            except ConfigError as e:
                if create:
                    db.close()
                    raise
                self.readonly = getattr(e, "reason", str(e))
        if self.readonly is not None and version < SCHEMA_VERSION:
            self._read_as_current(names)
        db.execute("PRAGMA foreign_keys = ON")
        return db

    def _initialize(self, version: int) -> None:
        """Create the tables (a new store) or migrate an older store's, and mark the file as ours."""
        try:
            if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self.db.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as e:
            if _readonly_error(e):
                raise self._readonly_error(e) from None
            raise
        self.db.execute("PRAGMA synchronous = NORMAL")
        with self.write() as db:
            # statement by statement: executescript() would commit outside our transaction
            for stmt in SCHEMA.strip().split(";"):
                if stmt.strip():
                    db.execute(stmt)
            if version < 2:
                columns = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
                for name, kind in ADDED_RUN_COLUMNS.items():
                    if name not in columns:
                        db.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
                # each sweep's config so far is its version 1, with every run it has
                db.execute("INSERT INTO sweep_configs(sweep, version, config, created) SELECT name, 1, config, created "
                           "FROM sweeps WHERE name NOT IN (SELECT sweep FROM sweep_configs)")
                db.execute("INSERT OR IGNORE INTO sweep_run_versions(sweep, version, run_id) SELECT sweep, 1, run_id "
                           "FROM sweep_runs sr WHERE NOT EXISTS (SELECT 1 FROM sweep_run_versions v "
                           "WHERE v.sweep = sr.sweep)")
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _read_as_current(self, names: list[str]) -> None:
        """Let an older store that cannot be migrated (read-only) be read like a current one:
        temporary tables (in memory, not in the file) stand in for what it lacks."""
        if "sweeps" in names and "sweep_runs" in names:
            for name, query in LEGACY_VERSIONS.items():
                if name not in names:
                    self.db.execute(f"CREATE TEMP TABLE {name} AS {query}")
                    names = [*names, name]
        for stmt in SCHEMA.strip().split(";"):
            if stmt.strip() and stmt.split("EXISTS", 1)[1].split("(", 1)[0].strip() not in names:
                self.db.execute(stmt.replace("CREATE TABLE IF NOT EXISTS", "CREATE TEMP TABLE"))

    def _readonly_error(self, why) -> ConfigError:
        err = ConfigError(f"run store {self.target} is read-only ({why}): results can be read from it, but a sweep "
                          "needs a writable store: copy it somewhere writable or pass another --store")
        err.reason = str(why)
        return err

    def close(self) -> None:
        """Close the connection (``with RunStore(...)`` does it on leaving the block)."""
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextmanager
    def write(self):
        """One write transaction, taken with BEGIN IMMEDIATE (waits for the lock, never fails fast).
        A store that cannot be written raises a :class:`ConfigError` saying why."""
        if self.readonly is not None:
            raise self._readonly_error(self.readonly)
        if self.newer is not None:
            raise ConfigError(self.newer)
        try:
            for attempt in range(50):
                try:
                    self.db.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) and "busy" not in str(e):
                        raise
                    time.sleep(0.05 * (attempt + 1))
            else:
                raise RuntimeError(f"could not lock {self.target} for writing")
            try:
                yield self.db
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
            else:
                self.db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            if _readonly_error(e):
                raise self._readonly_error(e) from None
            raise

    # ---------------------------------------------------------------- sweeps and runs

    def add_sweep(self, name: str, config: dict, runs) -> int:
        """Record a sweep's config and its runs (any iterable of ``Run``, read in chunks, all in
        one transaction); runs already present keep their status and results (and, once
        finished, their settings). Returns the config's version: the latest one when ``config``
        equals it, else a new one."""
        now = time.time()
        text = json.dumps(config, sort_keys=True)
        with self.write() as db:
            db.execute("INSERT INTO sweeps(name, config, created, updated) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT(name) DO UPDATE SET config = excluded.config, updated = excluded.updated",
                       (name, text, now, now))
            latest = db.execute("SELECT version, config FROM sweep_configs WHERE sweep = ? ORDER BY version DESC "
                                "LIMIT 1", (name,)).fetchone()
            if latest is not None and json.loads(latest[1]) == json.loads(text):
                version = latest[0]
            else:
                version = (latest[0] if latest else 0) + 1
                db.execute("INSERT INTO sweep_configs(sweep, version, config, created) VALUES (?, ?, ?, ?)",
                           (name, version, text, now))
            for chunk in _chunks(runs, CHUNK):
                # a run not yet finished takes the settings given now: they differ at most in where
                # the data lives (not part of a run's identity), and the data is there now
                db.executemany("INSERT INTO runs(run_id, settings, seed, status) VALUES (?, ?, ?, 'queued') "
                               "ON CONFLICT(run_id) DO UPDATE SET settings = excluded.settings "
                               "WHERE runs.status IN ('queued', 'failed')",
                               [(r.run_id, json.dumps(_stored(r), sort_keys=True), r.settings.seed) for r in chunk])
                db.executemany("INSERT OR IGNORE INTO sweep_runs(sweep, run_id) VALUES (?, ?)",
                               [(name, r.run_id) for r in chunk])
                db.executemany("INSERT OR IGNORE INTO sweep_run_versions(sweep, version, run_id) VALUES (?, ?, ?)",
                               [(name, version, r.run_id) for r in chunk])
        return version

    def status(self, run_id: str) -> str | None:
        """The run's status (``queued``, ``running``, ``done``, ``diverged``, ``failed``); None for an unknown id."""
        row = self.db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return row[0] if row else None

    def _is_stale(self, row) -> bool:
        pid, host, pid_start, heartbeat, started = row
        return is_stale(pid, host, pid_start, heartbeat, started, self.lease)

    def reset_stale(self, run_ids=None, *, sweep: str | None = None, version: int | None = None) -> list[str]:
        """Runs left ``running`` by an owner that is gone (see :func:`is_stale`) go back to
        ``queued``: all of them, those in ``run_ids``, or those of ``sweep`` (config ``version``)."""
        reset = []
        q = "SELECT r.run_id, r.pid, r.host, r.pid_start, r.heartbeat, r.started FROM runs r"
        args: tuple = ()
        if sweep is not None:
            q += " JOIN sweep_run_versions v ON v.run_id = r.run_id AND v.sweep = ?"
            args = (sweep,)
            if version is not None:
                q += " AND v.version = ?"
                args += (version,)
        with self.write() as db:
            for rid, *owner in db.execute(q + " WHERE r.status = 'running'", args).fetchall():
                if (run_ids is None or rid in run_ids) and self._is_stale(owner) and self._requeue(db, rid, None):
                    reset.append(rid)
        return reset

    @staticmethod
    def _clear_results(db, run_id: str) -> None:
        """Delete whatever a run wrote before it was interrupted (it reruns from scratch)."""
        db.execute("DELETE FROM epochs WHERE run_id = ?", (run_id,))
        db.execute("DELETE FROM activations WHERE run_id = ?", (run_id,))

    def _requeue(self, db, run_id: str, error: str | None, owner: str | None = None) -> bool:
        """Back to ``queued`` (of ``owner`` only, when given); False when it was not running (ours)."""
        q = ("UPDATE runs SET status = 'queued', pid = NULL, owner = NULL, error = ? "
             "WHERE run_id = ? AND status = 'running'")
        args = (error, run_id)
        if owner is not None:
            q, args = q + " AND owner = ?", args + (owner,)
        if db.execute(q, args).rowcount == 0:
            return False
        self._clear_results(db, run_id)
        return True

    def claim(self, run_id: str, pid: int | None = None, env: dict | None = None) -> bool:
        """Mark a run ``running`` by this process (deleting any partial epochs) unless it is
        finished or running in a live process."""
        pid = pid or os.getpid()
        with self.write() as db:
            row = db.execute("SELECT status, pid, host, pid_start, heartbeat, started FROM runs WHERE run_id = ?",
                             (run_id,)).fetchone()
            if row is None:
                raise KeyError(run_id)
            if row[0] in FINISHED or (row[0] == "running" and not self._is_stale(row[1:])):
                return False
            self._clear_results(db, run_id)
            now = time.time()
            db.execute("UPDATE runs SET status = 'running', started = ?, ended = NULL, error = NULL, pid = ?, "
                       "host = ?, attempts = attempts + 1, env = ?, stop_reason = NULL, summary = NULL, owner = ?, "
                       "pid_start = ?, heartbeat = ? WHERE run_id = ?",
                       (now, pid, HOST, json.dumps(env or {}), OWNER, process_start(pid), now, run_id))
        return True

    def heartbeat(self) -> int:
        """Renew the lease of every run this process is running; returns how many."""
        with self.write() as db:
            return db.execute("UPDATE runs SET heartbeat = ? WHERE owner = ? AND status = 'running'",
                              (time.time(), OWNER)).rowcount

    @contextmanager
    def heartbeats(self, interval: float | None = None):
        """Renew this process's leases every ``interval`` seconds (default a fifth of the lease)
        while the block runs, from a thread with its own connection."""
        interval = interval or min(60.0, self.lease / 5)
        stop = threading.Event()

        def beat():
            store = None
            try:
                store = RunStore(self.target, create=False, lease=self.lease)
                while not stop.wait(interval):
                    try:
                        store.heartbeat()
                    except sqlite3.Error:
                        pass  # the next beat tries again; a lease is many beats long
            except ConfigError:
                pass
            finally:
                if store is not None:
                    store.close()

        thread = threading.Thread(target=beat, name="bnlab-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(10)

    def add_epoch(self, run_id: str, record: dict) -> bool:
        """Write one epoch of a run this process owns (renewing its lease); False, writing
        nothing, when the run is no longer ours (its lease expired and another process took it)."""
        with self.write() as db:
            if not self._renew(db, run_id):
                return False
            self._insert_epoch(db, run_id, record)
        return True

    @staticmethod
    def _renew(db, run_id: str) -> bool:
        return db.execute("UPDATE runs SET heartbeat = ? WHERE run_id = ? AND owner = ? AND status = 'running'",
                          (time.time(), run_id, OWNER)).rowcount == 1

    @staticmethod
    def _insert_epoch(db, run_id: str, r: dict) -> None:
        db.execute("INSERT OR REPLACE INTO epochs(run_id, epoch, train_loss, train_acc, test_loss, test_acc, seconds) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (run_id, r["epoch"], r.get("train_loss"), r.get("train_acc"), r.get("test_loss"), r.get("test_acc"),
                    r.get("seconds")))

    def add_activations(self, run_id: str, rows: list[tuple[int, str, dict]]) -> bool:
        """Write the activation records of a run this process owns; False when it is not ours."""
        with self.write() as db:
            if not self._renew(db, run_id):
                return False
            db.executemany("INSERT OR REPLACE INTO activations(run_id, step, layer, stats) VALUES (?, ?, ?, ?)",
                           [(run_id, step, layer, json.dumps(stats)) for step, layer, stats in rows])
        return True

    def finish(self, run_id: str, status: str, *, last_epochs=(), error: str | None = None,
               stop_reason: str | None = None, summary: dict | None = None, env: dict | None = None) -> bool:
        """End a run this process owns: its remaining epochs and its final status land in one
        transaction. False, writing nothing, when the run is no longer ours."""
        if status not in ("done", "diverged", "failed"):
            raise ValueError(status)
        with self.write() as db:
            changed = db.execute("UPDATE runs SET status = ?, ended = ?, error = ?, stop_reason = ?, summary = ?, "
                                 "env = COALESCE(?, env), heartbeat = NULL WHERE run_id = ? AND owner = ? "
                                 "AND status = 'running'",
                                 (status, time.time(), error, stop_reason, json.dumps(summary) if summary else None,
                                  json.dumps(env) if env else None, run_id, OWNER)).rowcount
            if not changed:
                return False
            for r in last_epochs:
                self._insert_epoch(db, run_id, r)
        return True

    def requeue(self, run_id: str, error: str | None = None) -> bool:
        """Put a run this process was running back in the queue (it was interrupted)."""
        with self.write() as db:
            return self._requeue(db, run_id, error, OWNER)

    # ---------------------------------------------------------------- queries

    def sweeps(self) -> list[dict]:
        """Every sweep, least recently run first: ``{"name", "updated" (unix time), "runs",
        "finished" (done or diverged)}``."""
        rows = self.db.execute("SELECT s.name, s.updated, COUNT(r.run_id), "
                               "SUM(r.status IN ('done', 'diverged')) FROM sweeps s "
                               "LEFT JOIN sweep_runs sr ON sr.sweep = s.name LEFT JOIN runs r ON r.run_id = sr.run_id "
                               "GROUP BY s.name ORDER BY s.updated").fetchall()
        return [{"name": n, "updated": u, "runs": c, "finished": f or 0} for n, u, c, f in rows]

    def sweep_config(self, name: str) -> dict:
        """The config ``name`` was last run with."""
        row = self.db.execute("SELECT config FROM sweeps WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = ", ".join(s["name"] for s in self.sweeps()) or "none yet"
            raise ConfigError(f"no sweep named {name!r} in {self.target} (sweeps: {known})")
        return json.loads(row[0])

    def sweep_versions(self, name: str) -> list[dict]:
        """Every config ``name`` was run with, oldest first:
        ``[{"version": 1, "config": {...}, "created": unix time, "run_ids": [...]}, ...]``."""
        self.sweep_config(name)  # clear error for an unknown sweep
        out = {v: {"version": v, "config": json.loads(c), "created": t, "run_ids": []} for v, c, t in self.db.execute(
            "SELECT version, config, created FROM sweep_configs WHERE sweep = ? ORDER BY version", (name,))}
        for v, rid in self.db.execute("SELECT version, run_id FROM sweep_run_versions WHERE sweep = ? "
                                      "ORDER BY version, rowid", (name,)):
            out[v]["run_ids"].append(rid)
        return list(out.values())

    def version_counts(self, name: str, version: int) -> dict[str, int]:
        """``{status: runs}`` of the runs of config ``version`` of sweep ``name``."""
        return dict(self.db.execute("SELECT r.status, COUNT(*) FROM runs r JOIN sweep_run_versions v ON "
                                    "v.run_id = r.run_id WHERE v.sweep = ? AND v.version = ? GROUP BY r.status",
                                    (name, version)).fetchall())

    def running(self, name: str, version: int) -> list[dict]:
        """The runs of config ``version`` of sweep ``name`` that are running: who runs them."""
        rows = self.db.execute("SELECT r.run_id, r.pid, r.host, r.owner, r.heartbeat FROM runs r JOIN "
                               "sweep_run_versions v ON v.run_id = r.run_id WHERE v.sweep = ? AND v.version = ? "
                               "AND r.status = 'running' ORDER BY v.rowid", (name, version)).fetchall()
        return [dict(zip(("run_id", "pid", "host", "owner", "heartbeat"), r)) for r in rows]

    def version_runs(self, name: str, version: int, unfinished: bool = False):
        """``(run_id, settings)`` of each run of config ``version`` of ``name`` in the order they
        were recorded (only those not done or diverged, if asked), read a chunk at a time
        without holding a read transaction open in between."""
        q = ("SELECT v.rowid, r.run_id, r.settings FROM sweep_run_versions v JOIN runs r ON r.run_id = v.run_id "
             "WHERE v.sweep = ? AND v.version = ? AND v.rowid > ?")
        if unfinished:
            q += " AND r.status NOT IN ('done', 'diverged')"
        last = 0
        while rows := self.db.execute(q + " ORDER BY v.rowid LIMIT ?", (name, version, last, CHUNK)).fetchall():
            for _, rid, settings in rows:
                yield rid, json.loads(settings)
            last = rows[-1][0]

    def finished_runs(self, sweep: str | None = None):
        """``(run_id, settings, threads from its environment)`` of every finished run (of ``sweep``)."""
        q = "SELECT r.run_id, r.settings, r.env FROM runs r"
        args: tuple = ()
        if sweep is not None:
            q += " JOIN sweep_runs sr ON sr.run_id = r.run_id AND sr.sweep = ?"
            args = (sweep,)
        cur = self.db.execute(q + " WHERE r.status IN ('done', 'diverged')", args)
        while rows := cur.fetchmany(CHUNK):
            for rid, settings, env in rows:
                yield rid, json.loads(settings), (json.loads(env) if env else {}).get("threads")

    def legacy_finished(self) -> dict[str, int | None]:
        """``{run_id: threads}`` of the finished runs an older bnlab stored, whose identity does
        not include the torch thread count (their settings have no ``threads``)."""
        rows = self.db.execute("SELECT run_id, env FROM runs WHERE status IN ('done', 'diverged') "
                               "AND settings NOT LIKE '%\"threads\": %'").fetchall()
        return {rid: (json.loads(env) if env else {}).get("threads") for rid, env in rows}

    def runs(self, sweep: str | None = None) -> list[dict]:
        """Every run (of ``sweep``) with its settings, status and final-epoch metrics.

        ``settings`` include ``threads``, the torch threads the run used (for runs of an older
        bnlab: as its environment recorded). With a ``sweep``, ``config_versions`` lists the
        versions of its config that include the run (see :meth:`sweep_versions`); without one it
        is None.
        """
        versions: dict[str, list[int]] = {}
        if sweep is not None:
            self.sweep_config(sweep)  # clear error for an unknown sweep
            q = ("SELECT r.* FROM runs r JOIN sweep_runs sr ON sr.run_id = r.run_id WHERE sr.sweep = ? "
                 "ORDER BY r.rowid")
            rows = self.db.execute(q, (sweep,))
            for rid, v in self.db.execute("SELECT run_id, version FROM sweep_run_versions WHERE sweep = ? "
                                          "ORDER BY version", (sweep,)):
                versions.setdefault(rid, []).append(v)
        else:
            rows = self.db.execute("SELECT * FROM runs ORDER BY rowid")
        cols = [c[0] for c in rows.description]
        out = []
        for row in rows.fetchall():
            r = dict(zip(cols, row))
            r["settings"] = json.loads(r["settings"])
            r["env"] = json.loads(r["env"]) if r["env"] else {}
            r["settings"].setdefault("threads", r["env"].get("threads"))
            r["summary"] = json.loads(r["summary"]) if r["summary"] else {}
            r["config_versions"] = versions.get(r["run_id"], []) if sweep is not None else None
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
        """The run's epoch records in order: ``{"epoch", "train_loss", ..., "seconds"}``."""
        rows = self.db.execute(f"SELECT epoch, {', '.join(METRICS)} FROM epochs WHERE run_id = ? ORDER BY epoch",
                               (run_id,)).fetchall()
        return [dict(zip(("epoch", *METRICS), r)) for r in rows]

    def activations(self, run_id: str) -> list[dict]:
        """The run's activation records (``--track-activations``), as the tracker recorded them,
        by step then layer."""
        rows = self.db.execute("SELECT step, layer, stats FROM activations WHERE run_id = ? ORDER BY step, layer",
                               (run_id,)).fetchall()
        return [{"step": s, "layer": layer, **json.loads(st)} for s, layer, st in rows]

    def find_run(self, prefix: str) -> str:
        """The full id of the one run whose id starts with ``prefix``; a ConfigError when none or
        several do."""
        rows = self.db.execute("SELECT run_id FROM runs WHERE run_id LIKE ?", (prefix + "%",)).fetchall()
        if not rows:
            raise ConfigError(f"no run with id {prefix!r} in {self.target}: see the run_id column of 'bnlab results'")
        if len(rows) > 1:
            raise ConfigError(f"run id {prefix!r} is ambiguous ({len(rows)} runs match): give more characters")
        return rows[0][0]


def _stored(run) -> dict:
    """The settings a run is stored with (``Run.stored_settings``; plain settings for other objects)."""
    stored = getattr(run, "stored_settings", None)
    return stored() if stored is not None else run.settings.to_dict()
