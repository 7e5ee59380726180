"""Parity with lm-evaluation-harness (runs only where `lm_eval` is importable: the lm-eval extra).

Request level: lm-eval's HFLM.loglikelihood and ours give the same log-likelihood for every
(context, continuation) of both prompt formats. Task level: `evaluate_domain` and lm-eval running the
shipped task YAML (through `run_lm_eval`) give the same acc and acc_norm on the same in-memory model.
"""

from __future__ import annotations

import json
import random

import pytest

lm_eval = pytest.importorskip("lm_eval")

from safemerge.data import load_multiple_choice  # noqa: E402
from safemerge.evaluate import evaluate_domain, get_backend, run_lm_eval  # noqa: E402
from safemerge.evaluate.backends import render_prompt  # noqa: E402
from safemerge.evaluate.domain import build_requests  # noqa: E402
from safemerge.evaluate.loglik import loglikelihoods  # noqa: E402

WORDS = "the patient has a fever cough bond price rates rise cake flour sugar bake eggs minutes safe policy".split()


@pytest.fixture(scope="module")
def many_questions(tmp_path_factory):
    """40 questions with 2-5 choices of different lengths (so acc and acc_norm can differ)."""
    rng = random.Random(0)
    rows = []
    for _ in range(40):
        k = rng.randint(2, 5)
        choices = list(dict.fromkeys(" ".join(rng.choices(WORDS, k=rng.randint(1, 4))) for _ in range(k)))
        if len(choices) < 2:
            choices.append("none of these")
        q = " ".join(rng.choices(WORDS, k=rng.randint(3, 9))).capitalize() + rng.choice(["?", ":", "", " "])
        rows.append({"question": q, "choices": choices, "answer": rng.randrange(len(choices))})
    path = tmp_path_factory.mktemp("lmeval") / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("format", ["plain", "chat"])
def test_request_loglikelihoods_match_hflm(chat_model, many_questions, format):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    b = get_backend(chat_model, device="cpu")
    qs = load_multiple_choice(many_questions).questions
    pairs = []
    for q in qs:  # the (context, continuation) strings lm-eval builds for the shipped task
        ctx = render_prompt(b.tokenizer, q.question) if format == "chat" else q.question
        pairs += [(ctx, c if format == "chat" else " " + c) for c in q.choices]
    lm = HFLM(pretrained=b.model, tokenizer=b.tokenizer, batch_size=7)
    theirs = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    ours = loglikelihoods(b.model, build_requests(qs, b.tokenizer, format=format), max_len=4096, batch_size=7)
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in theirs], rel=1e-5, abs=1e-5)
    assert [g for _, g in ours] == [g for _, g in theirs]


@pytest.mark.parametrize("format", ["plain", "chat"])
def test_same_accuracy_as_lm_eval(chat_model, many_questions, store, format):
    b = get_backend(chat_model, device="cpu")
    ours = evaluate_domain(b, task=many_questions, format=format, store=store, batch_size=8)
    theirs = run_lm_eval(b, task=many_questions, format=format, batch_size=8)
    assert theirs["n"] == ours["n"] == 40
    assert (ours["acc"], ours["acc_norm"]) == (theirs["acc"], theirs["acc_norm"])
