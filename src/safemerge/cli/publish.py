"""CLI for publishing: `safemerge card MODEL` and `safemerge publish MODEL REPO_ID` (safemerge.publish, in safemerge.publishing)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from safemerge.cli._common import StoreOpt, console, emit_json, one_of, out, user_errors
from safemerge.publishing import DEFAULT_MIN_SAFETY


def register(app: typer.Typer) -> None:
    app.command("card")(card)
    app.command("publish")(publish)


def card(
    model: Path = typer.Argument(..., help="Local model folder; its README.md is the card."),
    store: Optional[Path] = StoreOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the card; write nothing (not even to the results store)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Write MODEL's stored evaluations (safety, domain) into its model card and its model-index metadata."""
    with user_errors():
        from safemerge.publishing import update_card

        r = update_card(model, store=store, dry_run=dry_run)
    if as_json:
        return emit_json(r)
    if dry_run:  # the card as it would be written, byte for byte (rich would wrap it at the terminal's width)
        sys.stdout.write(r["text"] if r["text"].endswith("\n") else r["text"] + "\n")
        sys.stdout.flush()
    n = r["evaluations"]
    verb = "would write" if dry_run and r["changed"] else "wrote" if r["written"] else "unchanged:"
    console.print(f"{verb} {escape(r['card'])}: {n['safety']} safety and {n['domain']} domain evaluation(s)", highlight=False)
    if n["left_out"]:
        console.print(f"[yellow]note:[/] {n['left_out']} stored evaluation(s) of these weights were made with other "
                      "config, tokenizer or chat-template files and are left out", highlight=False)
    if n.get("other_settings"):
        console.print(f"[yellow]note:[/] {n['other_settings']} stored safety evaluation(s) used a system prompt, no chat "
                      "template or sampling and are left out", highlight=False)


def publish(
    model: Path = typer.Argument(..., help="Local model folder to upload."),
    repo_id: str = typer.Argument(..., help="Hub repository: NAME or OWNER/NAME (created if missing)."),
    min_safety: float = typer.Option(DEFAULT_MIN_SAFETY, "--min-safety", help="Refuse a model whose stored safety rate is below this."),
    safety_data: Optional[str] = typer.Option(None, "--safety-prompts",
                                              help="Gate on the evaluation of this prompts file only (default: every "
                                                   "stored one; --safety-data is the same option)."),
    safety_data_alias: Optional[str] = typer.Option(None, "--safety-data", hidden=True),
    allow_unsafe: bool = typer.Option(False, "--allow-unsafe", help="Publish even below --min-safety or unevaluated; the card says so."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to commit to (created if missing)."),
    message: Optional[str] = typer.Option(None, "--message", help="Commit message."),
    token: Optional[str] = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN or `hf auth login`)."),
    store: Optional[Path] = StoreOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Check and show what would be uploaded; write and upload nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check MODEL's stored safety evaluations, write them into its card, upload it to the hub in one commit."""
    with user_errors():
        from safemerge.publishing import publish as run

        safety_data = one_of(("--safety-prompts", safety_data), ("--safety-data", safety_data_alias))

        r = run(model, repo_id, store=store, min_safety=min_safety, safety_data=safety_data, allow_unsafe=allow_unsafe,
                private=private, revision=revision, commit_message=message, token=token, dry_run=dry_run)
    if as_json:
        return emit_json(r)
    gate = r["gate"]
    table = Table("prompts", "judge", "n", "safe rate", title=f"safety gate (min {gate['min_safety']:g})")
    for c in gate["checked"]:
        rate = "–" if c["safe_rate"] is None else f"{c['safe_rate']:.3f}"
        table.add_row(escape(str(c["data"])), escape(str(c["judge"])), str(c["n"]), rate)
    out.print(table)
    if not gate["passed"]:
        done = "would be published" if r["dry_run"] else "published"
        console.print(f"[yellow]warning:[/] {escape(gate['reason'])} ({done} with --allow-unsafe)", highlight=False)
    size = sum(f["bytes"] for f in r["files"]) / 1e9
    if r["dry_run"]:
        out.print(f"dry run: would upload {len(r['files'])} files ({size:.2f} GB) to {escape(r['repo_id'])}; nothing written",
                  highlight=False)
    else:
        out.print(f"[green]uploaded[/] {len(r['files'])} files ({size:.2f} GB) to {escape(r['url'] or r['repo_id'])}",
                  highlight=False)
