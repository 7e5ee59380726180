"""Training the family: a plain AdamW loop over length-bucketed, right-padded batches.

Deterministic for a seed on a given machine and thread count: the batch order comes from a seeded
`random.Random`, the weights from `torch.manual_seed`, and every op runs on the CPU.
"""

from __future__ import annotations

import math
import random
from typing import Callable

import torch

from safemerge.testbed.corpora import Example
from safemerge.testbed.presets import ModelSpec, TrainSpec

IGNORE = -100
Encoded = tuple[list[int], list[int]]  # (input_ids, labels with IGNORE where there is no loss)


def encode(tokenizer, examples: list[Example], *, max_len: int) -> list[Encoded]:
    """Token ids and labels of each example; segments are tokenized separately (no special tokens added).

    Through the tokenizer's own call, which sets no padding or truncation: its backend keeps the padding of the
    last padded call (a batched generation, say), and encoding through the backend then trained pad tokens."""
    segs = [text for ex in examples for text, _ in ex]
    if not segs:
        return [([], []) for _ in examples]  # the tokenizer's call fails on an empty batch
    ids_of = iter(tokenizer(segs, add_special_tokens=False)["input_ids"])
    out = []
    for ex in examples:
        ids, labels = [], []
        for _, has_loss in ex:
            t = next(ids_of)
            ids += t
            labels += t if has_loss else [IGNORE] * len(t)
        out.append((ids[:max_len], labels[:max_len]))
    return out


def new_model(spec: ModelSpec, tokenizer, *, seed: int):
    """A freshly initialised LlamaForCausalLM (float32, untied embeddings) for `tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    end, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=end,
        pad_token_id=pad,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = end
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = None
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 64
    return model


def batch_order(lengths: list[int], *, batch_size: int, steps: int, rng: random.Random) -> list[list[int]]:
    """`steps` batches of example indices: epochs of shuffled indices, bucketed by length within
    chunks of 16 batches (less padding), the batches then shuffled so lengths do not trend."""
    need = steps * batch_size
    order: list[int] = []
    while len(order) < need:
        epoch = list(range(len(lengths)))
        rng.shuffle(epoch)
        order += epoch
    order = order[:need]
    chunk = 16 * batch_size
    batches = []
    for i in range(0, need, chunk):
        block = sorted(order[i : i + chunk], key=lambda j: lengths[j])
        batches += [block[k : k + batch_size] for k in range(0, len(block), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(data: list[Encoded], idx: list[int], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask, labels, each (B, T) int64."""
    T = max(len(data[i][0]) for i in idx)
    ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(idx), T), dtype=torch.long)
    for row, i in enumerate(idx):
        x, y = data[i]
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warm-up to spec.lr, then cosine decay to 0.1·lr at the last step."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    t = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(model, data: list[Encoded], spec: TrainSpec, *, seed: int, pad_id: int,
          on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train `model` in place for spec.steps AdamW steps; returns the loss of each step."""
    rng = random.Random(f"safemerge-testbed-batches:{seed}")
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        p.requires_grad_(not any(f in name for f in spec.freeze))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.95), weight_decay=spec.weight_decay)
    model.train()
    losses = []
    for step, idx in enumerate(batch_order([len(x) for x, _ in data], batch_size=spec.batch_size, steps=spec.steps, rng=rng)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, spec)
        loss = model(**collate(data, idx, pad_id=pad_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return losses
