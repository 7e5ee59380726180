"""CLI: `report` (owned by the report area; registered in safemerge.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from safemerge.cli._common import emit_json, out, split_names, user_errors


def register(app: typer.Typer) -> None:
    app.command("report")(report)
    app.command("seeds")(seeds)
    app.command("compare")(compare)


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
    from safemerge.report.results import results_file

    with user_errors():
        # beside the results.json, also where RESULTS names the run's folder (not in the folder above it)
        done = write_report(results, out_dir if out_dir is not None else results_file(results).parent,
                            title=title or DEFAULT_TITLE, overwrite=overwrite)
    if json_out:
        return emit_json(done)
    _print(done)


def _print(done: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    colors = {"PASS": "green", "FAIL": "red", "SKIPPED": "yellow"}
    claims = done["claims"]
    if claims and all(c["verdict"] == "SKIPPED" for c in claims):  # models of your own, not the papers' roles: one line
        out.print(f"[yellow]claims[/]: none of the papers' {len(claims)} claims applies to these models "
                  f"({escape(claims[0]['detail'])}; docs/report.md names the roles they need)", highlight=False)
    else:
        table = Table("verdict", "claim", "figures", title="Claims", show_lines=False)
        for c in claims:
            table.add_row(f"[{colors[c['verdict']]}]{c['verdict']}[/]", escape(c["text"]), escape(c["detail"]))
        out.print(table)
    out.print(f"[green]wrote[/] {escape(str(done['html']))}\n[green]wrote[/] {escape(str(done['markdown']))}")


def seeds(
    runs: Annotated[list[Path], typer.Argument(help="results.json files (one per seed, same preset and domains), or the folders `safemerge repro` wrote them in.")],
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Also write the Markdown here.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
) -> None:
    """Several runs (one per seed) side by side: knowledge / safety of every model, and each claim's verdict."""
    from safemerge.checkpoint import atomic_write, check_output_file
    from safemerge.report.results import results_file
    from safemerge.report.seeds import seeds_table

    with user_errors():
        if out_file is not None:  # not one of the runs it reads (a folder's results.json included)
            given = {f"{r} run": results_file(r) for r in runs}
            out_file = check_output_file(out_file, overwrite=overwrite, inputs=given)
        text = seeds_table(runs)
        if out_file is not None:
            atomic_write(out_file, text)
    print(text, end="")


def compare(
    models: Annotated[list[str], typer.Argument(help="The models: NAME=PATH or PATH (named by its folder); model+adapter references work too.", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for results.json, report.md, report.html and the figures.")],
    safety_prompts: Annotated[list[str], typer.Option("--safety-prompts", help="Harmful prompts (as for eval safety); repeat for several sets.")],
    domain_task: Annotated[list[str], typer.Option("--domain-task", help="Multiple-choice JSONL, or DOMAIN=FILE to name its domain (medicine=medqa.jsonl); repeat for several.")] = [],
    general_task: Annotated[Optional[str], typer.Option("--general-task", help="A general-knowledge multiple-choice JSONL.")] = None,
    expert: Annotated[Optional[str], typer.Option(help="The expert (a model's NAME, or a path): L2 distances to it, with --aligned.")] = None,
    aligned: Annotated[Optional[str], typer.Option(help="The aligned model (a NAME, or a path): L2 distances to it, with --expert.")] = None,
    knowledge: Annotated[list[str], typer.Option("--knowledge", help="Domain(s) the knowledge axis averages, comma-separated or repeated (default: every task's).")] = [],
    judge: Annotated[str, typer.Option(help="keyword | llama-guard | llama-guard-2 | llama-guard-3 | md-judge")] = "keyword",
    judge_model: Annotated[Optional[str], typer.Option(help="Checkpoint of the guard judge (local path).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Use the first N harmful prompts of each set.")] = None,
    domain_limit: Annotated[Optional[int], typer.Option(min=1, help="Use the first N questions of each task.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per harmful prompt.")] = 256,
    format: Annotated[str, typer.Option(help="Prompt format of the multiple-choice tasks: plain | chat")] = "plain",
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size (default: each evaluation's own).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    store: Annotated[Optional[Path], typer.Option(help="Results store (default: results.sqlite in $SAFEMERGE_HOME, else in ./.safemerge/).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute even if a result is stored.")] = False,
    title: Annotated[Optional[str], typer.Option(help="The report's title.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing results.json and report in --out.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the results and the report's paths as JSON.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars (none with --json either).")] = False,
) -> None:
    """Evaluate models side by side (safety, domain accuracy, L2) and write the knowledge-safety table and plot."""
    from rich.markup import escape

    from safemerge.cli._common import console, loading_models
    from safemerge.comparison import compare as run

    def echo(name: str, row: dict) -> None:
        if not json_out:
            scores = [f"safety {_pct(v)}" if len(row["safety"]) == 1 else f"{k} {_pct(v)}" for k, v in row["safety"].items()]
            scores += [f"{k} {_pct(v)}" for k, v in row["domain"].items()]
            if "general" in row:
                scores.append(f"general {_pct(row['general'])}")
            console.print(f"  {escape(name)} ({escape(row['method'])}): " + "  ".join(escape(x) for x in scores), highlight=False)

    with loading_models():
        done = run(models, out_dir, safety_prompts=safety_prompts, domain_tasks=domain_task, general_task=general_task,
                   expert=expert, aligned=aligned, knowledge=split_names(knowledge, "--knowledge") or None, judge=judge, judge_model=judge_model,
                   limit=limit, domain_limit=domain_limit, max_new_tokens=max_new_tokens, format=format,
                   batch_size=batch_size, device=device, dtype=dtype, store=store, cache=not no_cache,
                   progress=not (json_out or no_progress), overwrite=overwrite, echo=echo,
                   **({"title": title} if title else {}))
    if json_out:
        return emit_json(done)
    _print(done["report"])
    out.print(f"[green]wrote[/] {escape(str(done['results']))}")


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"
