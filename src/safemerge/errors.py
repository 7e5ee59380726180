"""Errors that are the user's to fix. Each message names the file, tensor or field and what to do."""

from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(name: str, known: Iterable[str], n: int = 2) -> str:
    """"; did you mean 'a', 'b'?" for the known names closest to a misspelt `name`, or "" when none is close."""
    close = difflib.get_close_matches(name, list(known), n=n)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


def one_line(e: BaseException) -> str:
    """An exception from a library as one line: its type, then its text with the line breaks folded."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


class SafemergeError(Exception):
    """Base class: the CLI prints these as one line and exits with code 2."""


class ConfigError(SafemergeError, ValueError):
    """The merge config is invalid (unknown key or method, bad parameter)."""


class CheckpointError(SafemergeError):
    """A checkpoint cannot be read or is inconsistent with the others."""


class OutputExistsError(SafemergeError, FileExistsError):
    """The output path exists and --overwrite was not given."""

    @classmethod
    def at(cls, path: object, also: str = "") -> "OutputExistsError":
        """The error for an output `path` that exists (`also`: more to say after the advice)."""
        return cls(f"{path}: already exists; choose another path or pass --overwrite (in Python: overwrite=True){also}")
