"""`align`: preference-tune a model (DPO or ORPO) through a LoRA adapter and write a plain checkpoint.

The flow: read the pairs → load the model in float32 (CPU) or its own dtype (CUDA) → zero its dropout
layers → train a LoRA adapter with TRL → save the adapter → merge it into the weights
(W ← W + (α/r)·B·A per adapted linear layer, peft's `merge_and_unload`) → cast to the input's dtype →
save the checkpoint, the input's tokenizer files / chat template / generation config, the run record
and the model card. Everything is written into a temporary sibling of `out`, renamed into place at the
end (`safemerge.checkpoint.atomic_output`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch

from safemerge._args import check_arguments
from safemerge._hf import hub_repo, local_folder, quiet_transformers
from safemerge.align import _trl
from safemerge.align.card import model_label, write_card
from safemerge.align.data import PreferenceDataError, as_chat, is_chat, load_preferences
from safemerge.align.progress import RichProgress
from safemerge.align.settings import AlignSettings
from safemerge.checkpoint import Checkpoint, atomic_output
from safemerge.config import split_reference
from safemerge.engine import check_apart, check_device
from safemerge.errors import CheckpointError, ConfigError, SafemergeError
from safemerge.evaluate.backends import template_date
from safemerge.evaluate.loading import merge_adapter, tokenizer_folder
from safemerge.lora import open_model

RUN_RECORD = "align_run.json"  # in OUT/adapter/


def align(
    model: str | os.PathLike,
    *,
    data: str | os.PathLike | list[dict],
    out: str | os.PathLike,
    method: str = "dpo",
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    target_modules: str | list[str] = "all-linear",
    lr: float = 8e-6,
    warmup_steps: int = 150,
    batch_size: int = 2,
    grad_accum: int = 6,
    epochs: float = 3,
    max_samples: int | None = 7000,
    max_steps: int | None = None,
    beta: float = 0.1,
    sft_weight: float = 0.0,
    max_length: int | None = None,
    chat: bool | None = None,
    seed: int = 0,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Path:
    """Preference-tune the HF model directory `model` on `data` and write the result to `out`. `model` may be a
    `model+adapter` reference (a LoRA expert): the adapter is merged into the model first, as merges and evaluation
    read it, and the tokenizer is the adapter folder's when it has one.

    `data`: a JSONL/JSON/CSV/Parquet file (or hub name, or list of dicts) of {prompt, chosen, rejected}
    pairs, or HH-RLHF {chosen, rejected} transcripts (see `safemerge.align.data`). `chat=None` renders
    plain-string pairs through the tokenizer's chat template when it has one (True: require it;
    False: train on the raw strings). `max_samples` keeps a seeded random subset of the pairs;
    `max_steps` stops early (overrides `epochs`). `sft_weight` (DPO only) adds that weight times the
    chosen answers' NLL to the loss (0: plain DPO, the paper's baseline). `device`: "cpu", "cuda" or None (cuda when
    available). On the CPU training is float32 without gradient checkpointing; on CUDA it uses bf16
    autocast where supported. Returns `out`.
    """
    check_arguments(align, locals())
    settings = AlignSettings(
        method=method, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        target_modules=target_modules if isinstance(target_modules, str) else tuple(target_modules),
        lr=lr, warmup_steps=warmup_steps, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs,
        max_samples=max_samples, max_steps=max_steps, beta=beta, sft_weight=sft_weight, max_length=max_length, chat=chat,
        seed=seed)
    ckpt = _open(model)
    src, tok_src = ckpt.path, tokenizer_folder(ckpt.path, ckpt.adapter)
    check_apart(out, ckpt.folders)  # with --overwrite the output would replace the model it tunes
    if isinstance(data, (str, os.PathLike)) and Path(out).expanduser().resolve() in Path(data).expanduser().resolve().parents:
        raise ConfigError(f"{out}: the preference data {data} lies inside the output folder; write the model elsewhere")
    device = _device(device)
    _check_trl()
    started = time.perf_counter()
    with atomic_output(out, overwrite=overwrite) as tmp, quiet_transformers():
        pairs = load_preferences(data, max_samples=settings.max_samples, seed=seed)
        tokenizer = _tokenizer(tok_src)
        use_chat = _use_chat(settings.chat, pairs, tokenizer, tok_src)
        if use_chat:
            pairs = [as_chat(p) for p in pairs]
        out_dtype = ckpt.float_dtype()
        net = _load_model(ckpt, device=device, stored=out_dtype)
        _check_targets(net, settings)
        _zero_dropout(net)
        bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
        length = settings.max_length or min(1024, getattr(net.config, "max_position_embeddings", None) or 1024)
        _warn_warmup(settings, len(pairs))
        bar = RichProgress(f"{settings.method.upper()} {model_label(ckpt.reference)}") if progress else None
        t0 = time.perf_counter()
        try:
            with template_date():  # TRL renders the chat pairs: on the date evaluation renders prompts on
                outcome = _trl.train(net, tokenizer, pairs, settings=settings, lora=_lora_config(settings), device=device,
                                     bf16=bf16, max_length=length, work_dir=tmp / ".trainer",
                                     callbacks=[bar] if bar else [])
        finally:
            if bar:
                bar.close()
        train_s = time.perf_counter() - t0
        _save(outcome.model, tmp, src=src, tokenizer_source=tok_src, config=ckpt.config, dtype=out_dtype)
        run = _record(ckpt, data, pairs, settings, outcome, given=str(model), use_chat=use_chat, device=device, bf16=bf16,
                      dtype=out_dtype, max_length=length, train_s=train_s, wall_s=time.perf_counter() - started)
        (tmp / "adapter" / RUN_RECORD).write_text(json.dumps(run, indent=2) + "\n")
        write_card(tmp, run)
    return Path(out).expanduser().absolute()


def load_run(out: str | os.PathLike) -> dict:
    """The run record (settings, losses, wall time) of a model written by `align`."""
    path = Path(out) / "adapter" / RUN_RECORD
    if not path.is_file():
        raise CheckpointError(f"{out}: no {path.relative_to(out)}; it was not written by `safemerge align`")
    return json.loads(path.read_text())


# -- pieces ---------------------------------------------------------------------------------------


def _open(model: str | os.PathLike) -> Checkpoint:
    """The model to tune: an HF folder (or hub id), or `folder+adapter` (a LoRA expert, read as merges read it)."""
    folder, adapter = split_reference(str(model))
    path = local_folder(folder)  # a hub id: its snapshot in the local HF cache
    if adapter is None and (path / "adapter_config.json").is_file():  # as merges and extract-lora say it
        open_model(str(path))  # raises the error that names the adapter's base and the MODEL+ADAPTER form
    if not path.is_dir() or not (path / "config.json").is_file():
        raise CheckpointError(f"{folder}: not a model directory with a config.json; pass an HF checkpoint")
    return open_model(str(path.absolute()) + (f"+{local_folder(adapter).absolute()}" if adapter else ""))


def _device(device: str | None) -> str:
    if device is None or device == "auto":
        return check_device("auto")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use 'cpu', 'cuda' or 'auto' (pick a GPU with CUDA_VISIBLE_DEVICES)")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but torch sees no CUDA device; use device='cpu'")
    return device


def _check_trl() -> None:
    version = _trl.trl_version()
    if version != _trl.TRL_VERSION:
        warnings.warn(f"safemerge align is written for trl=={_trl.TRL_VERSION}, found {version}; "
                      "ORPO's import path and the trainers' options may differ", stacklevel=3)


def _tokenizer(src: Path):
    from transformers import AutoTokenizer

    from safemerge.writer import TOKENIZER_FILES

    if not any((src / n).is_file() for n in TOKENIZER_FILES):
        raise CheckpointError(f"{src}: has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); copy them from "
                              "the model it was trained from (a LoRA expert: give MODEL+ADAPTER with them in either)")
    try:
        tok = AutoTokenizer.from_pretrained(str(src), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{src}: its tokenizer cannot be loaded ({str(e).splitlines()[0][:160]}); check or replace "
                              "its tokenizer files") from None
    if tok.pad_token is None:  # both trainers pad; the saved tokenizer is the input's own files, unchanged
        tok.pad_token = tok.eos_token
    return tok


def _use_chat(chat: bool | None, pairs: list[dict], tokenizer, src: Path) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is False and any(is_chat(p) for p in pairs):
        raise PreferenceDataError("--no-chat (chat=False): the pairs are chat messages, which only the chat template "
                                  "turns into text; leave --no-chat out, or give plain-string pairs")
    if (chat or any(is_chat(p) for p in pairs)) and not has_template:
        raise PreferenceDataError(f"{src}: the tokenizer has no chat template, but the pairs are chat messages or "
                                  "chat=True was asked for; give plain-string pairs, or a model with a chat template")
    return has_template if chat is None else chat or any(is_chat(p) for p in pairs)


def _load_model(ckpt: Checkpoint, *, device: str, stored: torch.dtype):
    """float32 on the CPU; on CUDA the stored dtype, fp16 read as bf16 where the GPU has it. A LoRA reference's
    adapter is merged into the weights it changes."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float32
    if device == "cuda" and stored in (torch.bfloat16, torch.float16):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    net = AutoModelForCausalLM.from_pretrained(str(ckpt.path), dtype=dtype, trust_remote_code=False, use_safetensors=True)
    if ckpt.adapter is not None:
        merge_adapter(net, ckpt)
    return net


