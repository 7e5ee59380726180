"""Safety rate end to end: generation, judging, per-category rates, the JSONL, the store, bad judges."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:.*no chat template:safemerge.evaluate.backends.EvaluationWarning")

from eval_tiny import PROMPTS
from safemerge.data.loaders import DataError
from safemerge.errors import OutputExistsError, SafemergeError
from safemerge.evaluate import EvaluationWarning, evaluate_safety


def test_keyword_safety_rate_overall_and_per_category(refuser, prompts_file, store, tmp_path):
    out = tmp_path / "responses.jsonl"
    with pytest.warns(EvaluationWarning, match="refuser: the tokenizer has no chat template"):
        r = evaluate_safety(refuser, prompts=prompts_file, device="cpu", store=store, out=out, max_new_tokens=8)
    # the refuser says "I'm sorry" exactly to the prompts that end in '?'
    refused = [p["prompt"].endswith("?") for p in PROMPTS]
    assert (r["n"], r["n_valid"], r["n_invalid"]) == (6, 6, 0)
    assert r["safe_rate"] == pytest.approx(sum(refused) / 6)
    assert r["by_category"] == {
        "crime": {"n": 3, "safe_rate": 1.0}, "harm": {"n": 1, "safe_rate": 1.0}, "hate": {"n": 1, "safe_rate": 0.0},
        "uncategorized": {"n": 1, "safe_rate": 0.0}, "weapons": {"n": 1, "safe_rate": 0.0},
    }
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["response"] for x in recs] == ["I'm sorry" if f else "Sure" for f in refused]
    assert [x["safe"] for x in recs] == refused and recs[2]["categories"] == ["crime", "harm"]
    assert r["responses"] == str(out) and not r["cached"]


def test_repeat_is_a_lookup_and_no_cache_recomputes(refuser, prompts_file, store, tmp_path):
    first = evaluate_safety(refuser, prompts=prompts_file, device="cpu", store=store, max_new_tokens=8)
    again = evaluate_safety(refuser, prompts=prompts_file, device="cpu", store=store, max_new_tokens=8, out=tmp_path / "r.jsonl")
    assert again["cached"] and again["safe_rate"] == first["safe_rate"]
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 6  # written from the stored responses
    other = evaluate_safety(refuser, prompts=prompts_file, device="cpu", store=store, max_new_tokens=9)
    assert not other["cached"]  # a generation setting is part of the key
    assert not evaluate_safety(refuser, prompts=prompts_file, device="cpu", store=store, max_new_tokens=8, cache=False)["cached"]
    with pytest.raises(OutputExistsError, match="r.jsonl: already exists"):
        evaluate_safety(refuser, prompts=prompts_file, device="cpu", store=store, max_new_tokens=8, out=tmp_path / "r.jsonl")


def test_a_stored_result_is_reported_for_the_model_asked_about(refuser, prompts_file, mc_file, store, tmp_path):
    """Review: a copy of an evaluated model was served the stored result under the original's path ("safety of
    /models/a (cached)"), as if the other model had been asked about."""
    import shutil

    from safemerge.evaluate import evaluate_domain

    copy = tmp_path / "copy"
    shutil.copytree(refuser, copy)
    for run in (lambda m: evaluate_safety(m, prompts=prompts_file, device="cpu", store=store, max_new_tokens=8),
                lambda m: evaluate_domain(m, task=mc_file, device="cpu", store=store)):
        first, again = run(refuser), run(copy)
        assert again["cached"] and again["model"] == str(copy) and again["computed_for"] == first["model"] == str(refuser)
        assert "computed_for" not in run(refuser)


def test_llama_guard_judged_run(complier, guard3_unsafe, prompts_file, store):
    r = evaluate_safety(complier, prompts=prompts_file, judge="llama-guard", judge_model=guard3_unsafe,
                        device="cpu", store=store, max_new_tokens=4)
    assert r["safe_rate"] == 0.0 and r["judge_categories"] == {"S1": 6, "S10": 6}
    assert 0 < r["mean_p_unsafe"] < 1 and r["judge"] == "llama-guard"
    again = evaluate_safety(complier, prompts=prompts_file, judge="llama-guard", judge_model=guard3_unsafe,
                            device="cpu", store=store, max_new_tokens=4)
    assert again["cached"]


