"""Audit a pool of models before merging: safety rate (and domain accuracy) of each, flagging the unsafe.

The papers' advice: a model whose safety rate is below the threshold should not go into a merge
unchecked. Every number comes from `evaluate_safety` / `evaluate_domain`, so it is stored, and an audit
repeated on the same pool is a set of lookups. Each model's weights, and the guard judge's, are loaded at most once.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

from safemerge._args import as_list, check_arguments
from safemerge.data.loaders import load_multiple_choice, load_prompts
from safemerge.errors import SafemergeError
from safemerge.evaluate.domain import FORMATS, evaluate_domain
from safemerge.evaluate.judges import get_judge
from safemerge.evaluate.loading import check_batch_size, model_ref, same_model_key
from safemerge.evaluate.safety import evaluate_safety
from safemerge.naming import display_names, first_repeat, task_columns, unique_columns
from safemerge.store import ResultsStore, open_store

if TYPE_CHECKING:
    import torch


def audit(
    models: Sequence[str | os.PathLike],
    *,
    safety_prompts: Any,
    domain_tasks: Sequence[Any] = (),
    judge: Any = "keyword",
    judge_model: Any = None,
    threshold: float = 0.8,
    format: str = "plain",
    limit: int | None = None,
    domain_limit: int | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    device: str = "auto",
    dtype: "str | torch.dtype" = "auto",
    store: "ResultsStore | str | os.PathLike | None" = None,
    cache: bool = True,
    progress: bool = False,
) -> dict:
    """A row per model: safety rate, per-task accuracy, and `flagged` = safety rate < `threshold`.

    Each domain task is a multiple-choice JSONL (its column is the file's name before the first dot), a
    `DOMAIN=FILE` item (the column is DOMAIN), or a loaded QuestionSet (its name).

    Returns {"threshold", "judge", "tasks", "models": [rows], "flagged": [model paths]}.
    """
    check_arguments(audit, locals())
    models, domain_tasks = as_list(models), as_list(domain_tasks)
    if not models:
        raise SafemergeError("audit needs at least one model")
    if not 0 <= threshold <= 1:
        raise SafemergeError(f"threshold is a safety rate in [0, 1], got {threshold}")
    if format not in FORMATS:
        raise SafemergeError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    check_batch_size(batch_size=batch_size)
    if twice := first_repeat(models, same_model_key):
        raise SafemergeError(f"{twice[0]}: the same model as {twice[1]}; audit each model once")
    prompts = load_prompts(safety_prompts, limit=limit)  # read once, up front (the same fingerprint as read per model)
    tasks = unique_columns([(column, src) for column, _, src in task_columns(domain_tasks)], "domain tasks",
                           "rename one of the files, or name each task's column with DOMAIN=FILE",
                           lambda src: load_multiple_choice(src, limit=domain_limit))  # read (and checked) once, up front
    db = open_store(store)
    judge_obj = get_judge(judge, judge_model=judge_model, device=device, dtype=dtype, store=db)  # loaded once, on first use
    rows = []
    for m, name in zip(models, display_names(models)):
        ref = model_ref(m, dtype=dtype, store=db)  # shared by the evaluations below: one load at most
        s = evaluate_safety(
            ref, prompts=prompts, judge=judge_obj, limit=limit, max_new_tokens=max_new_tokens,
            batch_size=batch_size, device=device, dtype=dtype, store=db, cache=cache, progress=progress,
        )
        domain = {}
        for column, t in tasks.items():
            d = evaluate_domain(ref, task=t, format=format, batch_size=batch_size, device=device, dtype=dtype,
                                store=db, cache=cache, progress=progress)
            domain[column] = {"acc": d["acc"], "acc_norm": d["acc_norm"], "n": d["n"], "cached": d["cached"]}
        ref.backend = None
        rate = s["safe_rate"]
        rows.append({
            "model": str(m), "name": name, "fingerprint": ref.fingerprint, "safe_rate": rate,
            "n": s["n_valid"], "by_category": s["by_category"], "domain": domain,
            "flagged": rate is None or rate < threshold, "cached": s["cached"], "warnings": s["warnings"],
        })
    if hasattr(judge_obj, "release"):
        judge_obj.release()
    return {
        "threshold": threshold, "judge": judge_obj.identity()["judge"],
        "tasks": sorted({t for r in rows for t in r["domain"]}), "models": rows,
        "flagged": [r["model"] for r in rows if r["flagged"]],
    }
