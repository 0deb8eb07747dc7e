"""Writing files safely: whole or not at all, with the permissions the user's umask gives.

Every file bnlab writes (checkpoints, figures, reports, downloads) goes through
:func:`atomic_path`: the content is written to a temporary file next to the target and renamed
over it only when complete, so a crash or a full disk never leaves half a file behind.
"""

from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from bnlab.errors import ConfigError, OutputError


def current_umask() -> int:
    """The process umask (read from /proc where possible: os.umask can only read it by changing it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp"):
    """Yield a temporary path next to ``path``; when the block ends without an exception the
    temporary file gets the mode a plain ``open(path, "w")`` would give (0666 minus the umask,
    where ``mkstemp`` gives 0600) and replaces ``path``. On an exception it is deleted.

    Missing folders are created. A path that cannot be written (a directory, no permission, a
    read-only or pseudo file system) raises :class:`~bnlab.errors.OutputError` with one line.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(errno.EISDIR, f"{path} is a directory: give a file name, e.g. {path / ('out' + suffix)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # a missing folder is made, as for checkpoints
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as e:
        raise OutputError(e.errno, f"cannot write {path} ({e.strerror or e}): choose a writable location") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(path: str | Path, what: str = "output file") -> Path:
    """Fail now, with one line, if ``path`` could not be written later (before a long computation).

    Creates nothing that stays: a missing folder is checked by creating and removing a probe in
    its nearest existing parent.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory: give a file name, e.g. {path / 'model.pt'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write {what} {path}: {parent} is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".bnlab-write-check-", dir=parent)
        os.rmdir(probe)
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise ConfigError(f"cannot write {what} {path} ({e.strerror or e}): choose a writable location") from None
    return path


def rescue_dir() -> Path:
    """Where work is kept when its own destination fails at the last moment:
    ``$BNLAB_CACHE_DIR/rescued`` (default ``~/.cache/bnlab/rescued``), else the temp directory."""
    from bnlab.data.sources import cache_dir

    for candidate in (cache_dir("rescued"), Path(tempfile.gettempdir()) / "bnlab-rescued"):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            return candidate
        except OSError:
            continue
    return Path(tempfile.gettempdir())
