"""The `safemerge` command: one typer app; each area registers its sub-commands from its own module.

Every command parses, calls the public function of the same name, and prints (rich for humans,
`--json` for machines). No logic lives here.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="safemerge",
    help="Safety-aware merging of LLMs: audit, merge (MergeAlign, TIES, DARE, SLERP, ...), evaluate, search.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module defines `register(app: typer.Typer) -> None`.
_AREAS = ["merge", "testbed", "evaluate", "data", "search", "align", "report", "repro", "publish"]

for _name in _AREAS:
    importlib.import_module(f"safemerge.cli.{_name}").register(app)


def main() -> None:
    app()
