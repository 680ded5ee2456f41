"""One exception type for bad input, so the CLI can print one clear line."""

from __future__ import annotations

from pathlib import Path


class CmrcnetError(Exception):
    """A user-facing error: what is wrong, and with which file."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)


class InputError(CmrcnetError):
    """Malformed or missing input data (files, tables, images, counts)."""


class ConfigError(CmrcnetError):
    """An invalid configuration key or value."""
