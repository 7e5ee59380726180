"""Everything that touches TRL (pinned: trl==1.16.0). Nothing else in safemerge imports trl.

DPO is `trl.DPOTrainer`; ORPO moved to `trl.experimental.orpo` in TRL 1.x (and may move again: this
module is the one place to change). Both take the model unwrapped plus a peft `LoraConfig` and wrap
it themselves; DPO then uses the model with its adapter disabled as the reference policy, so no
second copy of the weights is held.

TRL's config defaults that do not fit here are overridden explicitly: `bf16` (TRL turns it on by
default; only on a CUDA device that supports it here), `gradient_checkpointing` (TRL's default is on;
off on the CPU, where memory is not the constraint and it only costs time), `disable_dropout` (TRL
would zero LoRA's own dropout too; the caller zeroes the model's dropout layers instead, so
`lora_dropout` means what it says), no saving, no hub, no reporting, no tqdm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safemerge._hf import quiet_datasets
from safemerge.align.settings import AlignSettings
from safemerge.errors import ConfigError

TRL_VERSION = "1.16.0"


@dataclass
class TrainOutcome:
    model: Any  # the trained peft.PeftModel (LoRA not merged yet)
    steps: int  # optimizer steps done
    epochs: float  # epochs done (fractional when max_steps stops a run early)
    history: list[dict] = field(default_factory=list)  # TRL's log dicts: loss, learning_rate, rewards/..., step
    trained_pairs: int | None = None  # pairs TRL kept (DPO drops a pair whose prompt alone fills max_length)


def trl_version() -> str:
    import trl

    return trl.__version__


def train(model, tokenizer, pairs: list[dict], *, settings: AlignSettings, lora, device: str, bf16: bool,
          max_length: int, work_dir: Path, callbacks: list) -> TrainOutcome:
    """Preference-tune `model` (a transformers causal LM) with a LoRA adapter on `pairs` (TRL format).

    `lora` is a `peft.LoraConfig`; `work_dir` is TRL's output_dir (nothing is saved there).
    """
    import datasets
    from transformers import PrinterCallback, ProgressCallback

    config_cls, trainer_cls = _classes(settings.method)
    args = config_cls(**_args(settings, device=device, bf16=bf16, max_length=max_length, work_dir=work_dir))
    dataset = datasets.Dataset.from_list(pairs)
    with quiet_datasets():
        trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                              peft_config=lora, callbacks=callbacks)
    for cb in (PrinterCallback, ProgressCallback):  # progress is the caller's callbacks' job
        trainer.remove_callback(cb)
    kept = len(trainer.train_dataset) if trainer.train_dataset is not None else None
    if kept == 0:
        raise ConfigError(f"all {len(pairs)} preference pairs were dropped by TRL: their prompts alone are at least "
                          f"max_length ({max_length}) tokens; give a larger --max-length (max_length=) or shorter prompts")
    if kept is not None and kept < len(pairs):
        import warnings

        warnings.warn(f"{len(pairs) - kept} of {len(pairs)} preference pairs were dropped by TRL: their prompt alone is "
                      f"at least max_length ({max_length}) tokens; give a larger max_length or shorter prompts",
                      UserWarning, stacklevel=3)
    trainer.train()
    state = trainer.state
    return TrainOutcome(model=trainer.model, steps=state.global_step, epochs=float(state.epoch or 0.0),
                        history=list(state.log_history), trained_pairs=kept)


def _classes(method: str):
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer
    import warnings

    with warnings.catch_warnings():  # the notice that trl.experimental may change is for TRL's users; we pin TRL
        warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOConfig, ORPOTrainer


def _args(s: AlignSettings, *, device: str, bf16: bool, max_length: int, work_dir: Path) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        output_dir=str(work_dir),
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        num_train_epochs=s.epochs,
        max_steps=s.max_steps if s.max_steps is not None else -1,
        learning_rate=s.lr,
        lr_scheduler_type="linear",
        warmup_steps=s.warmup_steps,
        beta=s.beta,
        max_length=max_length,
        seed=s.seed,
        data_seed=s.seed,
        use_cpu=device == "cpu",
        bf16=bf16,
        fp16=False,
        # transformers 5 renamed gradient_checkpointing; TRL still reads the old name, which mirrors the new
        activation_checkpointing=device != "cpu",
        gradient_checkpointing=device != "cpu",
        disable_dropout=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        push_to_hub=False,
        disable_tqdm=True,
    )
    if s.method == "dpo" and s.sft_weight:
        args["loss_type"], args["loss_weights"] = ["sigmoid", "sft"], [1.0, s.sft_weight]
    if s.method == "orpo":
        args["remove_unused_columns"] = False  # ORPO's collator needs its own columns (it warns otherwise)
    return args
