"""Domain accuracy: multiple choice by log-likelihood, `acc` and `acc_norm` as lm-evaluation-harness.

For a question with choices c_1..c_k and gold g, each choice is scored as ll_j = log P(cont_j | ctx):

    acc      = 1[argmax_j ll_j == g]
    acc_norm = 1[argmax_j ll_j / len(c_j) == g]      len in characters of the choice text (no delimiter)

(argmax takes the first of equal values, as numpy does), averaged over questions; the standard errors
are lm-eval's: sample standard deviation (ddof = 1) / √n.

Prompt formats (the shipped task YAML `tasks/safemerge_mc.yaml` is the same task for lm-eval):
  plain  ctx = question,  cont = " " + choice
         (doc_to_text "{{question}}", doc_to_choice "{{choices}}", target_delimiter " ")
  chat   ctx = the model's chat template on one user turn (the question) with the generation prompt,
         cont = choice with no delimiter: what lm-eval's --apply_chat_template does. A model without
         a chat template falls back to `plain`, with a warning and `format: plain` in the result.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import TYPE_CHECKING, Any, Sequence

from safemerge._args import check_arguments
from safemerge.data.loaders import MCQuestion, QuestionSet, load_multiple_choice
from safemerge.errors import SafemergeError
from safemerge._progress import progress_bar
from safemerge.evaluate.backends import PROMPT_VERSION, EvaluationWarning, TransformersBackend, get_backend, render_prompt
from safemerge.evaluate.loading import ModelRef, asked_for, check_batch_size, model_ref, resolve_device, resolve_dtype
from safemerge.evaluate.loglik import encode_pairs, loglikelihoods, max_length
from safemerge.store import ResultsStore, open_store, result_key

if TYPE_CHECKING:
    import torch

FORMATS = ("plain", "chat")


FALLBACK = "no chat template; scored with the plain format instead of chat"  # said by the call, never stored


def build_requests(questions: Sequence[MCQuestion], tokenizer: Any, *, format: str) -> list[tuple[list[int], list[int]]]:
    """One (ctx ids, cont ids) per (question, choice), question-major."""
    pairs = []
    for q in questions:
        if format == "chat":
            pairs += [(render_prompt(tokenizer, q.question), c) for c in q.choices]
        else:
            pairs += [(q.question, " " + c) for c in q.choices]
    return encode_pairs(tokenizer, pairs)


def check_requests(questions: Sequence[MCQuestion], requests: Sequence[tuple[list[int], list[int]]], *, source: str,
                   format: str) -> None:
    """Name the question and choice whose continuation tokenizes to nothing (it merges into the end of the prompt:
    a tokenizer with a token for a template's last text and the choice together), instead of a request number."""
    k = 0
    for n, q in enumerate(questions, 1):
        for c in q.choices:
            if not requests[k][1]:
                raise SafemergeError(f"{source}: question {n} ({q.question[:60]!r}), choice {c!r}: the choice adds no "
                                     f"token to the {format} prompt (the tokenizer merges it into the prompt's end), so "
                                     "it cannot be scored; try the other --format, or reword the choice")
            k += 1


def score(questions: Sequence[MCQuestion], lls: Sequence[float]) -> dict:
    """acc, acc_norm and their standard errors from the flat, question-major log-likelihoods."""
    acc, acc_norm, k = [], [], 0
    for q in questions:
        ll = lls[k : k + len(q.choices)]
        k += len(q.choices)
        acc.append(float(_argmax(ll) == q.answer))
        acc_norm.append(float(_argmax([x / len(c) for x, c in zip(ll, q.choices)]) == q.answer))
    return {"acc": _mean(acc), "acc_stderr": _stderr(acc), "acc_norm": _mean(acc_norm), "acc_norm_stderr": _stderr(acc_norm)}


def evaluate_domain(
    model: "str | os.PathLike | TransformersBackend | ModelRef",
    *,
    task: "str | os.PathLike | Sequence[dict] | QuestionSet",
    format: str = "plain",
    limit: int | None = None,
    batch_size: int = 32,
    device: str = "auto",
    dtype: "str | torch.dtype" = "auto",
    store: "ResultsStore | str | os.PathLike | None" = None,
    cache: bool = True,
    progress: bool = False,
) -> dict:
    """Multiple-choice accuracy of `model` (path or loaded backend) on a JSONL task (see module doc).

    Returns {"acc", "acc_norm", their stderrs, "n", "format", "task", fingerprints, timing, "cached"}.
    The result is stored (and looked up first, unless cache=False) when the model has a fingerprint.
    """
    check_arguments(evaluate_domain, locals())
    if format not in FORMATS:
        raise SafemergeError(f"unknown format {format!r}; choose plain or chat")
    check_batch_size(batch_size=batch_size)
    resolve_device(device), resolve_dtype(dtype)  # checked before a stored result can answer
    qs = load_multiple_choice(task, limit=limit)
    db = open_store(store)
    ref = model_ref(model, dtype=dtype, store=db)
    used, fallback = format, []  # the fallback note belongs to this call, not to the figures stored under `used`
    if format == "chat" and ref.chat_template is None:
        used = "plain"
        fallback.append(f"{ref.source}: {FALLBACK}")
        warnings.warn(fallback[-1], EvaluationWarning, stacklevel=2)
    settings = {"format": used, **ref.identity()}
    if used == "plain":
        settings.pop("chat_template", None)
    else:  # the chat contexts are rendered on a fixed date since PROMPT_VERSION 2
        settings["prompting"] = PROMPT_VERSION
    key = result_key("domain", model=ref.fingerprint or "", data=qs.fingerprint, settings=settings)
    if cache and ref.fingerprint and (hit := db.get(key)) is not None:
        stored = [n for n in hit.get("warnings") or [] if not n.endswith(FALLBACK)]
        for note in stored:  # a stored result says what it said when it was computed (older ones held the fallback too)
            warnings.warn(note, EvaluationWarning, stacklevel=2)
        return {**hit, **asked_for(ref, hit), "warnings": fallback + stored, "cached": True}

    t0 = time.perf_counter()
    backend = get_backend(ref, device=device, dtype=dtype, batch_size=batch_size)
    if not isinstance(backend, TransformersBackend):
        raise SafemergeError(f"domain accuracy needs the transformers backend, got {backend.name}")
    tok = backend.tokenizer
    reqs = build_requests(qs.questions, tok, format=used)
    check_requests(qs.questions, reqs, source=qs.source, format=used)
    with progress_bar(len(reqs), f"scoring {qs.name}", enabled=progress) as advance:
        lls = loglikelihoods(backend.model, reqs, max_len=max_length(backend.model, tok), batch_size=batch_size, progress=advance)
    seconds = time.perf_counter() - t0
    result = {
        "kind": "domain", "task": qs.name, "source": qs.source, "format": used, "n": len(qs),
        **score(qs.questions, [ll for ll, _ in lls]),
        "model": ref.source, "model_fingerprint": ref.fingerprint, "data_fingerprint": qs.fingerprint,
        "seconds": round(seconds, 3), "questions_per_second": round(len(qs) / seconds, 2) if seconds > 0 else None,
        "warnings": [], "cached": False,
    }
    if ref.fingerprint:
        db.put(key, result, kind="domain", model=backend.fingerprint, data=qs.fingerprint, settings=settings)
    return {**result, "warnings": fallback}


def _argmax(xs: Sequence[float]) -> int:
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _stderr(xs: Sequence[float]) -> float | None:
    n = len(xs)
    if n < 2:
        return None
    mu = _mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)
