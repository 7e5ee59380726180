"""CLI for the data area (owned by that area; registered in safemerge.cli)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
