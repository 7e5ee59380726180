"""Naming what a command line lists: `NAME=PATH` models and `DOMAIN=FILE` tasks, and one column per name.

`safemerge compare` and `safemerge audit` head their tables with these names; two inputs under one name would
share a column, so that is an error that says how to tell them apart.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

from safemerge.errors import ConfigError


def first_repeat(items: Sequence[Any], key: Callable[[Any], Any] = lambda x: x) -> tuple[Any, Any] | None:
    """(the first item whose key an earlier item had, that earlier item), or None: one model or name given twice."""
    seen: dict[Any, Any] = {}
    for item in items:
        k = key(item)
        if k in seen:
            return item, seen[k]
        seen[k] = item
    return None


def named_item(spec: str, *, default: Callable[[str], str]) -> tuple[str, str]:
    """(name, path) of a `NAME=PATH` item, or (default(PATH), PATH) when there is no name or the whole item is an
    existing path (a folder may have '=' in its name)."""
    name, sep, ref = spec.partition("=")
    if not sep or Path(spec).expanduser().exists():
        return default(spec), spec
    if not re.fullmatch(r"[\w.\-]+", name):
        if any(c in name for c in "/\\+"):  # a path (or model+adapter) with '=' in a folder name
            return default(spec), spec
        raise ConfigError(f"{spec!r}: in NAME=PATH the NAME is letters, digits, '.', '_' or '-' (or give an existing "
                          "path)")
    if not ref:
        raise ConfigError(f"{spec!r}: NAME=PATH needs a path after '='")
    return name, ref


def display_names(models: Sequence[Any]) -> list[str]:
    """How a table names each model: its directory's name where those are all unique, else as many of the last parts
    of each path as tell them apart (`r1/merged`, `r2/merged`: two folders named `merged` must not look like one
    model), else the paths as given."""
    parts = [[p for p in str(m).replace("\\", "/").split("/") if p] or [str(m)] for m in models]
    for k in range(1, max(map(len, parts), default=1) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(m) for m in models]


def file_stem(source: Any) -> str:
    """A file's name before its first dot (`medqa.test.jsonl` -> `medqa`)."""
    return Path(str(source)).name.split(".")[0] or str(source)


def task_columns(tasks: Sequence[Any]) -> list[tuple[str, str | None, Any]]:
    """(column, given domain or None, source) per domain task: DOMAIN=FILE is headed DOMAIN (DOMAIN-<file stem> when
    several tasks share the domain), FILE by its stem, a loaded QuestionSet by its name."""
    items = []
    for t in tasks:
        if isinstance(t, (str, os.PathLike)):
            d, src = named_item(str(t), default=lambda spec: "")
            items.append((d or None, file_stem(src), src))
        else:
            items.append((None, t.name, t))
    shared = Counter(d for d, _, _ in items if d)
    return [((d if shared[d] == 1 else f"{d}-{stem}") if d else stem, d, src) for d, stem, src in items]


def unique_columns(items: list[tuple[str, Any]], what: str, fix: str, load: Callable[[Any], Any]) -> dict[str, Any]:
    """Column name -> loaded source; two sources under one column name are an error naming it."""
    names = [k for k, _ in items]
    twice = sorted({k for k in names if names.count(k) > 1})
    if twice:
        raise ConfigError(f"two {what} have the column name {', '.join(twice)} (a file's name before its first dot), and "
                          f"the table has one column per name; {fix}")
    return {k: load(src) for k, src in items}
