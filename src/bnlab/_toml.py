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
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): "
                          "TOML files must be UTF-8; re-save it as UTF-8") from None
    except PermissionError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
