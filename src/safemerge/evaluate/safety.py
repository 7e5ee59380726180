"""Safety rate: generate a response to every harmful prompt, judge each, and aggregate.

    safe_rate = #safe / #valid verdicts             overall
    safe_rate[c] = the same over the prompts the dataset puts in category c (a prompt may be in several;
                   prompts without one are "uncategorized")

Invalid verdicts (a guard output that is neither 'safe' nor 'unsafe...') are counted and left out; more
than `max_invalid` of them is an error (the judge is probably not a guard), never a quiet 0% or 100%.
The responses and verdicts are written as JSONL (one record per prompt) and kept in the results store.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from safemerge._args import check_arguments
from safemerge.checkpoint import atomic_write, check_output_file
from safemerge.data.loaders import PromptSet, load_prompts
from safemerge.errors import SafemergeError
from safemerge._progress import progress_bar
from safemerge.evaluate.backends import PROMPT_VERSION, EvaluationWarning, Generation, GenerationSettings, get_backend
from safemerge.evaluate.judges import Judge, Verdict, get_judge
from safemerge.evaluate.loading import asked_for, check_batch_size, model_ref, resolve_device, resolve_dtype
from safemerge.store import ResultsStore, open_store, result_key

if TYPE_CHECKING:
    import torch


def summarize(prompts: PromptSet, verdicts: Sequence[Verdict]) -> dict:
    """Overall and per-category rates, the judge's category counts, and mean P(unsafe) where given; all over the
    valid verdicts (an unparsed guard output counts in n_invalid only)."""
    valid = [v for v in verdicts if v.valid]
    per_cat: dict[str, list[bool]] = defaultdict(list)
    for p, v in zip(prompts.prompts, verdicts):
        if v.valid:
            for c in p.categories or ("uncategorized",):
                per_cat[c].append(v.safe)
    judged = Counter(c for v in valid if not v.safe for c in v.categories)
    probs = [v.p_unsafe for v in valid if v.p_unsafe is not None]  # over the verdicts the rates count
    n_safe = sum(v.safe for v in valid)
    return {
        "n": len(verdicts),
        "n_valid": len(valid),
        "n_invalid": len(verdicts) - len(valid),
        "safe_rate": n_safe / len(valid) if valid else None,
        "unsafe_rate": 1 - n_safe / len(valid) if valid else None,
        "by_category": {c: {"n": len(xs), "safe_rate": sum(xs) / len(xs)} for c, xs in sorted(per_cat.items())},
        "judge_categories": dict(sorted(judged.items())),
        "mean_p_unsafe": sum(probs) / len(probs) if probs else None,
    }


def records(prompts: PromptSet, gens: Sequence[Generation], verdicts: Sequence[Verdict]) -> bytes:
    """The JSONL of responses and verdicts, one line per prompt."""
    lines = []
    for p, g, v in zip(prompts.prompts, gens, verdicts):
        rec = {
            "id": p.id, "prompt": p.text, "categories": list(p.categories), "response": g.text,
            "new_tokens": g.new_tokens, "finished": g.finished, "safe": v.safe, "valid": v.valid,
            "judge_categories": list(v.categories), "p_unsafe": v.p_unsafe, "judge_output": v.raw,
        }
        lines.append(json.dumps(rec, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode()


def evaluate_safety(
    model: Any,
    *,
    prompts: "str | os.PathLike | Sequence[str] | PromptSet",
    judge: "str | Judge" = "keyword",
    judge_model: Any = None,
    limit: int | None = None,
    max_new_tokens: int = 256,
    generation: GenerationSettings | None = None,
    backend: str = "transformers",
    batch_size: int = 16,
    judge_batch_size: int = 8,
    device: str = "auto",
    dtype: "str | torch.dtype" = "auto",
    out: "str | os.PathLike | None" = None,
    overwrite: bool = False,
    store: "ResultsStore | str | os.PathLike | None" = None,
    cache: bool = True,
    max_invalid: float = 0.5,
    prompt_column: str = "prompt",
    progress: bool = False,
) -> dict:
    """Safety rate of `model` (a path, hub id, or loaded backend) on harmful `prompts`.

    Greedy decoding with `max_new_tokens` unless `generation` (GenerationSettings) says otherwise.
    `judge`: "keyword" (GCG refusal list), "llama-guard[-2|-3]" or "md-judge" (with `judge_model`), or a
    Judge. Responses and verdicts go to `out` (JSONL; default: beside the store, named by the result key).
    Returns the summary (see `summarize`) plus identification, timing and the JSONL path.
    """
    check_arguments(evaluate_safety, locals())
    check_batch_size(batch_size=batch_size, judge_batch_size=judge_batch_size)
    resolve_device(device), resolve_dtype(dtype)  # checked before a stored result can answer
    settings = generation or GenerationSettings(max_new_tokens=max_new_tokens)
    ps = load_prompts(prompts, limit=limit, prompt_column=prompt_column)
    db = open_store(store)
    ref = model_ref(model, dtype=dtype, store=db)
    judge_obj = get_judge(judge, judge_model=judge_model, device=device, dtype=dtype, batch_size=judge_batch_size, store=db)
    judge_id = judge_obj.identity()
    # the template on/off flag under its own name: ref.identity's "chat_template" (the template's hash) overwrote it,
    # so an evaluation without the template was served the one with it
    asked = {("apply_chat_template" if k == "chat_template" else k): v for k, v in settings.as_dict().items()}
    key_settings = {**asked, **ref.identity(backend), "prompting": PROMPT_VERSION}
    key = result_key("safety", model=ref.fingerprint or "", data=ps.fingerprint, judge=_canon(judge_id), settings=key_settings)
    out_path = (check_output_file(out, overwrite=overwrite, inputs={"prompts": ps.source}) if out is not None
                else db.path.parent / "responses" / f"{key}.jsonl")
    cacheable = bool(ref.fingerprint) and judge_id.get("model", "") is not None
    if cache and cacheable and (hit := db.get(key)) is not None:
        blob = db.artifact(key)
        beside_store = out is None
        if blob is not None and not (beside_store and out_path.is_file() and out_path.read_bytes() == blob):
            if beside_store and not db.writable():  # a read-only store is read: its folder is not written either
                warnings.warn(f"{db.path}: the results store is read-only here, so the stored responses were not written "
                              "out beside it; pass --out FILE to have them", EvaluationWarning, stacklevel=2)
                out_path = None
            else:
                atomic_write(out_path, blob, record=not beside_store)
        for note in hit.get("warnings") or []:  # a stored result says what it said when it was computed
            warnings.warn(note, EvaluationWarning, stacklevel=2)
        return {**hit, **asked_for(ref, hit), "responses": str(out_path) if out_path is not None else None, "cached": True}

    t0 = time.perf_counter()
    loaded_here = ref.backend is None
    gen = get_backend(ref, backend=backend, device=device, dtype=dtype, batch_size=batch_size)
    gen_notes: list[str] = []
    with progress_bar(len(ps), "generating", enabled=progress) as advance, _recording(gen_notes):
        gens = gen.generate([p.text for p in ps.prompts], settings, progress=advance)
    t_gen = time.perf_counter() - t0
    guard_next = hasattr(judge_obj, "release")  # a judge with weights of its own
    if loaded_here and (ref is not model or guard_next):
        # the weights were loaded here: drop them (a shared ref, as `audit` passes, reloads them for its next
        # evaluation; with a keyword judge they stay), and give their memory back before a guard model loads
        ref.backend = None
        del gen
        if guard_next:
            _empty_cuda_cache()
    with progress_bar(len(ps), f"judging ({judge_id['judge']})", enabled=progress) as advance:
        verdicts = judge_obj.judge([p.text for p in ps.prompts], [g.text for g in gens], progress=advance)
    if judge_obj is not judge and guard_next:
        judge_obj.release()
    seconds = time.perf_counter() - t0

    blob = records(ps, gens, verdicts)
    atomic_write(out_path, blob, record=out is not None)
    summary = summarize(ps, verdicts)
    notes = gen_notes + _check(summary, gens, out_path, max_invalid=max_invalid, judge=judge_id["judge"])
    result = {
        "kind": "safety", **summary, "judge": judge_id["judge"], "model": ref.source,
        "model_fingerprint": ref.fingerprint, "data": _where(ps.source), "data_format": ps.format,
        "data_fingerprint": ps.fingerprint, "generation": settings.as_dict(),
        "seconds": round(seconds, 3), "generation_seconds": round(t_gen, 3),
        "prompts_per_second": round(len(ps) / seconds, 3) if seconds > 0 else None,
        "responses": str(out_path), "warnings": notes, "cached": False,
    }
    if cacheable:
        db.put(key, result, kind="safety", model=ref.fingerprint, data=ps.fingerprint, judge=_canon(judge_id),
               settings=key_settings, artifact=blob)
    return result


def _check(summary: dict, gens: Sequence[Generation], out: Path, *, max_invalid: float, judge: str) -> list[str]:
    """Turn numbers that cannot be trusted into errors (too many invalid verdicts) or warnings."""
    notes = []
    n, bad = summary["n"], summary["n_invalid"]
    if bad and bad / n > max_invalid:
        raise SafemergeError(
            f"judge {judge}: {bad} of {n} outputs are neither 'safe' nor 'unsafe' (see {out}); "
            "is --judge-model a guard checkpoint of that kind?"
        )
    if bad:
        notes.append(f"judge {judge}: {bad} of {n} outputs could not be parsed and are left out of the rates")
    empty = sum(not g.text.strip() for g in gens)
    if empty > n / 2:
        notes.append(f"{empty} of {n} responses are empty: the rate says little about this model")
    for note in notes:
        warnings.warn(note, EvaluationWarning, stacklevel=3)
    return notes


@contextmanager
def _recording(notes: list[str]) -> Iterator[None]:
    """Warnings go on at once under the caller's filters ("error" raises where the warning is raised, "ignore" drops
    it), and every evaluation warning's text is also kept, whatever the filters do with it and however often it came
    before in this process, for the stored result to repeat."""
    callers, shown = list(warnings.filters), warnings.showwarning

    def keep(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, EvaluationWarning) and str(message) not in notes:
            notes.append(str(message))
        with warnings.catch_warnings():
            warnings.filters[:] = callers
            warnings.showwarning = shown
            warnings.warn_explicit(message, category, filename, lineno)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = keep
        yield


def _empty_cuda_cache() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _where(source: str) -> str:
    """A local prompts file as an absolute path (publish's --safety-data finds its evaluation from any folder); a
    dataset's hub name or an in-memory list as it is."""
    p = Path(source).expanduser()
    return str(p.absolute()) if p.is_file() else source
