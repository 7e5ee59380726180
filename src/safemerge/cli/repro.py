"""CLI: `repro` (both papers on the testbed, with a report) and `demo` (the same with defaults)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from safemerge.cli._common import emit_json, out, split_names, user_errors


def register(app: typer.Typer) -> None:
    app.command("repro")(repro)
    app.command("demo")(demo)


def repro(
    out_dir: Annotated[Path, typer.Option("--out", help="Where the testbed, models, results and report go.")] = Path("runs/repro"),
    seed: Annotated[int, typer.Option(help="Testbed seed.")] = 0,
    preset: Annotated[str, typer.Option(help="Testbed preset: small (the reproduction) or micro (a smoke test).")] = "small",
    domains: Annotated[list[str], typer.Option(help="Domains, comma-separated or repeated; the first is the primary expert's.")] = ["medicine,finance"],
    skip: Annotated[list[str], typer.Option(help="Leave out stages: search, align (comma-separated or repeated).")] = [],
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Reproduce both papers on the testbed: every method, every model evaluated, report.md and report.html."""
    from safemerge.repro import repro as run

    with user_errors():
        res = run(out=out_dir, seed=seed, preset=preset, domains=",".join(split_names(domains, "--domains")),
                  skip=split_names(skip, "--skip"), progress=progress and not json_out)
    if json_out:
        return emit_json(res)
    v = res["report"]["verdicts"]
    out.print(f"\n[bold]claims:[/] [green]{v.get('PASS', 0)} PASS[/], [red]{v.get('FAIL', 0)} FAIL[/], "
              f"{v.get('SKIPPED', 0)} SKIPPED")
    for c in res["report"]["claims"]:
        colour = {"PASS": "green", "FAIL": "red"}.get(c["verdict"], "yellow")
        out.print(f"  [{colour}]{c['verdict']:<7}[/] {escape(c['text'])}")
    out.print(f"\nreport: [bold]{escape(str(res['report']['html']))}[/]  (and {escape(str(res['report']['markdown']))})")
    out.print(f"results: {escape(str(res['results']))}  ({res['seconds']:.0f} s)")


def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("runs/demo"),
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """The main job: `repro` with its defaults (small testbed, seed 0, medicine and finance)."""
    repro(out_dir=out_dir, seed=0, preset="small", domains=["medicine,finance"], skip=[], progress=progress, json_out=False)
