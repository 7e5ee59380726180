"""Checks of the Python API's simple arguments, read from each function's annotations: a wrong type is a ConfigError
that names the argument, instead of a TypeError from deep inside (or a silent misreading). The CLI's options are
typed by typer already; this is for calls from Python.

- `int` (or `int | None`): a whole number (not a bool, not 2.5, not "4");
- `float` (or `float | None`): a number (not a bool, not "1e-5");
- `str` (or `str | None`): a str;
- `bool` (or `bool | None`): True or False (not "no", which is true, nor 0);
- a path (`str | os.PathLike`, or a module's alias of it named `PathLike`, optionally `| None`): a str or path object
  (not 7, not None where None is not allowed);

and `as_list` for a sequence argument: one str or path is a one-item list (`domains="expert"` means `["expert"]`, not
the letters of the word).
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
import re
from typing import Any, Callable

from safemerge.errors import ConfigError

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
    if rest == ["bool"]:
        return "flag?" if optional else "flag"
    if rest == ["PathLike"] or (rest and set(parts) <= _PATH_PARTS and "str" in parts and len(rest) > 1):
        return "path?" if optional else "path"  # bare `PathLike`: a module's alias of str | os.PathLike (recipes.py)
    return None


def is_whole(value: Any) -> bool:
    """An int or another integral number (numpy's), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


_ACCEPTS = {  # kind -> (is the value of that kind, what to give instead)
    "whole": (is_whole, "a whole number"),
    "number": (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), "a number"),
    "text": (lambda v: isinstance(v, str), "a str"),
    "flag": (lambda v: isinstance(v, bool), "True or False"),
    "path": (lambda v: isinstance(v, (str, os.PathLike)), "a path (a str or pathlib.Path)"),
}


def _check(kind: str, name: str, value: Any) -> None:
    if value is None and kind.endswith("?"):
        return
    accepts, wanted = _ACCEPTS[kind.rstrip("?")]
    if not accepts(value):
        raise ConfigError(f"{name}={value!r}: give {wanted}")


@functools.cache
def _kinds(fn: Callable[..., Any]) -> dict[str, str]:
    return {name: k for name, p in inspect.signature(fn).parameters.items() if (k := _kind(p.annotation))}


def check_arguments(fn: Callable[..., Any], values: dict[str, Any]) -> None:
    """Check `fn`'s simple arguments (the module's list). Called first thing in a
    public function as `check_arguments(f, locals())`, not as a decorator: a wrapper would be one more frame, and each
    warning's stacklevel would then point into it instead of at the caller's line."""
    for name, kind in _kinds(fn).items():
        if name in values:
            _check(kind, name, values[name])


def as_list(value: Any) -> Any:
    """One str or path given where a sequence is expected, as a one-item list (else the value as it is)."""
    return [value] if isinstance(value, (str, os.PathLike)) else value


_SIZE_UNITS = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "B": 1}


def parse_size(value: int | str, name: str = "max_shard_size") -> int:
    """A positive byte count from an int or a text such as "5GB", "500MB" or "2GiB"; else a ConfigError."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        size = int(value) if math.isfinite(value) and value == int(value) else 0  # 5e9 is a size, 2.5 is not
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
        raise ConfigError(f"{name}={value!r}: not a positive size; give a whole number of bytes, or e.g. 5GB, 500MB or "
                          "2GiB")
    return size
