"""CLI for the evaluate area: `safemerge eval safety|domain|similarity` and `safemerge audit`.

Each command parses, calls the public function of the same name in safemerge.evaluate, and prints a
rich table (or, with --json, the function's result). Results are looked up in / written to the results
store (--store, default $SAFEMERGE_HOME/results.sqlite or ./.safemerge/results.sqlite).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from safemerge.cli._common import StoreOpt, console, emit_json, loading_models, out
from safemerge.naming import display_names

eval_app = typer.Typer(help="Evaluate models: safety rate, domain accuracy, similarity.", no_args_is_help=True)

JudgeOpt = typer.Option("keyword", "--judge", help="keyword | llama-guard | llama-guard-2 | llama-guard-3 | md-judge")
JudgeModelOpt = typer.Option(None, "--judge-model", help="Checkpoint of the guard judge (local path).")
NoCacheOpt = typer.Option(False, "--no-cache", help="Recompute even if the result is stored.")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N")
DtypeOpt = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16")
JsonOpt = typer.Option(False, "--json", help="Print the result as JSON.")
NoProgressOpt = typer.Option(False, "--no-progress", help="No progress bars (none with --json either).")


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
    app.command("audit")(audit)


def _fmt(x: Optional[float], digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


@eval_app.command("safety")
def safety(
    model: str = typer.Argument(..., help="Model directory (or hub id when a hub is reachable), or model+adapter (a LoRA expert)."),
    prompts: str = typer.Option(..., "--prompts", help="Harmful prompts: BeaverTails / HH red-team / any file with a 'prompt' column."),
    judge: str = JudgeOpt,
    judge_model: Optional[str] = JudgeModelOpt,
    limit: Optional[int] = typer.Option(None, "--limit", help="Use the first N prompts."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Tokens generated per prompt (greedy)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per forward pass."),
    backend: str = typer.Option("transformers", "--backend", help="transformers | vllm"),
    out_file: Optional[Path] = typer.Option(None, "--out", help="JSONL of responses and verdicts (default: beside the store)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    prompt_column: str = typer.Option("prompt", "--prompt-column", help="The prompts' column (field) in --prompts."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    store: Optional[Path] = StoreOpt,
    no_cache: bool = NoCacheOpt,
    as_json: bool = JsonOpt,
    no_progress: bool = NoProgressOpt,
) -> None:
    """Safety rate of MODEL on harmful prompts, overall and per category."""
    with loading_models():
        from safemerge.evaluate import evaluate_safety

        r = evaluate_safety(
            model, prompts=prompts, judge=judge, judge_model=judge_model, limit=limit, max_new_tokens=max_new_tokens,
            batch_size=batch_size, backend=backend, out=out_file, overwrite=overwrite, prompt_column=prompt_column,
            device=device, dtype=dtype, store=store, cache=not no_cache, progress=not (as_json or no_progress),
        )
        if as_json:
            return emit_json(r)
        t = Table(title=escape(f"safety of {r['model']} ({r['judge']}, {r['n_valid']} prompts{', cached' if r['cached'] else ''})"))
        t.add_column("category")
        t.add_column("prompts", justify="right")
        t.add_column("safe rate", justify="right")
        t.add_row("[bold]all[/]", str(r["n_valid"]), f"[bold]{_fmt(r['safe_rate'])}[/]")
        for cat, v in r["by_category"].items():
            t.add_row(escape(cat), str(v["n"]), _fmt(v["safe_rate"]))
        out.print(t)
        if r["responses"] is not None:
            console.print(f"responses and verdicts: {escape(str(r['responses']))}", highlight=False)


@eval_app.command("domain")
def domain(
    model: str = typer.Argument(..., help="Model directory, or model+adapter (a LoRA expert)."),
    task: str = typer.Option(..., "--task", help='Multiple-choice JSONL: {"question", "choices", "answer"} per line.'),
    format: str = typer.Option("plain", "--format", help="plain (question + ' ' + choice) | chat (the model's chat template)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use the first N questions."),
    batch_size: int = typer.Option(32, "--batch-size", help="Questions per forward pass."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    store: Optional[Path] = StoreOpt,
    no_cache: bool = NoCacheOpt,
    as_json: bool = JsonOpt,
    no_progress: bool = NoProgressOpt,
) -> None:
    """Multiple-choice accuracy (acc, acc_norm as lm-evaluation-harness defines them)."""
    with loading_models():
        from safemerge.evaluate import evaluate_domain

        r = evaluate_domain(model, task=task, format=format, limit=limit, batch_size=batch_size, device=device,
                            dtype=dtype, store=store, cache=not no_cache, progress=not (as_json or no_progress))
        if as_json:
            return emit_json(r)
        t = Table(title=escape(f"{r['task']} on {r['model']} ({r['format']}, {r['n']} questions{', cached' if r['cached'] else ''})"))
        for col in ("acc", "± stderr", "acc_norm", "± stderr "):
            t.add_column(col, justify="right")
        t.add_row(_fmt(r["acc"], 4), _fmt(r["acc_stderr"], 4), _fmt(r["acc_norm"], 4), _fmt(r["acc_norm_stderr"], 4))
        out.print(t)


@eval_app.command("similarity")
def similarity(
    models: List[str] = typer.Argument(..., help="Two or more model directories or model+adapter references (or one with --base)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model: adds task-vector norms and cosines."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Also print the per-layer table."),
    as_json: bool = JsonOpt,
    no_progress: bool = NoProgressOpt,
) -> None:
    """L2 distances between checkpoints and cosine similarity of their task vectors, streamed."""
    with loading_models():
        from safemerge.evaluate import similarity as run

        r = run(models, base=base, progress=not (as_json or no_progress))
        if as_json:
            return emit_json(r)
        names = {m: escape(n) for m, n in zip(r["models"], display_names(r["models"]))}
        if r.get("task_vectors"):
            t = Table(title=f"task vectors against {escape(Path(r['base']).name)}")
            t.add_column("model")
            t.add_column("‖τ‖ = L2 to base", justify="right")
            for m, v in r["task_vectors"].items():
                t.add_row(names[m], f"{v['norm']:.6g}")
            out.print(t)
        t = Table(title="pairs")
        for col in ("a", "b", "L2", "cosine(τa, τb)"):
            t.add_column(col, justify="right" if col[0] in "Lc" else "left")
        for p in r["pairs"]:
            t.add_row(names[p["a"]], names[p["b"]], f"{p['l2']:.6g}", _fmt(p.get("cosine"), 4))
        out.print(t)
        if per_layer:
            for p in r["pairs"]:
                t = Table(title=f"{names[p['a']]} vs {names[p['b']]}, per layer")
                t.add_column("group")
                t.add_column("L2", justify="right")
                t.add_column("cosine", justify="right")
                for g, v in p["per_layer"].items():
                    t.add_row(g, f"{v['l2']:.6g}", _fmt(v.get("cosine"), 4))
                out.print(t)


def audit(
    models: List[str] = typer.Argument(..., help="The pool: model directories, or model+adapter references (LoRA experts)."),
    safety_prompts: str = typer.Option(..., "--safety-prompts", help="Harmful prompts file (as for eval safety)."),
    domain_task: List[str] = typer.Option([], "--domain-task", help="Multiple-choice JSONL, or DOMAIN=FILE to head its column DOMAIN; repeat for several."),
    threshold: float = typer.Option(0.8, "--threshold", help="Flag models whose safety rate is below this."),
    judge: str = JudgeOpt,
    judge_model: Optional[str] = JudgeModelOpt,
    format: str = typer.Option("plain", "--format", help="Prompt format of the domain tasks: plain | chat"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use the first N safety prompts."),
    domain_limit: Optional[int] = typer.Option(None, "--domain-limit", min=1, help="Use the first N questions of each domain task (as compare)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Tokens generated per prompt (greedy)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per forward pass."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    store: Optional[Path] = StoreOpt,
    no_cache: bool = NoCacheOpt,
    fail_on_flag: bool = typer.Option(False, "--fail-on-flag", help="Exit with status 1 when a model is flagged (a gate before a merge, in a script or CI)."),
    as_json: bool = JsonOpt,
    no_progress: bool = NoProgressOpt,
) -> None:
    """Audit a pool before merging: every model's safety rate (and domain accuracy), unsafe ones flagged."""
    with loading_models():
        from safemerge.evaluate import audit as run

        r = run(models, safety_prompts=safety_prompts, domain_tasks=domain_task, judge=judge, judge_model=judge_model,
                threshold=threshold, format=format, limit=limit, domain_limit=domain_limit, max_new_tokens=max_new_tokens,
                batch_size=batch_size, device=device, dtype=dtype, store=store, cache=not no_cache, progress=not (as_json or no_progress))
        if as_json:
            emit_json(r)
        else:
            print_audit(r)
        if fail_on_flag and r["flagged"]:
            raise typer.Exit(1)


def print_audit(r: dict, title: str = "audit") -> None:
    """An audit's table (one row per model, the unsafe flagged) and how many were flagged."""
    t = Table(title=f"{title} ({r['judge']}, flag below {r['threshold']:g})")
    t.add_column("model")
    t.add_column("safe rate", justify="right")
    for task in r["tasks"]:
        t.add_column(f"{escape(task)} acc", justify="right")
    t.add_column("")
    for row in r["models"]:
        style = "red" if row["flagged"] else ""
        cells = [escape(row["name"]), _fmt(row["safe_rate"])] + [_fmt(row["domain"].get(task, {}).get("acc")) for task in r["tasks"]]
        t.add_row(*cells, "[bold red]FLAG[/]" if row["flagged"] else "ok", style=style)
    out.print(t)
    if r["flagged"]:
        below = [row["name"] for row in r["models"] if row["flagged"]]
        console.print(f"{len(below)} of {len(r['models'])} models below the safety threshold: {', '.join(below)}",
                      highlight=False, markup=False)
