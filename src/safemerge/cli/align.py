"""CLI: `align` (DPO / ORPO with LoRA, merged into a plain checkpoint)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from safemerge.cli._common import emit_json, loading_models, out


class Method(str, Enum):
    dpo = "dpo"
    orpo = "orpo"


def register(app: typer.Typer) -> None:
    app.command("align")(align)


def align(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="The model to tune (a local HF checkpoint directory, or MODEL+ADAPTER for a LoRA expert), e.g. the domain expert.")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Output model directory (written atomically).")],
    data: Annotated[str, typer.Option(help="Preference pairs: JSONL/JSON/CSV/Parquet with prompt, chosen, rejected "
                                           "(or HH-RLHF chosen/rejected transcripts), or a hub dataset name.")],
    method: Annotated[Method, typer.Option(help="Preference-tuning method.")] = Method.dpo,
    lora_r: Annotated[int, typer.Option(help="LoRA rank r.")] = 16,
    lora_alpha: Annotated[int, typer.Option(help="LoRA scale α (the update is α/r·BA).")] = 32,
    lora_dropout: Annotated[float, typer.Option(help="Dropout on the LoRA branch.")] = 0.05,
    target_modules: Annotated[str, typer.Option(help="LoRA targets: 'all-linear' or comma-separated module names "
                                                     "(e.g. q_proj,v_proj).")] = "all-linear",
    lr: Annotated[float, typer.Option(help="Peak learning rate (linear warm-up, then linear decay).")] = 8e-6,
    warmup_steps: Annotated[int, typer.Option(help="Warm-up optimizer steps.")] = 150,
    batch_size: Annotated[int, typer.Option(help="Pairs per forward pass.")] = 2,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps per optimizer step.")] = 6,
    epochs: Annotated[float, typer.Option(help="Passes over the pairs.")] = 3,
    max_samples: Annotated[Optional[int], typer.Option(help="Use at most this many pairs (a seeded random subset).")] = 7000,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps (overrides --epochs).")] = None,
    beta: Annotated[float, typer.Option(help="DPO's β (KL strength) or ORPO's λ (odds-ratio weight).")] = 0.1,
    sft_weight: Annotated[float, typer.Option(help="DPO only: add this weight times the chosen answers' NLL to the "
                                                   "loss (TRL's 'sft' term; 0 = plain DPO).")] = 0.0,
    max_length: Annotated[Optional[int], typer.Option(help="Truncate prompt+answer to this many tokens "
                                                           "(default: min(1024, the model's context)).")] = None,
    chat: Annotated[Optional[bool], typer.Option("--chat/--no-chat", help="Render plain-text pairs with the chat "
                                                 "template (default: when the tokenizer has one).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the LoRA init, the data order and the subset.")] = 0,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or auto (default: cuda when torch sees a GPU; pick one GPU with CUDA_VISIBLE_DEVICES).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar with the training loss.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the run record (settings, losses, time) as JSON.")] = False,
) -> None:
    """Preference-tune MODEL with DPO or ORPO through LoRA; merge the adapter in and write a plain checkpoint."""
    from safemerge.align import align as run_align
    from safemerge.align import load_run

    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",") if t.strip()]
    with loading_models():
        path = run_align(model, data=data, out=out_dir, method=method.value, lora_r=lora_r, lora_alpha=lora_alpha,
                         lora_dropout=lora_dropout, target_modules=targets, lr=lr, warmup_steps=warmup_steps,
                         batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, max_samples=max_samples,
                         max_steps=max_steps, beta=beta, sft_weight=sft_weight, max_length=max_length, chat=chat,
                         seed=seed, overwrite=overwrite, device=device, progress=progress and not json_out)
        run = load_run(path)
        t = run["training"]
        if json_out:
            summary = {k: v for k, v in t.items() if k not in ("history", "losses")}
            return emit_json({"output": str(path), "method": method.value, "pairs": run["data"]["pairs"],
                              "settings": run["settings"], "training": summary})
        last = "n/a" if t["last_loss"] is None else f"{t['last_loss']:.4f}"
        out.print(f"[green]wrote[/] {escape(str(path))}  ({method.value}, {t['steps']} steps, last loss {last}, {t['wall_s']:.0f} s; "
                  f"adapter in {escape(str(path / 'adapter'))})")