def test_a_guard_run_in_another_dtype_is_not_served_from_the_store(complier, guard3_unsafe, prompts_file, store, tmp_path):
    """The guard's dtype ("auto" resolved from its own config) and its side files are in the key. With a guard whose
    config says bfloat16, `dtype="auto"` and `dtype="float32"` load the float32 model alike, but not the guard: the
    bf16 guard's P(unsafe) was returned for the float32 run."""
    import shutil

    from safemerge.evaluate import get_judge

    guard = tmp_path / "guard-bf16"
    shutil.copytree(guard3_unsafe, guard)
    cfg = json.loads((guard / "config.json").read_text())
    (guard / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    run = dict(prompts=prompts_file, judge="llama-guard", judge_model=guard, device="cpu", store=store, max_new_tokens=4)
    auto = evaluate_safety(complier, **run)
    f32 = evaluate_safety(complier, **run, dtype="float32")
    assert not auto["cached"] and not f32["cached"]
    assert evaluate_safety(complier, **run, dtype="float32")["cached"]
    ids = [get_judge("llama-guard", judge_model=guard, dtype=d).identity() for d in ("auto", "float32")]
    assert (ids[0]["dtype"], ids[1]["dtype"]) == ("bfloat16", "float32") and ids[0]["files"] == ids[1]["files"]


def test_mean_p_unsafe_counts_the_valid_verdicts_only():
    """An unparsed guard output is left out of the rates; it was still averaged into mean_p_unsafe."""
    from safemerge.data.loaders import Prompt, PromptSet
    from safemerge.evaluate.judges import Verdict
    from safemerge.evaluate.safety import summarize

    ps = PromptSet([Prompt("a"), Prompt("b"), Prompt("c")], "fp", "mem", "plain")
    s = summarize(ps, [Verdict(True, p_unsafe=0.2), Verdict(False, p_unsafe=0.8), Verdict(False, p_unsafe=0.0, valid=False)])
    assert s["n_valid"] == 2 and s["safe_rate"] == 0.5 and s["mean_p_unsafe"] == pytest.approx(0.5)


def test_a_judge_that_is_no_guard_is_an_error_not_a_rate(complier, guard3_random, prompts_file, store):
    with pytest.raises(SafemergeError, match="outputs are neither 'safe' nor 'unsafe'"):
        evaluate_safety(complier, prompts=prompts_file, judge="llama-guard", judge_model=guard3_random,
                        device="cpu", store=store, max_new_tokens=4)


def test_bad_prompt_files(complier, tmp_path, store):
    (tmp_path / "p.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(DataError, match="p.jsonl: no 'prompt' column"):
        evaluate_safety(complier, prompts=tmp_path / "p.jsonl", device="cpu", store=store)
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match="e.csv: the file is empty"):
        evaluate_safety(complier, prompts=tmp_path / "e.csv", device="cpu", store=store)


def test_memory_is_given_back_only_before_a_guard_loads(refuser, complier, guard3_unsafe, prompts_file, store, monkeypatch):
    """A full garbage collection costs a quarter of a second: it runs only when a guard model loads next, and only
    weights this call loaded are dropped (a backend the caller passed stays theirs)."""
    import safemerge.evaluate.safety as safety
    from safemerge.evaluate import get_backend

    collections = []
    monkeypatch.setattr(safety, "_empty_cuda_cache", lambda: collections.append(1))
    kw = dict(prompts=prompts_file, device="cpu", store=store, max_new_tokens=4, cache=False)
    with pytest.warns(EvaluationWarning):
        evaluate_safety(refuser, **kw)  # a path, keyword judge
        backend = get_backend(complier, device="cpu")
        evaluate_safety(backend, **kw)  # a loaded backend, keyword judge
        evaluate_safety(backend, judge="llama-guard", judge_model=guard3_unsafe, **kw)  # a loaded backend, guard
    assert collections == []
    assert backend.model is not None  # the caller's backend still holds its model
    evaluate_safety(complier, judge="llama-guard", judge_model=guard3_unsafe, **kw)  # a path, guard: weights freed first
    assert collections == [1]


def test_an_error_filter_raises_at_the_first_evaluation_warning(refuser, prompts_file, store, tmp_path):
    """With the caller's filters making EvaluationWarning an error, the first one raises where it is raised: the
    generation stops there (before, every warning was held until all the answers were generated), nothing is written
    or stored. Other filters still see each warning once the generation ends (the test above)."""
    import warnings

    from safemerge.evaluate import get_backend

    backend = get_backend(refuser, device="cpu")
    real, batches = backend.generate, []

    def generate(prompts, settings, *, progress=None):
        warnings.warn("the first batch was cut", EvaluationWarning)
        batches.append(len(prompts))
        return real(prompts, settings, progress=progress)

    backend.generate = generate
    out = tmp_path / "r.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvaluationWarning)
        with pytest.raises(EvaluationWarning, match="the first batch was cut"):
            evaluate_safety(backend, prompts=prompts_file, device="cpu", store=store, out=out, max_new_tokens=4)
    assert batches == [] and not out.exists()
    with warnings.catch_warnings():  # errors, but this message ignored: it is not shown, and still recorded
        warnings.simplefilter("error", EvaluationWarning)
        warnings.filterwarnings("ignore", "the first batch was cut|.*no chat template", EvaluationWarning)
        r = evaluate_safety(backend, prompts=prompts_file, device="cpu", store=store, out=out, max_new_tokens=4)
    assert batches == [6] and out.exists() and "the first batch was cut" in r["warnings"]
    again = evaluate_safety(backend, prompts=prompts_file, device="cpu", store=store, max_new_tokens=4)
    assert again["cached"] and "the first batch was cut" in again["warnings"]
