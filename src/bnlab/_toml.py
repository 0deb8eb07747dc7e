"""Reading TOML files with errors a user can act on."""

from __future__ import annotations

import tomllib
from pathlib import Path

from bnlab.errors import ConfigError


def read_toml(path: str | Path, what: str, hint: str) -> dict:
    """The parsed file; ``what`` names it in errors (e.g. "sweep config"), ``hint`` says what to do."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"{what} {path} does not exist: {hint}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
