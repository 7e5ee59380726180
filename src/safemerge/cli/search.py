"""CLI: `search` — safety-aware merge search (CMA-ES, LM-Cocktail, grid) over a merge config's pool."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from safemerge.cli._common import IgnoreUnknown, emit_json, loading_models, out
from safemerge.search.pool_audit import AUDIT_LIMIT, AUDIT_MAX_NEW_TOKENS, AUDIT_THRESHOLD


def register(app: typer.Typer) -> None:
    app.command("search")(search)


def search(
    config: Annotated[Path, typer.Argument(help="Merge config (mergekit YAML) naming the pool, the base and the method; its numbers are the starting point.")],
    out_dir: Annotated[Path, typer.Argument(help="Where the best merge is written (a complete HF checkpoint).")],
    optimizer: Annotated[str, typer.Option(help="cmaes (EvoMM), cocktail (LM-Cocktail) or grid (weight × density).")] = "cmaes",
    safety_data: Annotated[Optional[Path], typer.Option(help="JSONL of {prompt, response}: harmful prompts with refusals.")] = None,
    domain_data: Annotated[Optional[Path], typer.Option(help="JSONL of {prompt, response}: domain questions with answers.")] = None,
    lambda_: Annotated[float, typer.Option("--lambda", help="Weight of the safety loss: λ·CE(safety) + (1−λ)·CE(domain); 0 = domain only.")] = 0.5,
    steps: Annotated[Optional[int], typer.Option(help="CMA-ES generations (default 100); grid points per axis (default 5).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the optimizer.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the search journaled beside OUT (OUT.journal.sqlite).")] = False,
    workers: Annotated[int, typer.Option(help="Score candidates in N parallel worker processes (or N Ray actors).")] = 1,
    ray_address: Annotated[Optional[str], typer.Option(help="Score on Ray: 'local' for a local instance, or a cluster address.")] = None,
    journal: Annotated[Optional[Path], typer.Option(help="Journal file (default: OUT.journal.sqlite).")] = None,
    popsize: Annotated[Optional[int], typer.Option(help="CMA-ES population (default 4 + ⌊3 ln n⌋).")] = None,
    sigma0: Annotated[float, typer.Option(help="CMA-ES initial step size.")] = 0.25,
    temperature: Annotated[float, typer.Option(help="LM-Cocktail temperature T in softmax(−loss/T).")] = 1.0,
    limit: Annotated[Optional[int], typer.Option(help="Use the first N examples of each data file.")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass when scoring.")] = 16,
    device: Annotated[str, typer.Option(help="Score on auto (the GPU where there is one), cpu, cuda or cuda:N.")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="torch threads per scorer (default: torch's; 1 per worker).")] = None,
    memo_gib: Annotated[Optional[float], typer.Option(help="Memory for the memo that makes TIES / DARE candidates fast, in GiB per scorer (default: 1 on the CPU and per worker, an eighth of the free GPU memory in a serial GPU run; 0: none; a size given is not checked against free memory). The merges are the same either way.")] = None,
    audit: Annotated[bool, typer.Option(help="Audit the pool's safety before searching (each merged model answers harmful prompts; a judge flags the unsafe).")] = True,
    audit_prompts: Annotated[Optional[str], typer.Option(help="Harmful prompts for the audit: a file or a dataset name, as eval safety reads (default: the --safety-data prompts).")] = None,
    audit_limit: Annotated[int, typer.Option(help="Audit on the first N prompts.")] = AUDIT_LIMIT,
    audit_threshold: Annotated[float, typer.Option(help="Flag pooled models whose safe rate is below this.")] = AUDIT_THRESHOLD,
    audit_max_new_tokens: Annotated[int, typer.Option(help="Longest audit answer, in tokens (greedy).")] = AUDIT_MAX_NEW_TOKENS,
    judge: Annotated[str, typer.Option(help="The audit's judge: keyword | llama-guard | llama-guard-2 | llama-guard-3 | md-judge.")] = "keyword",
    judge_model: Annotated[Optional[str], typer.Option(help="Checkpoint of the guard judge (local path).")] = None,
    store: Annotated[Optional[Path], typer.Option(help="Results store for the audit (default: results.sqlite in $SAFEMERGE_HOME, else in ./.safemerge/).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Audit the pool afresh even where the store holds its figures.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output; the journal starts afresh, or with --resume is kept.")] = False,
    ignore_unknown: IgnoreUnknown = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Find the merge weights and densities (or t) minimising λ·CE(safety) + (1−λ)·CE(domain); write the best merge."""
    from safemerge.search import search as run_search

    with loading_models("; the journal keeps every candidate scored so far: --resume goes on from there"):
        result = run_search(config, out_dir, optimizer=optimizer, safety_data=safety_data, domain_data=domain_data,
                            lambda_=lambda_, steps=steps, seed=seed, resume=resume, workers=workers,
                            ray_address=ray_address, overwrite=overwrite, journal=journal, popsize=popsize, sigma0=sigma0,
                            temperature=temperature, limit=limit, batch_size=batch_size, device=device, threads=threads,
                            memo_gib=memo_gib, audit=audit, audit_prompts=audit_prompts, audit_limit=audit_limit,
                            audit_threshold=audit_threshold, audit_max_new_tokens=audit_max_new_tokens, judge=judge,
                            judge_model=judge_model, store=store, cache=not no_cache, ignore_unknown=ignore_unknown, progress=progress and not json_out)
        if json_out:
            return emit_json(result.as_dict())
        _print(result)


def _print(result) -> None:
    from rich.table import Table

    if result.audit:
        from safemerge.cli.evaluate import print_audit

        print_audit(result.audit, title="pool audit")
    s = result.score
    what = ("the LM-Cocktail mixture (its result, not necessarily the lowest objective)" if result.optimizer == "cocktail"
            else f"best of {result.candidates} candidates")
    table = Table("parameter", "value", title=f"{what} ({result.optimizer}, λ = {result.lambda_})")
    for k, v in result.params.items():
        table.add_row(escape(k), f"{v:.4f}")
    out.print(table)
    out.print(f"objective {s.objective:.4f}  safety loss {s.safety:.4f}  domain loss {s.domain:.4f}  "
              f"({result.scored} scored, {result.candidates - result.scored} from the journal, {result.seconds:.1f} s)")
    out.print(f"[green]wrote[/] {escape(str(result.out))}  (journal {escape(str(result.journal))})")
