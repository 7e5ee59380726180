"""CLI: `merge`, `multimerge`, `mergealign`, `extract-lora` and `methods`."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from safemerge.cli._common import IgnoreUnknown, emit_json, one_of, out, user_errors

# The options that every merge command shares.
Device = Annotated[str, typer.Option(help="Compute on cpu, cuda, cuda:N or auto (cuda when torch sees a GPU).")]
AllowPickle = Annotated[bool, typer.Option(help="Allow reading .bin (pickle) checkpoints; only for inputs you trust.")]
AllowNonfinite = Annotated[bool, typer.Option(help="Merge tensors with NaN/Inf (warn instead of failing).")]
ShardSize = Annotated[str, typer.Option(help="Maximum output shard size, e.g. 5GB, 500MB.")]
Workers = Annotated[Optional[int], typer.Option("--workers", "-j", min=1, metavar="N",
                                                help="Tensors merged at once (default: one per CPU core; 1 on cuda).")]
Progress = Annotated[bool, typer.Option(help="Show a progress bar.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]



def register(app: typer.Typer) -> None:
    app.command("merge")(merge)
    app.command("multimerge")(multimerge)
    app.command("mergealign")(mergealign)
    app.command("extract-lora")(extract_lora)
    app.command("methods")(methods)


def merge(
    config: Annotated[Path, typer.Argument(help="Merge config (mergekit YAML: merge_method, base_model, models or slices, parameters, dtype, ...).")],
    out_dir: Annotated[Path, typer.Argument(help="Output model directory (written atomically).")],
    device: Device = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    allow_pickle: AllowPickle = False,
    allow_nonfinite: AllowNonfinite = False,
    ignore_unknown: IgnoreUnknown = False,
    shard_size: ShardSize = "5GB",
    workers: Workers = None,
    progress: Progress = True,
    json_out: JsonOut = False,
) -> None:
    """Merge models as a mergekit-style YAML config describes; write a complete HF checkpoint."""
    import safemerge

    _start_engine()
    with user_errors():
        start = time.perf_counter()
        path = safemerge.merge(config, out_dir, device=device, overwrite=overwrite, allow_pickle=allow_pickle,
                               allow_nonfinite=allow_nonfinite, max_shard_size=parse_size(shard_size), workers=workers,
                               progress=progress and not json_out, ignore_unknown=ignore_unknown)
        _report(path, json_out, time.perf_counter() - start)


def multimerge(
    config: Annotated[Path, typer.Argument(help="Multi-stage config: YAML documents (separated by ---), one merge each, "
                                                "named by `name:`; a name used as a model path means that merge's output.")],
    intermediate_dir: Annotated[Path, typer.Option("--intermediate-dir", "-I", help="Folder of the named merges' outputs.")],
    out_path: Annotated[Optional[Path], typer.Option("--out-path", "--out", help="Output folder of the unnamed (final) merge.")] = None,
    lazy: Annotated[bool, typer.Option(help="Keep a merge whose output exists with the same config and inputs.")] = True,
    device: Device = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Let a merge replace a folder that no earlier multimerge into this --intermediate-dir wrote.")] = False,
    allow_pickle: AllowPickle = False,
    allow_nonfinite: AllowNonfinite = False,
    ignore_unknown: IgnoreUnknown = False,
    shard_size: ShardSize = "5GB",
    workers: Workers = None,
    progress: Progress = True,
    json_out: JsonOut = False,
) -> None:
    """Run several merges that build on each other (mergekit-multi's configs), in dependency order."""
    import safemerge

    _start_engine()
    with user_errors():
        result = safemerge.multimerge(
            config, out_path, intermediate_dir=intermediate_dir, lazy=lazy, overwrite=overwrite, progress=progress and not json_out,
            report=None if json_out else (lambda line: out.print(escape(line))), device=device, allow_pickle=allow_pickle,
            allow_nonfinite=allow_nonfinite, max_shard_size=parse_size(shard_size), workers=workers,
            ignore_unknown=ignore_unknown)
        if json_out:
            emit_json(result.summary())
        else:
            out.print(f"[green]done[/]: {len(result.made)} made, {len(result.kept)} kept")


def mergealign(
    out_dir: Annotated[Path, typer.Argument(help="Output model directory.")],
    base: Annotated[Path, typer.Option(help="The pre-trained base θ shared by all models.")],
    domain: Annotated[list[Path], typer.Option(help="A domain expert θ_d (repeat for several).")],
    aligned: Annotated[Path, typer.Option(help="The general aligned (instruct) model θ_a.")],
    alpha: Annotated[float, typer.Option(help="Weight α of each domain vector.")] = 1.0,
    beta: Annotated[float, typer.Option(help="Weight β of the alignment vector.")] = 1.0,
    dtype: Annotated[Optional[str], typer.Option(help="Output dtype: float32, bfloat16 or float16; default (or auto): the base model's.")] = None,
    tokenizer_source: Annotated[Optional[Path], typer.Option(help="Tokenizer and chat template source (default: the aligned model; for BASE+ADAPTER, the adapter folder if it holds a tokenizer, else BASE).")] = None,
    device: Device = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    allow_pickle: AllowPickle = False,
    allow_nonfinite: AllowNonfinite = False,
    shard_size: ShardSize = "5GB",
    workers: Workers = None,
    progress: Progress = True,
    json_out: JsonOut = False,
) -> None:
    """MergeAlign: θ + α·Σ(θ_d − θ) + β·(θ_a − θ), a domain expert made safe by merging."""
    import safemerge

    _start_engine()
    with user_errors():
        start = time.perf_counter()
        path = safemerge.mergealign(base=base, domains=domain, aligned=aligned, out=out_dir, alpha=alpha, beta=beta,
                                    dtype=dtype, tokenizer_source=tokenizer_source, overwrite=overwrite,
                                    device=device, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite,
                                    max_shard_size=parse_size(shard_size), workers=workers, progress=progress and not json_out)
        _report(path, json_out, time.perf_counter() - start)


def extract_lora(
    model: Annotated[str, typer.Argument(help="The fine-tuned model (a folder, or model+adapter).")],
    out_dir: Annotated[Path, typer.Argument(help="Output adapter folder (PEFT LoRA; written atomically).")],
    base: Annotated[str, typer.Option(help="The base MODEL was fine-tuned from.")],
    rank: Annotated[Optional[int], typer.Option("--rank", min=1, metavar="N", help="Largest LoRA rank per module "
                                                "(default 128; --max-rank, mergekit's name, is the same option).")] = None,
    max_rank: Annotated[Optional[int], typer.Option("--max-rank", min=1, hidden=True)] = None,
    sv_epsilon: Annotated[float, typer.Option(min=0.0, help="Drop singular values at or below this (per-module ranks).")] = 0.0,
    embed_lora: Annotated[bool, typer.Option(help="Factor the embeddings and lm_head too (default: save them whole when changed).")] = False,
    save_module: Annotated[Optional[list[str]], typer.Option(help="Save this module whole (full name or last part; repeatable).")] = None,
    include: Annotated[Optional[list[str]], typer.Option("--include", "-i", help="Only modules whose name matches this regex (repeatable).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", "-e", help="Leave out modules whose name matches this regex (repeatable).")] = None,
    svd: Annotated[str, typer.Option(help="exact, or randomized (seeded by --seed; faster on large matrices).")] = "exact",
    seed: Annotated[int, typer.Option(help="Seed of the randomized SVD.")] = 0,
    dtype: Annotated[Optional[str], typer.Option(help="dtype of the LoRA factors: float32, bfloat16 or float16; default (or auto): the model's.")] = None,
    device: Device = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    allow_pickle: AllowPickle = False,
    progress: Progress = True,
    json_out: JsonOut = False,
) -> None:
    """Extract MODEL's change from its base as a PEFT LoRA adapter (truncated SVD per layer), as mergekit-extract-lora does."""
    from safemerge.extract import extract_lora as run  # no _start_engine: LAPACK's varied buffers grow a kept heap

    with user_errors():
        rank = one_of(("--rank", rank), ("--max-rank", max_rank), default=128)
        start = time.perf_counter()
        result = run(model, base, out_dir, rank=rank, sv_epsilon=sv_epsilon, embed_lora=embed_lora,
                     save_modules=save_module or (), include=include or (), exclude=exclude or (), svd=svd, seed=seed, dtype=dtype,
                     device=device, overwrite=overwrite, allow_pickle=allow_pickle, progress=progress and not json_out)
        summary = dict(result.summary(), seconds=round(time.perf_counter() - start, 2))
        if json_out:
            return emit_json(summary)
        out.print(f"[green]wrote[/] {escape(str(result.path))}: {summary['factored']} modules as LoRA (rank ≤ "
                  f"{summary['max_rank']}), relative error {summary['relative_error']:.4f}; "
                  f"{len(result.whole)} saved whole, {result.unchanged} unchanged; {summary['seconds']:.1f} s", soft_wrap=True)
        if result.excluded:
            shown = ", ".join(result.excluded[:4]) + (f" and {len(result.excluded) - 4} more" if len(result.excluded) > 4 else "")
            out.print(f"{len(result.excluded)} changed modules left out (--include / --exclude / --sv-epsilon): "
                      f"{escape(shown)}", soft_wrap=True)


def methods(json_out: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """List the merge methods with their parameters and defaults."""
    from rich.table import Column, Table

    from safemerge.methods import METHODS, REQUIRED

    def fmt(params: dict) -> dict:
        return {k: ("required" if v is REQUIRED else v) for k, v in params.items()}

    rows = {n: {"inputs": s.inputs, "global": fmt(s.global_params), "per_model": fmt(s.model_params)}
            for n, s in sorted(METHODS.items())}
    if json_out:
        return emit_json(rows)
    from safemerge.methods import native

    table = Table("method", "takes", Column("global parameters", overflow="fold"),
                  Column("per-model parameters", overflow="fold"),
                  caption=f"fused CPU kernels for task_arithmetic and ties: {native.status()}")
    for n, r in rows.items():
        table.add_row(n, r["inputs"], "\n".join(f"{k}={v}" for k, v in r["global"].items()),  # one a line: none cut
                      "\n".join(f"{k}={v}" for k, v in r["per_model"].items()))
    out.print(table)


def _start_engine() -> None:
    """Import the engine (and torch with it) with the cyclic garbage collector paused, then let glibc keep freed
    tensor memory for the next tensor (engine.reuse_freed_memory). Importing torch creates a few hundred
    thousand objects, over which the collector otherwise runs some 400 times: 1.74 s instead of 1.92 s to
    import (medians of 8 runs each, docs/benchmarks.md). The collector is back on (if it was) before anything is merged."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        from safemerge.engine import reuse_freed_memory
    finally:
        if was_on:
            gc.enable()
    reuse_freed_memory()


def parse_size(text: str) -> int:
    from safemerge._args import parse_size as parse
    from safemerge.errors import ConfigError

    try:
        return parse(text)
    except ConfigError:
        raise typer.BadParameter(f"{text!r} is not a positive size; write e.g. 5GB, 500MB or 2GiB",
                                 param_hint="--shard-size") from None


def _report(path: Path, json_out: bool, seconds: float) -> None:
    """What was written: the folder, its tensors, parameters, dtype, weight files and bytes, and the time taken."""
    from safemerge.checkpoint import Checkpoint

    ckpt = Checkpoint(path)
    files = ckpt.weight_files()
    summary = {"output": str(path), "tensors": len(ckpt.names()), "parameters": ckpt.num_params(),
               "dtype": str(ckpt.float_dtype()).removeprefix("torch."), "shards": len(files),
               "bytes": sum(f.stat().st_size for f in files), "seconds": round(seconds, 2)}
    ckpt.close()
    if json_out:
        emit_json(summary)
    else:
        size = summary["bytes"]
        size_text = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
        out.print(f"[green]wrote[/] {escape(str(path))}: {summary['tensors']} tensors, {summary['parameters']:,} parameters "
                  f"({summary['dtype']}), {size_text} in {summary['shards']} file{'s' if summary['shards'] != 1 else ''}, "
                  f"{seconds:.1f} s", soft_wrap=True)
