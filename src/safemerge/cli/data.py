"""CLI: `data safety` and `data domain` — synthetic {prompt, response} data for the safety-aware search."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from safemerge.cli._common import emit_json, loading_models, out

data_app = typer.Typer(help="Make synthetic search data: refusals from a pool, domain Q&A by self-questioning.",
                       no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


@data_app.command("safety")
def safety(
    out_file: Annotated[Path, typer.Option("--out", help="Output JSONL of {prompt, response, provenance}.")],
    pool: Annotated[list[Path], typer.Option(help="A pool model that answers the questions (repeat for each): a folder, or model+adapter.")],
    prompts: Annotated[Optional[Path], typer.Option(help="Unsafe questions from a file (BeaverTails, HH red-team or a 'prompt' column).")] = None,
    prompt_column: Annotated[str, typer.Option(help="The questions' column (field) in --prompts.")] = "prompt",
    generator: Annotated[Optional[Path], typer.Option(help="A model that writes the unsafe questions (few-shot).")] = None,
    examples: Annotated[Optional[Path], typer.Option(help="Few-shot questions for --generator (default: built-in examples).")] = None,
    n: Annotated[Optional[int], typer.Option(help="Number of questions (default: all of --prompts; 100 with --generator).")] = None,
    judge: Annotated[str, typer.Option(help="What counts as a refusal: keyword | llama-guard | llama-guard-2 | llama-guard-3 | md-judge.")] = "keyword",
    judge_model: Annotated[Optional[Path], typer.Option(help="Checkpoint of the guard judge (local path).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sampling and of the choice among refusals.")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Prompts per generation batch.")] = 16,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Refusals written by the pool: every pool model answers every unsafe question; a judge keeps refusals."""
    from safemerge.data.synthetic import synthesize_safety

    with loading_models():
        report = synthesize_safety(pool, out_file, prompts=prompts, prompt_column=prompt_column, generator=generator,
                                   examples=examples, n=n, judge=judge, judge_model=judge_model, seed=seed,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, device=device,
                                   overwrite=overwrite, progress=progress and not json_out)
        _report(report, json_out)


@data_app.command("domain")
def domain(
    out_file: Annotated[Path, typer.Option("--out", help="Output JSONL of {prompt, response, provenance}.")],
    expert: Annotated[Path, typer.Option(help="The domain expert that writes and answers the questions (a folder, or model+adapter).")],
    examples: Annotated[Path, typer.Option(help="Validation JSONL whose 'question' rows are the in-context examples.")],
    n: Annotated[int, typer.Option(help="Number of question-answer pairs.")] = 1000,
    k: Annotated[int, typer.Option(help="In-context example questions per prompt.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the example choice and the sampling.")] = 0,
    style: Annotated[str, typer.Option(help="chat (instruction under the chat template) or completion (continue a question list).")] = "chat",
    domain_name: Annotated[Optional[str], typer.Option("--domain", help="The domain's name, used in the chat prompt.")] = None,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature for writing questions (0: greedy).")] = 0.8,
    max_new_tokens: Annotated[int, typer.Option(help="Longest question or answer, in tokens.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Prompts per generation batch.")] = 16,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Domain Q&A by self-questioning: the expert writes new questions from k examples and answers them."""
    from safemerge.data.synthetic import synthesize_domain

    with loading_models():
        report = synthesize_domain(expert, out_file, examples=examples, n=n, k=k, seed=seed, style=style,
                                   domain=domain_name, temperature=temperature, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, device=device, overwrite=overwrite, progress=progress and not json_out)
        _report(report, json_out)


def _report(report, json_out: bool) -> None:
    if json_out:
        return emit_json(report.as_dict())
    from safemerge.data.synthetic import describe_dropped

    dropped = describe_dropped(report.dropped) or "none"
    out.print(f"[green]wrote[/] {report.rows} rows to {escape(str(report.out))} ({report.questions} questions; dropped: {dropped})")
    for model, info in report.per_model.items():
        if "refusal_rate" in info:
            out.print(f"  {escape(model)}: refused {info['refusals']} ({info['refusal_rate']:.0%})")
