"""The search objective: cross-entropy on answer tokens, safety and domain data mixed by λ.

    L(θ) = λ · CE_safety(θ) + (1 − λ) · CE_domain(θ),      λ ∈ [0, 1], default 0.5

CE_set is the mean token cross-entropy over the answer tokens of every example of the set (a token
mean within the set, so a set's weight does not depend on its size; prompt tokens are masked out).
Each example is a `{"prompt", "response"}` row: the prompt is rendered with the model's chat template
as one user turn with the generation prompt (plain text when the tokenizer has none), and the answer
is what the template appends for the assistant turn (so the end-of-turn marker is scored too), or
the response plus EOS without a template. λ = 0 is the safety-unaware baseline (domain data only);
λ = 1 scores safety only. The safety-aware objective follows Hammoud et al. (2024), "Model Merging and
Safety Alignment: One Bad Model Spoils the Bunch".
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from safemerge.data.loaders import DataError, jsonl_lines
from safemerge.errors import ConfigError
from safemerge.evaluate.loglik import last_logits

DEFAULT_LAMBDA = 0.5
IGNORE = -100


# -- data -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str


@dataclass(frozen=True)
class PairSet:
    """`{"prompt", "response"}` examples and a fingerprint of the file's bytes (and the limit)."""

    pairs: list[Pair]
    fingerprint: str
    source: str

    def __len__(self) -> int:
        return len(self.pairs)


