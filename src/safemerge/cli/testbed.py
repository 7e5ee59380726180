"""CLI for the testbed area: `safemerge testbed build OUT [--seed N] [--preset micro|small] ...`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import typer
from rich.markup import escape

from safemerge.cli._common import console, emit_json, out, split_names, user_errors

testbed_app = typer.Typer(help="The synthetic world and its tiny model family (base, aligned, experts).",
                          no_args_is_help=True)


@testbed_app.command("build")
def build(
    out_dir: Path = typer.Argument(..., metavar="OUT", help="Directory to write (base/, aligned/, expert-*/, data/, world.json)."),
    seed: int = typer.Option(0, "--seed", help="World and training seed."),
    preset: str = typer.Option("small", "--preset", help="micro (tests, seconds) or small (demo, minutes)."),
    domains: List[str] = typer.Option(["medicine,finance"], "--domains", help="Domains, comma-separated or repeated: medicine, finance."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of text."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (none with --json either)."),
) -> None:
    """Build the testbed (or copy it from the cache: $SAFEMERGE_CACHE, default ~/.cache/safemerge)."""
    from safemerge.testbed import build_testbed

    with user_errors():
        path = build_testbed(out_dir, seed=seed, preset=preset, domains=split_names(domains, "--domains"),
                             overwrite=overwrite, progress=not (as_json or no_progress))
        summary = _summary(path)
    if as_json:
        emit_json(summary)
        return
    out.print(f"testbed [bold]{summary['preset']}[/] seed {summary['seed']} at {escape(str(summary['path']))}")
    out.print("models: " + ", ".join(summary["models"]))
    out.print("data:   " + ", ".join(f"{k} ({v})" for k, v in summary["data"].items()))
    if summary.get("seconds") is not None:
        console.print(f"the build took {summary['seconds']:.1f} s (build.json; a copy from the cache takes seconds)")


def _summary(path: Path) -> dict:
    world = json.loads((path / "world.json").read_text())
    build = json.loads((path / "build.json").read_text()) if (path / "build.json").is_file() else {}
    models = sorted(p.name for p in path.iterdir() if (p / "config.json").is_file())
    return {
        "path": str(path),
        "seed": world["seed"],
        "preset": world["preset"],
        "domains": world["domains"],
        "models": {m: str(path / m) for m in models},
        "data": world["sizes"]["data"],
        "seconds": build.get("seconds", {}).get("total"),
    }


def register(app: typer.Typer) -> None:
    app.add_typer(testbed_app, name="testbed")
