"""Log-likelihood of continuations, computed the way lm-evaluation-harness (0.4.x, HFLM) computes it.

Tokenization (lm-eval `TemplateLM._encode_pair`, causal models):
  1. trailing whitespace of the context moves to the front of the continuation;
  2. whole = encode(context + continuation), ctx = encode(context), cont = whole[len(ctx):]
     (encode adds special tokens unless the text starts with BOS: `backends.encode`).
  An empty context is scored after the prefix token (BOS, else EOS) alone.

Scoring (lm-eval `HFLM._loglikelihood_tokens`):
  inp = (ctx + cont)[-(max_length + 1):][:-1], right-padded with 0 in a batch, no attention mask;
  ll  = Σ_k log_softmax(logits[len(inp) - len(cont) + k])[cont[k]],   greedy = every cont[k] is the argmax.
  Requests are sorted by total length, longest first, and batched.

One deliberate difference: the log-softmax is taken in float32 whatever the model dtype (lm-eval keeps
the model dtype unless `softmax_dtype` is set); on float32 models the two are the same computation.
Only the logits of the positions that are scored are computed (`logits_to_keep`), which saves the
(batch, length, vocab) logits tensor that dominates memory on large vocabularies.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterable, Sequence

import torch

from safemerge.evaluate.backends import prefix_token_id
from safemerge.errors import SafemergeError

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer gives one


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split as lm-eval splits them (see the module docstring)."""
    return encode_pairs(tokenizer, [(context, continuation)])[0]


def encode_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """`encode_pair` for many pairs, with each distinct string tokenized once, in batched calls."""
    moved = []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        moved.append((context, continuation))
    ids = encode_many(tokenizer, {s for c, x in moved if c for s in (c, c + x)})
    out = []
    for context, continuation in moved:
        if context == "":
            cont = list(tokenizer.encode(continuation, add_special_tokens=False))
            prefix = prefix_token_id(tokenizer)
            out.append(([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:]))
        else:
            ctx = ids[context]
            out.append((ctx, ids[context + continuation][len(ctx) :]))
    return out


def encode_many(tokenizer: Any, texts: Iterable[str]) -> dict[str, list[int]]:
    """text -> `backends.encode(tokenizer, text)`, tokenized in two batched calls (with / without BOS)."""
    prefix = prefix_token_id(tokenizer)
    head = tokenizer.decode([prefix]) if prefix is not None else None
    groups: dict[bool, list[str]] = {True: [], False: []}
    for t in texts:
        groups[not (head is not None and t.startswith(head))].append(t)
    out: dict[str, list[int]] = {}
    for add, group in groups.items():
        if group:
            out.update(zip(group, tokenizer(group, add_special_tokens=add)["input_ids"]))
    return out


def max_length(model: Any, tokenizer: Any) -> int:
    """lm-eval's `resolve_max_length`: n_positions / max_position_embeddings / n_ctx, then the tokenizer."""
    cfg = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if v is not None:
            return int(v)
    m = getattr(tokenizer, "model_max_length", None)
    return int(m) if m is not None and m < 10**12 else DEFAULT_MAX_LENGTH


@torch.inference_mode()
def loglikelihoods(
    model: Any,
    requests: Sequence[tuple[list[int], list[int]]],
    *,
    max_len: int,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """(log P(cont | ctx), is_greedy) for each (ctx ids, cont ids), in input order."""
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise SafemergeError(f"request {i}: empty {'context' if not ctx else 'continuation'} after tokenization")
        if len(cont) > max_len:
            raise SafemergeError(f"request {i}: the continuation has {len(cont)} tokens, more than the model's context ({max_len})")
    device = next(model.parameters()).device
    order = sorted(range(len(requests)), key=lambda i: (-(len(requests[i][0]) + len(requests[i][1])), i))
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        inps = [(requests[i][0] + requests[i][1])[-(max_len + 1) :][:-1] for i in idx]
        conts = [requests[i][1] for i in idx]
        width = max(len(x) for x in inps)
        batch = torch.zeros((len(idx), width), dtype=torch.long)
        for r, x in enumerate(inps):  # right padding, as lm-eval (causal: pads never reach earlier positions)
            batch[r, : len(x)] = torch.tensor(x, dtype=torch.long)
        # keep the logits from the earliest scored position on: (B, keep, V)
        keep = width - min(len(x) - len(c) for x, c in zip(inps, conts))
        logp = torch.log_softmax(last_logits(model, batch.to(device), keep).float(), dim=-1)  # (B, keep, V)
        target = torch.zeros((len(idx), keep), dtype=torch.long)
        scored = torch.zeros((len(idx), keep), dtype=torch.bool)
        for r, (x, c) in enumerate(zip(inps, conts)):
            start = len(x) - len(c) - (width - keep)  # the first scored position within `keep`
            target[r, start : start + len(c)] = torch.tensor(c, dtype=torch.long)
            scored[r, start : start + len(c)] = True
        target, scored = target.to(logp.device), scored.to(logp.device)
        token_lp = logp.gather(-1, target[..., None]).squeeze(-1).masked_fill(~scored, 0.0)  # (B, keep)
        lls = token_lp.sum(-1).tolist()
        greedy = ((logp.argmax(-1) == target) | ~scored).all(-1).tolist()
        for r, i in enumerate(idx):
            out[i] = (lls[r], greedy[r])
        if progress:
            progress(len(idx))
    return out  # type: ignore[return-value]


def last_logits(model: Any, ids: torch.Tensor, keep: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The logits of the last `keep` positions, (B, keep, V); the others are not projected onto the vocabulary
    where the model class takes `logits_to_keep` (transformers' causal LMs do)."""
    extra = {} if attention_mask is None else {"attention_mask": attention_mask}
    if _may_take_logits_to_keep(type(model)):
        try:
            return model(ids, logits_to_keep=keep, **extra).logits[:, -keep:]
        except TypeError as e:  # passed on through **kwargs to a forward without it
            if "logits_to_keep" not in str(e):
                raise
    return model(ids, **extra).logits[:, -keep:]


@functools.cache
def _may_take_logits_to_keep(cls: type) -> bool:
    """Whether `cls.forward` names `logits_to_keep` or takes **kwargs (a PEFT wrapper passes them on)."""
    try:
        params = inspect.signature(cls.forward).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "logits_to_keep" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