def load_pairs(path: str | os.PathLike, *, limit: int | None = None) -> PairSet:
    """Read a JSONL file of `{"prompt": str, "response": str, ...}` rows (other fields are ignored).

    `limit` keeps the first N rows. Raises DataError naming the file and row for a bad row.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "no such data file"
        raise DataError(f"{p}: {what}; pass a JSONL file of {{\"prompt\", \"response\"}} rows")
    raw = p.read_bytes()
    pairs = []
    body = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw  # a UTF-8 byte-order mark, as the other readers skip it
    if body.lstrip().startswith(b"["):
        raise DataError(f"{p}: a JSON array; the search reads JSONL, one {{\"prompt\", \"response\"}} object per line "
                        "(`jq -c '.[]' FILE > FILE.jsonl` converts it)")
    for n, line in jsonl_lines(p, body):  # (`safemerge data` writes U+2028 and the like unescaped)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: line {n} is not JSON ({e.msg}); the file must be JSONL, one object per line") from None
        missing = [k for k in ("prompt", "response") if not isinstance(row, dict) or not isinstance(row.get(k), str)]
        if missing:
            raise DataError(f"{p}: line {n} has no text {' or '.join(map(repr, missing))} field; every row needs "
                            "\"prompt\" and \"response\" strings (make them with `safemerge data safety|domain`)")
        pairs.append(Pair(row["prompt"], row["response"]))
    if not pairs:
        raise DataError(f"{p}: the file has no rows; it needs at least one {{\"prompt\", \"response\"}} row")
    if limit is not None:
        if limit < 1:
            raise DataError(f"--limit {limit} (limit=): give a positive number of examples")
        pairs = pairs[:limit]
    digest = hashlib.blake2b(raw + json.dumps({"limit": limit}).encode(), digest_size=16).hexdigest()
    return PairSet(pairs, digest, str(p))


# -- tokenisation ---------------------------------------------------------------------------------
def encode_pair(tokenizer: Any, pair: Pair, *, chat_template: bool = True) -> tuple[list[int], int]:
    """(token ids, number of prompt tokens): ids = prompt tokens + answer tokens."""
    from safemerge.evaluate.backends import chat_text, encode, prefix_token_id, render_prompt

    prompt = render_prompt(tokenizer, pair.prompt, chat_template=chat_template)
    answer = None
    if chat_template and getattr(tokenizer, "chat_template", None):
        full = chat_text(tokenizer, [{"role": "user", "content": pair.prompt}, {"role": "assistant", "content": pair.response}])
        if full.startswith(prompt):
            answer = full[len(prompt):]
    if answer is None:  # no template, or one that rewrites the prompt for the assistant turn
        answer = pair.response + (tokenizer.eos_token or "")
    prompt_ids = encode(tokenizer, prompt)
    if not prompt_ids and prefix_token_id(tokenizer) is not None:  # an empty prompt without BOS: nothing would
        prompt_ids = [prefix_token_id(tokenizer)]  # predict the first answer token; lm-eval puts the prefix token there
    answer_ids = list(tokenizer.encode(answer, add_special_tokens=False))
    if not answer_ids:
        raise DataError(f"an example's response encodes to no tokens (prompt {pair.prompt[:60]!r}); drop it from the data")
    return prompt_ids + answer_ids, len(prompt_ids)


@dataclass(frozen=True)
class Batches:
    """Right-padded batches, sorted by length: (input_ids, attention_mask, labels), each (B, T) int64.

    labels = input ids on answer tokens, IGNORE elsewhere (prompt and padding).
    """

    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    n_tokens: int  # answer tokens in all batches
    n_examples: int

    @functools.cached_property
    def first_scored(self) -> list[int]:
        """Per batch, the position whose logit predicts its earliest answer token (a token at position 0 has no
        context): found once, not for every candidate scored."""
        return [max(int((labels != IGNORE).any(0).nonzero()[0]) - 1, 0) for _, _, labels in self.batches]


def make_batches(tokenizer: Any, pairs: Sequence[Pair], *, batch_size: int = 16, max_length: int | None = None,
                 chat_template: bool = True) -> Batches:
    """Tokenise every example once; long examples are cut from the left of the prompt to `max_length`, and an answer
    that does not fit even so loses its end (with a warning)."""
    encoded = [encode_pair(tokenizer, p, chat_template=chat_template) for p in pairs]
    if max_length is not None:
        answers = [len(ids) - n for ids, n in encoded]
        encoded = [_fit(ids, n, max_length) for ids, n in encoded]
        cut = sum(len(ids) - n < a for (ids, n), a in zip(encoded, answers))
        if cut:
            import warnings

            warnings.warn(f"{cut} of {len(encoded)} examples have answers longer than max_length {max_length} leaves "
                          "them, and are scored on their first tokens only (the end, with its end-of-turn token, is "
                          "cut); give a larger --max-length (max_length=) or shorter answers", UserWarning, stacklevel=2)
        if any(n >= len(ids) for ids, n in encoded):
            raise ConfigError(f"max_length {max_length} leaves an example no answer token to score; give a larger "
                              "max_length (the default is 512)")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out, total = [], 0
    for b in range(0, len(order), batch_size):
        rows = [encoded[i] for i in order[b:b + batch_size]]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for r, (seq, n_prompt) in enumerate(rows):
            ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
            labels[r, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
            total += len(seq) - n_prompt
        out.append((ids, mask, labels))
    return Batches(out, total, len(encoded))


def _fit(ids: list[int], n_prompt: int, max_length: int) -> tuple[list[int], int]:
    if len(ids) <= max_length:
        return ids, n_prompt
    cut = max(0, min(len(ids) - max_length, n_prompt - 1))  # keep ≥ 1 prompt token: the first answer token needs a context
    ids, n_prompt = ids[cut:], n_prompt - cut
    return ids[:max_length], n_prompt


@torch.inference_mode()
def answer_ce(model: Any, batches: Batches) -> float:
    """Mean cross-entropy (nats per token) over the answer tokens of all batches.

    CE = −Σ_tokens log p(y_t | y_<t) / N_answer_tokens; the logit at position t scores the token at t + 1.
    Only the positions from the one that predicts the batch's earliest answer token on are projected onto the
    vocabulary: the (B, T, V) logits of whole prompts would dominate memory on a large vocabulary and are never
    scored.
    """
    device = next(model.parameters()).device
    total = 0.0
    for (ids, mask, labels), first in zip(batches.batches, batches.first_scored):
        keep = ids.shape[1] - first
        logits = last_logits(model, ids.to(device), keep, attention_mask=mask.to(device))  # (B, keep, V)
        shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        targets = labels[:, first + 1:].reshape(-1).to(device)
        total += float(F.cross_entropy(shifted, targets, ignore_index=IGNORE, reduction="sum"))
    return total / batches.n_tokens


# -- the objective --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Score:
    """Both losses of one candidate and the objective they give (lower is better); NaN = not scored."""

    safety: float
    domain: float
    objective: float

    def as_dict(self) -> dict:
        """JSON-ready: a loss that was not scored (NaN) is None."""
        return {"safety_loss": _none_if_nan(self.safety), "domain_loss": _none_if_nan(self.domain),
                "objective": _none_if_nan(self.objective)}


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x


def check_lambda(lambda_: float) -> float:
    lam = float(lambda_)
    if not 0.0 <= lam <= 1.0 or math.isnan(lam):
        raise ConfigError(f"--lambda {lambda_}: λ weighs safety against domain loss and must be in [0, 1] "
                          "(0 = domain data only, 1 = safety data only)")
    return lam


class Objective:
    """λ·CE(safety) + (1−λ)·CE(domain) of a model; the data are tokenised once at construction.

    A set whose weight is 0 may be None (it is then not scored, and its loss is NaN).
    """

    def __init__(self, tokenizer: Any, *, safety: Sequence[Pair] | PairSet | None, domain: Sequence[Pair] | PairSet | None,
                 lambda_: float = DEFAULT_LAMBDA, batch_size: int = 16, max_length: int | None = 512,
                 chat_template: bool = True):
        self.lambda_ = check_lambda(lambda_)
        if safety is None and self.lambda_ > 0:
            raise ConfigError(f"λ = {self.lambda_} weighs safety data, but none was given; pass --safety-data or --lambda 0")
        if domain is None and self.lambda_ < 1:
            raise ConfigError(f"λ = {self.lambda_} weighs domain data, but none was given; pass --domain-data or --lambda 1")

        def prep(data):
            if data is None:
                return None
            pairs = data.pairs if isinstance(data, PairSet) else list(data)
            return make_batches(tokenizer, pairs, batch_size=batch_size, max_length=max_length, chat_template=chat_template)

        self.safety, self.domain = prep(safety), prep(domain)

    def __call__(self, model: Any) -> Score:
        s = answer_ce(model, self.safety) if self.safety is not None else math.nan
        d = answer_ce(model, self.domain) if self.domain is not None else math.nan
        return Score(s, d, combine(s, d, self.lambda_))


def combine(safety: float, domain: float, lambda_: float) -> float:
    """λ·safety + (1−λ)·domain, where a loss with weight 0 may be NaN."""
    parts = [(lambda_, safety), (1 - lambda_, domain)]
    return float(sum(w * v for w, v in parts if w > 0))


def sort_key(objective: float) -> float:
    """NaN (a candidate whose loss could not be computed) sorts last."""
    return math.inf if math.isnan(objective) else objective
