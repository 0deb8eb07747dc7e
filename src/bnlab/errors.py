"""Errors a user can cause.

Every exception here carries a message that says what is wrong, where (the path or value at
fault) and what to do about it. The CLI prints it as one line, ``bnlab: error: <message>``, and
exits with status 2. Anything that is not a ``BnlabError`` is a bug and keeps its traceback.
"""


class BnlabError(Exception):
    """Base class of every error a user can cause."""

    exit_code = 2


class ConfigError(BnlabError, ValueError):
    """A setting, option or config file value is invalid."""


class DataError(BnlabError):
    """Something is wrong with a dataset."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset's files could not be found in any searched location."""


class DataFormatError(DataError, ValueError):
    """A data file exists but is not in the expected format (corrupt, truncated, wrong kind)."""


class ChecksumError(DataError):
    """A downloaded file does not have the published checksum."""


class DownloadError(DataError):
    """A file could not be downloaded."""


class OutputError(BnlabError, OSError):
    """An output file cannot be written where it was asked for (an OSError too, so code that
    rescues work from a failed write still sees one)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class CheckpointError(BnlabError):
    """A checkpoint file is missing, corrupt or not a bnlab checkpoint."""


def suggest(value, options) -> str:
    """``"; did you mean 'x'?"`` for a near miss of ``value`` among ``options``, else ``""``."""
    import difflib

    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
