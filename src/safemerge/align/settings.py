"""The settings of one preference-tuning run: validated once, recorded in the model card as they are.

Defaults are the settings of the MergeAlign paper's DPO / ORPO baselines: LoRA r=16, α=32, dropout
0.05; learning rate 8e-6 with 150 warm-up steps (linear schedule); batch 2 × 6 accumulation steps;
3 epochs over at most 7000 pairs. β = 0.1 is TRL's default for both methods (DPO's KL strength, ORPO's
odds-ratio weight λ). `sft_weight` > 0 adds to DPO's loss that weight times the mean NLL of the
chosen answers (TRL's loss_type ["sigmoid", "sft"]; RPO, Pang et al. 2024): plain DPO only moves
probability relative to the reference, and cannot make a chosen answer that the model finds very
unlikely (a refusal, for an expert that never saw one) its greedy output. Off by default, as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from safemerge.errors import ConfigError

METHODS = ("dpo", "orpo")


@dataclass(frozen=True)
class AlignSettings:
    method: str = "dpo"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"  # peft's name for every linear layer but the LM head
    lr: float = 8e-6
    warmup_steps: int = 150
    batch_size: int = 2
    grad_accum: int = 6
    epochs: float = 3
    max_samples: int | None = 7000
    max_steps: int | None = None
    beta: float = 0.1
    sft_weight: float = 0.0  # DPO only: weight of an NLL term on the chosen answers (TRL's "sft" loss)
    max_length: int | None = None  # None: min(1024, the model's max_position_embeddings)
    chat: bool | None = None  # None: use the chat template when the tokenizer has one
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is unknown; choose one of: {', '.join(METHODS)}")
        positive = {"lora_r": self.lora_r, "lr": self.lr, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "epochs": self.epochs, "beta": self.beta, "lora_alpha": self.lora_alpha}
        for opt in ("max_samples", "max_steps", "max_length"):
            if getattr(self, opt) is not None:
                positive[opt] = getattr(self, opt)
        for name, value in {**positive, "lora_dropout": self.lora_dropout, "sft_weight": self.sft_weight}.items():
            if not math.isfinite(value):  # NaN or inf: a model of NaN weights, or a run that never ends
                raise ConfigError(f"{_opt(name)} must be a finite number, got {value}")
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"{_opt(name)} must be positive, got {value}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"{_opt('lora_dropout')} must be in [0, 1), got {self.lora_dropout}")
        if self.sft_weight < 0:
            raise ConfigError(f"{_opt('sft_weight')} must be >= 0, got {self.sft_weight}")
        if self.sft_weight and self.method != "dpo":
            raise ConfigError(f"{_opt('sft_weight')} is a DPO option; {self.method.upper()} has its own NLL term "
                              "(leave it at 0)")
        if self.warmup_steps < 0:
            raise ConfigError(f"{_opt('warmup_steps')} must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.seed < 2**32:  # numpy's seeds, which the Trainer sets
            raise ConfigError(f"{_opt('seed')} must be in [0, 2**32), got {self.seed}")
        if self.chat is not None and not isinstance(self.chat, bool):
            raise ConfigError(f"chat={self.chat!r}: give True, False or None")

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def as_dict(self) -> dict:
        d = asdict(self)
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        return d


def _opt(name: str) -> str:
    """A setting as both callers know it: `--lora-dropout (lora_dropout=)`, the CLI's option and the API's keyword."""
    return f"--{name.replace('_', '-')} ({name}=)"
