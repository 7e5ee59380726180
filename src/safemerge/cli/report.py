"""CLI: `report` (owned by the report area; registered in safemerge.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from safemerge.cli._common import emit_json, out, user_errors


def register(app: typer.Typer) -> None:
    app.command("report")(report)
    app.command("seeds")(seeds)


def report(
    results: Annotated[Path, typer.Argument(help="results.json, as `safemerge repro` writes it.")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Where report.md, report.html and the PNGs go "
                                                    "(default: beside RESULTS).")] = None,
    title: Annotated[Optional[str], typer.Option(help="The report's title.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print paths and claim verdicts as JSON.")] = False,
) -> None:
    """Turn a results.json into report.md and a self-contained report.html; print the claims' verdicts."""
    from safemerge.report import write_report
    from safemerge.report.assemble import DEFAULT_TITLE

    with user_errors():
        done = write_report(results, out_dir if out_dir is not None else results.parent,
                            title=title or DEFAULT_TITLE, overwrite=overwrite)
    if json_out:
        return emit_json(done)
    _print(done)


def _print(done: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    colors = {"PASS": "green", "FAIL": "red", "SKIPPED": "yellow"}
    table = Table("verdict", "claim", "figures", title="Claims", show_lines=False)
    for c in done["claims"]:
        table.add_row(f"[{colors[c['verdict']]}]{c['verdict']}[/]", escape(c["text"]), escape(c["detail"]))
    out.print(table)
    out.print(f"[green]wrote[/] {escape(str(done['html']))}\n[green]wrote[/] {escape(str(done['markdown']))}")


def seeds(
    runs: Annotated[list[Path], typer.Argument(help="results.json files (one per seed, same preset and domains), or the folders `safemerge repro` wrote them in.")],
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Also write the Markdown here.")] = None,
) -> None:
    """Several runs (one per seed) side by side: knowledge / safety of every model, and each claim's verdict."""
    from safemerge.report.seeds import seeds_table

    with user_errors():
        text = seeds_table(runs)
        if out_file is not None:
            from safemerge.checkpoint import check_output_file

            check_output_file(out_file, overwrite=True).write_text(text)
    print(text, end="")
