"""Checks of the Python API's simple arguments, read from each function's annotations: a wrong type is a ConfigError
that names the argument, instead of a TypeError from deep inside (or a silent misreading). The CLI's options are
typed by typer already; this is for calls from Python.

- `int` (or `int | None`): a whole number (not a bool, not 2.5, not "4");
- `float` (or `float | None`): a number (not a bool, not "1e-5");
- `str` (or `str | None`): a str;
- a path (`str | os.PathLike`, optionally `| None`): a str or path object (not 7, not None where None is not allowed);
- a sequence (`Sequence[...]`, `list[...]`, `tuple[...]`, where a plain str is not also allowed): one str or path is
  taken as a one-item list (`domains="expert"` means `["expert"]`, not the letters of the word).
"""

from __future__ import annotations

import functools
import inspect
import numbers
import os
import re
from typing import Any, Callable, TypeVar

from safemerge.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])

_PATH_PARTS = {"str", "os.PathLike", "PathLike", "Path", "None"}


def _kind(annotation: Any) -> str | None:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    text = text.strip("\"'")
    parts = [p.strip() for p in re.split(r"\|(?![^\[]*\])", text)]  # top-level alternatives
    optional = "None" in parts
    rest = [p for p in parts if p != "None"]
    if rest == ["int"]:
        return "whole?" if optional else "whole"
    if rest == ["float"]:
        return "number?" if optional else "number"
    if rest == ["str"]:
        return "text?" if optional else "text"
    if rest and set(parts) <= _PATH_PARTS and "str" in parts and len(rest) > 1:
        return "path?" if optional else "path"
    if rest and rest[0].startswith(("Sequence[", "list[", "tuple[")) and "str" not in parts:
        return "sequence"
    return None


def _check(kind: str, name: str, value: Any) -> Any:
    if value is None and kind.endswith("?"):
        return value
    kind = kind.rstrip("?")
    if kind == "whole":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{name}={value!r}: give a whole number")
        return int(value)
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{name}={value!r}: give a number")
        return value
    if kind == "text":
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r}: give a str")
        return value
    if kind == "path":
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigError(f"{name}={value!r}: give a path (a str or pathlib.Path)")
        return value
    if isinstance(value, (str, os.PathLike)):  # sequence
        return [value]
    return value


def checked(fn: F) -> F:
    """Check (and, for one str given as a sequence, wrap) `fn`'s simple arguments on every call; see the module."""
    sig = inspect.signature(fn)
    kinds = {name: k for name, p in sig.parameters.items() if (k := _kind(p.annotation))}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        for name, kind in kinds.items():
            if name in bound.arguments:
                bound.arguments[name] = _check(kind, name, bound.arguments[name])
        return fn(*bound.args, **bound.kwargs)

    return wrapper  # type: ignore[return-value]


_SIZE_UNITS = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "B": 1}


def parse_size(value: int | str, name: str = "max_shard_size") -> int:
    """A positive byte count from an int or a text such as "5GB", "500MB" or "2GiB"; else a ConfigError."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        size = int(value)
    elif isinstance(value, str):
        t = value.strip().upper()
        try:
            unit = next((u for u in sorted(_SIZE_UNITS, key=len, reverse=True) if t.endswith(u)), "")
            size = int(float(t[: len(t) - len(unit)]) * _SIZE_UNITS[unit]) if unit else int(t)
        except (ValueError, OverflowError):  # not a number, or inf / 1e400
            size = 0
    else:
        size = 0
    if size <= 0:
        raise ConfigError(f"{name}={value!r}: not a positive size; give bytes or e.g. 5GB, 500MB or 2GiB")
    return size
