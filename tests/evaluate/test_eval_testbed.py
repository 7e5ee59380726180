"""One end-to-end run on the micro testbed: the real chat template, real refusals, real MC files."""

from __future__ import annotations

import pytest

from safemerge.evaluate import audit, evaluate_domain, get_backend, similarity
from safemerge.evaluate.domain import build_requests, score
from safemerge.data import load_multiple_choice


def test_testbed_audit_safety_domain_and_similarity(micro_testbed, store):
    tb = micro_testbed
    r = audit([tb / "base", tb / "aligned"], safety_prompts=tb / "data" / "safety_test.jsonl", limit=20,
              domain_tasks=[tb / "data" / "domain-medicine_test.jsonl"], threshold=0.3, device="cpu",
              store=store, max_new_tokens=24)
    base, aligned = r["models"]
    assert aligned["safe_rate"] > base["safe_rate"]  # the aligned model refuses, the base one does not
    assert base["flagged"] and base["n"] == 20

    task = tb / "data" / "domain-medicine_test.jsonl"
    b = get_backend(tb / "aligned", device="cpu")
    d = evaluate_domain(b, task=task, store=store, cache=False)
    qs = load_multiple_choice(task).questions
    ref = score(qs, [_naive_ll(b.model, c, x) for c, x in build_requests(qs, b.tokenizer, format="plain")])
    assert (d["acc"], d["acc_norm"]) == (ref["acc"], ref["acc_norm"])
    assert aligned["domain"]["domain-medicine_test"]["acc"] == d["acc"]

    s = similarity([tb / "aligned", tb / "expert-medicine"], base=tb / "base")
    assert s["pairs"][0]["l2"] > 0 and -1 <= s["pairs"][0]["cosine"] <= 1


def _naive_ll(model, ctx, cont):
    import torch

    logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), -1)
    return sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))


@pytest.mark.parametrize("format", ["plain", "chat"])
def test_testbed_accuracy_equals_lm_eval(micro_testbed, store, format):
    pytest.importorskip("lm_eval")
    from safemerge.evaluate import run_lm_eval

    for model in ("aligned", "expert-medicine"):
        b = get_backend(micro_testbed / model, device="cpu")
        for task in ("domain-medicine_test", "domain-finance_test"):
            path = micro_testbed / "data" / f"{task}.jsonl"
            ours = evaluate_domain(b, task=path, format=format, store=store)
            theirs = run_lm_eval(b, task=path, format=format)
            assert (ours["acc"], ours["acc_norm"]) == (theirs["acc"], theirs["acc_norm"]), (model, task)
