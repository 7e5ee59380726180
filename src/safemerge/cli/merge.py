"""CLI: `merge`, `mergealign` and `methods`."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from safemerge.cli._common import emit_json, out, user_errors


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)
    app.command("mergealign")(mergealign)
    app.command("methods")(methods)


def merge(
    config: Annotated[Path, typer.Argument(help="Merge config (mergekit YAML: merge_method, base_model, models or slices, parameters, dtype, ...).")],
    out_dir: Annotated[Path, typer.Argument(help="Output model directory (written atomically).")],
    device: Annotated[str, typer.Option(help="Compute on cpu or cuda.")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Allow reading .bin (pickle) checkpoints; only for inputs you trust.")] = False,
    allow_nonfinite: Annotated[bool, typer.Option(help="Merge tensors with NaN/Inf (warn instead of failing).")] = False,
    shard_size: Annotated[str, typer.Option(help="Maximum output shard size, e.g. 5GB, 500MB.")] = "5GB",
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", min=1, help="Tensors merged at once (default: one per CPU core; 1 on cuda).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Merge models as a mergekit-style YAML config describes; write a complete HF checkpoint."""
    import safemerge

    _start_engine()
    with user_errors():
        start = time.perf_counter()
        path = safemerge.merge(config, out_dir, device=device, overwrite=overwrite, allow_pickle=allow_pickle,
                               allow_nonfinite=allow_nonfinite, max_shard_size=parse_size(shard_size), workers=workers,
                               progress=progress)
        _report(path, json_out, time.perf_counter() - start)


def mergealign(
    out_dir: Annotated[Path, typer.Argument(help="Output model directory.")],
    base: Annotated[Path, typer.Option(help="The pre-trained base θ shared by all models.")],
    domain: Annotated[list[Path], typer.Option(help="A domain expert θ_d (repeat for several).")],
    aligned: Annotated[Path, typer.Option(help="The general aligned (instruct) model θ_a.")],
    alpha: Annotated[float, typer.Option(help="Weight α of each domain vector.")] = 1.0,
    beta: Annotated[float, typer.Option(help="Weight β of the alignment vector.")] = 1.0,
    dtype: Annotated[Optional[str], typer.Option(help="Output dtype (default: the base model's).")] = None,
    tokenizer_source: Annotated[Optional[Path], typer.Option(help="Tokenizer and chat template source (default: the aligned model).")] = None,
    device: Annotated[str, typer.Option(help="Compute on cpu or cuda.")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Allow reading .bin (pickle) checkpoints; only for inputs you trust.")] = False,
    allow_nonfinite: Annotated[bool, typer.Option(help="Merge tensors with NaN/Inf (warn instead of failing).")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """MergeAlign: θ + α·Σ(θ_d − θ) + β·(θ_a − θ), a domain expert made safe by merging."""
    import safemerge

    _start_engine()
    with user_errors():
        start = time.perf_counter()
        path = safemerge.mergealign(base=base, domains=domain, aligned=aligned, out=out_dir, alpha=alpha, beta=beta,
                                    dtype=dtype, tokenizer_source=tokenizer_source, overwrite=overwrite,
                                    device=device, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite,
                                    progress=progress)
        _report(path, json_out, time.perf_counter() - start)


def methods(json_out: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """List the merge methods with their parameters and defaults."""
    from rich.table import Table

    from safemerge.methods import METHODS, REQUIRED

    def fmt(params: dict) -> dict:
        return {k: ("required" if v is REQUIRED else v) for k, v in params.items()}

    rows = {n: {"inputs": s.inputs, "global": fmt(s.global_params), "per_model": fmt(s.model_params)}
            for n, s in sorted(METHODS.items())}
    if json_out:
        return emit_json(rows)
    from safemerge.methods import native

    table = Table("method", "takes", "global parameters", "per-model parameters",
                  caption=f"fused CPU kernels for task_arithmetic and ties: {native.status()}")
    for n, r in rows.items():
        table.add_row(n, r["inputs"], ", ".join(f"{k}={v}" for k, v in r["global"].items()),
                      ", ".join(f"{k}={v}" for k, v in r["per_model"].items()))
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
    units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "B": 1}
    t = text.strip().upper()
    try:
        for u in sorted(units, key=len, reverse=True):
            if t.endswith(u):
                size = int(float(t[: -len(u)]) * units[u])
                break
        else:
            size = int(t)
    except (ValueError, OverflowError):  # not a number, or inf / 1e400
        size = 0
    if size <= 0:
        raise typer.BadParameter(f"{text!r} is not a positive size; write e.g. 5GB, 500MB or 2GiB", param_hint="--shard-size")
    return size


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