def _check_targets(model, s: AlignSettings) -> None:
    """Each named LoRA target must be the last part of some linear layer's name ("all-linear" and other
    single strings are peft's to read); else a ConfigError that lists the model's linear layer names."""
    if isinstance(s.target_modules, str):
        return
    head = model.get_output_embeddings()  # TRL refuses a LoRA on the output layer, so it is no choice here
    head_name, found = None, set()
    for n, m in model.named_modules():
        if m is head:
            head_name = n.rsplit(".", 1)[-1]
        elif isinstance(m, torch.nn.Linear):
            found.add(n.rsplit(".", 1)[-1])
    linear = sorted(found)
    if head_name in s.target_modules:
        raise ConfigError(f"--target-modules: {head_name} is the output layer, which TRL does not tune with LoRA; "
                          f"choose from {', '.join(linear)} (or all-linear)")
    missing = [t for t in s.target_modules if t not in linear]
    if not s.target_modules or missing:
        raise ConfigError(f"--target-modules: {', '.join(missing) or 'none given'} is not a linear layer of this model; "
                          f"choose from {', '.join(linear)} (or all-linear)")


def _zero_dropout(model) -> None:
    """p = 0 in the model's own dropout layers (what TRL's disable_dropout does), before LoRA adds its own."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def _lora_config(s: AlignSettings):
    from peft import LoraConfig

    targets = s.target_modules if isinstance(s.target_modules, str) else list(s.target_modules)
    return LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")


def _warn_warmup(s: AlignSettings, n_pairs: int) -> None:
    per_epoch = math.ceil(math.ceil(n_pairs / s.batch_size) / s.grad_accum)
    total = s.max_steps or math.ceil(per_epoch * s.epochs)
    if s.warmup_steps >= total:
        warnings.warn(f"warmup_steps={s.warmup_steps} covers the whole run ({total} steps): the learning rate never "
                      f"reaches lr={s.lr}; lower --warmup-steps", stacklevel=3)


def _save(peft_model, tmp: Path, *, src: Path, tokenizer_source: Path, config: dict, dtype: torch.dtype) -> None:
    from safemerge.writer import copy_side_files

    bad = next((n for n, p in peft_model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()), None)
    if bad is not None:  # a diverged run: TRL logs its NaN losses as 0.0, and the model would be all NaN
        raise SafemergeError(f"training diverged: the LoRA weight {bad} holds NaN or Inf after training; lower --lr "
                             "(lr=) or --beta, and check the preference data")
    peft_model.save_pretrained(str(tmp / "adapter"))
    merged = peft_model.merge_and_unload()
    merged.to(device="cpu", dtype=dtype)
    merged.config.use_cache = True
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the Trainer aligns them to the tokenizer: undo
        setattr(merged.config, key, config.get(key))
    merged.save_pretrained(str(tmp))
    copy_side_files(tmp, tokenizer_source=tokenizer_source, generation_source=src, chat_template=None)
    trainer_dir = tmp / ".trainer"
    if trainer_dir.exists():
        import shutil

        shutil.rmtree(trainer_dir)


def _record(ckpt, data, pairs, s: AlignSettings, outcome, *, given: str, use_chat, device, bf16, dtype, max_length,
            train_s, wall_s) -> dict:
    import peft
    import transformers

    losses = [h["loss"] for h in outcome.history if "loss" in h]
    settings = s.as_dict() | {"max_length": max_length, "chat": use_chat}
    return {
        "model": given if hub_repo(split_reference(given)[0]) else ckpt.reference,  # a hub id as given, not its snapshot
        "fingerprint": ckpt.fingerprint(),
        "data": {"source": str(data) if not isinstance(data, list) else "<list>", "fingerprint": _data_digest(data),
                 "pairs": len(pairs), "trained_pairs": outcome.trained_pairs, "chat": use_chat},
        "settings": settings,
        "training": {"steps": outcome.steps, "epochs": outcome.epochs, "losses": losses,
                     "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                     "train_s": round(train_s, 2), "wall_s": round(wall_s, 2),
                     "history": outcome.history},
        "environment": {"device": device, "precision": "bf16 autocast" if bf16 else "fp32",
                        "dtype": str(dtype).removeprefix("torch."), "trl": _trl.trl_version(), "peft": peft.__version__,
                        "transformers": transformers.__version__, "torch": torch.__version__},
    }


def _data_digest(data) -> str:
    h = hashlib.blake2b(digest_size=16)
    path = Path(data) if not isinstance(data, list) else None
    if path is not None and path.is_file():
        h.update(path.read_bytes())
    else:
        h.update(json.dumps(data, sort_keys=True, default=str).encode())
    return h.hexdigest()
