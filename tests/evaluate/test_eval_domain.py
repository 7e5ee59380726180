"""Domain accuracy: lm-eval's tokenization split, batched log-likelihoods, acc / acc_norm, the store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from safemerge.data import MCQuestion, load_multiple_choice
from safemerge.errors import SafemergeError
from safemerge.evaluate import evaluate_domain, get_backend
from safemerge.evaluate.backends import EvaluationWarning, encode, render_prompt
from safemerge.evaluate.domain import build_requests, score
from safemerge.evaluate.loglik import encode_pair, loglikelihoods


def _reference_ll(model, ctx: list[int], cont: list[int], max_len: int = 10**9) -> float:
    """One sequence at a time, full logits, float64 log-softmax: Σ log P(cont_k | everything before)."""
    seq = (ctx + cont)[-(max_len + 1):]
    logits = model(torch.tensor([seq[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    n = len(cont)
    return sum(logp[len(seq) - 1 - n + k, cont[k]].item() for k in range(n))


def test_encode_pair_moves_trailing_space_and_splits_the_whole(chat_model):
    tok = get_backend(chat_model, device="cpu").tokenizer
    ctx, cont = encode_pair(tok, "Mix flour and sugar, then ", "bake it")
    assert (ctx, cont) == encode_pair(tok, "Mix flour and sugar, then", " bake it")
    whole = encode(tok, "Mix flour and sugar, then bake it")
    assert ctx + cont == whole and ctx == encode(tok, "Mix flour and sugar, then")
    assert ctx[0] == tok.bos_token_id
    ctx, cont = encode_pair(tok, "", "bake it")  # empty context: the prefix (BOS) token alone
    assert ctx == [tok.bos_token_id] and cont == tok.encode("bake it", add_special_tokens=False)


def test_batched_loglikelihoods_match_one_at_a_time(chat_model):
    b = get_backend(chat_model, device="cpu")
    reqs = [encode_pair(b.tokenizer, c, x) for c, x in [
        ("The patient has a fever.", " flu"), ("A bond", " pays a fixed coupon when rates rise"),
        ("How", " long"), ("Mix flour and sugar, then bake it for", " forty minutes."), ("Q", " A"),
    ]]
    got = loglikelihoods(b.model, reqs, max_len=4096, batch_size=3)
    want = [_reference_ll(b.model, c, x) for c, x in reqs]
    assert [g for g, _ in got] == pytest.approx(want, rel=1e-5, abs=1e-5)
    short = max(len(x) for _, x in reqs) + 1  # lm-eval's left truncation of the context
    assert any(len(c) + len(x) > short + 1 for c, x in reqs)
    truncated = loglikelihoods(b.model, reqs, max_len=short, batch_size=2)
    assert [g for g, _ in truncated] == pytest.approx([_reference_ll(b.model, c, x, short) for c, x in reqs], rel=1e-5, abs=1e-5)


def test_acc_and_acc_norm_closed_form():
    qs = [
        MCQuestion("q1", ("a", "bbbb"), 1),  # acc: -2 > -4 picks 0 (wrong); acc_norm: -2/1 < -4/4 picks 1 (right)
        MCQuestion("q2", ("x", "y", "z"), 0),  # a tie picks the first: right for both
        MCQuestion("q3", ("yes", "no"), 1),  # wrong for both
    ]
    lls = [-2.0, -4.0, -1.0, -1.0, -3.0, -0.5, -0.7]
    r = score(qs, lls)
    assert r["acc"] == pytest.approx(1 / 3) and r["acc_norm"] == pytest.approx(2 / 3)
    assert r["acc_stderr"] == pytest.approx((1 / 3) ** 0.5 / 3 ** 0.5)  # sample sd of (0,1,0) is 1/√3


def test_evaluate_domain_plain_is_the_reference_and_is_stored(chat_model, mc_file, store):
    r = evaluate_domain(chat_model, task=mc_file, device="cpu", batch_size=5, store=store)
    b = get_backend(chat_model, device="cpu")
    qs = load_multiple_choice(mc_file)
    want = score(qs.questions, [_reference_ll(b.model, c, x) for c, x in build_requests(qs.questions, b.tokenizer, format="plain")])
    assert (r["acc"], r["acc_norm"], r["n"], r["format"], r["cached"]) == (want["acc"], want["acc_norm"], 8, "plain", False)
    again = evaluate_domain(chat_model, task=mc_file, device="cpu", store=store)
    assert again["cached"] and again["acc"] == r["acc"]
    assert not evaluate_domain(chat_model, task=mc_file, device="cpu", store=store, cache=False)["cached"]


def test_chat_format_scores_under_the_template(chat_model, mc_file, store):
    b = get_backend(chat_model, device="cpu")
    q = load_multiple_choice(mc_file).questions[0]
    ctx, cont = build_requests([q], b.tokenizer, format="chat")[0]
    text = render_prompt(b.tokenizer, q.question)  # ends with "\n\n", which moves to the continuation
    assert b.tokenizer.decode(ctx) == text.rstrip() and b.tokenizer.decode(cont) == "\n\n" + q.choices[0]
    r = evaluate_domain(chat_model, task=mc_file, format="chat", device="cpu", store=store)
    assert r["format"] == "chat" and r["warnings"] == []


def test_chat_format_without_template_falls_back_and_says_so(plain_model, mc_file, store):
    with pytest.warns(EvaluationWarning, match="no chat template; scored with the plain format"):
        r = evaluate_domain(plain_model, task=mc_file, format="chat", device="cpu", store=store)
    assert r["format"] == "plain" and r["warnings"]


def test_the_fallback_note_belongs_to_the_call_not_to_the_stored_figures(plain_model, mc_file, store):
    """A chat request on a model without a template is scored (and stored) as plain: a later plain request served
    from that entry neither says nor records the chat request's fallback."""
    import warnings

    with pytest.warns(EvaluationWarning, match="no chat template"):
        first = evaluate_domain(plain_model, task=mc_file, format="chat", device="cpu", store=store, cache=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvaluationWarning)
        plain = evaluate_domain(plain_model, task=mc_file, format="plain", device="cpu", store=store)
    assert plain["cached"] and plain["warnings"] == [] and plain["acc"] == first["acc"]
    with pytest.warns(EvaluationWarning, match="no chat template"):
        again = evaluate_domain(plain_model, task=mc_file, format="chat", device="cpu", store=store)
    assert again["cached"] and again["warnings"] == first["warnings"] and len(first["warnings"]) == 1


def test_a_choice_that_adds_no_token_names_its_question(tmp_path, store):
    """A tokenizer may merge a choice into the end of the chat prompt (here the tiny word-level one reads
    '<|assistant|>a' as one word): the error names the file, question and choice, not an internal request number."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tiny import make_family

    fam = make_family(tmp_path / "fam", names=("m",))
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"question": "Pick one", "choices": ["a", "b"], "answer": 0}) + "\n")
    with pytest.raises(SafemergeError, match=r"t.jsonl: question 1 \('Pick one'\), choice 'a': the choice adds no token "
                                             r"to the chat prompt"):
        evaluate_domain(fam["m"], task=task, format="chat", device="cpu", store=store)


def test_a_loaded_backend_shares_the_stored_result(chat_model, mc_file, store):
    first = evaluate_domain(chat_model, task=mc_file, format="chat", device="cpu", store=store)
    again = evaluate_domain(get_backend(chat_model, device="cpu"), task=mc_file, format="chat", store=store)
    assert not first["cached"] and again["cached"]  # same weights, dtype and chat template: same key


def test_shipped_lm_eval_task_is_the_plain_format(mc_file):
    import yaml

    from safemerge.evaluate.lm_eval_bridge import TASK_YAML, task_yaml

    cfg = yaml.safe_load(TASK_YAML.read_text())
    assert cfg["output_type"] == "multiple_choice" and cfg["target_delimiter"] == " "
    assert (cfg["doc_to_text"], cfg["doc_to_choice"], cfg["doc_to_target"]) == ("{{question}}", "{{choices}}", "{{answer}}")
    assert [m["metric"] for m in cfg["metric_list"]] == ["acc", "acc_norm"]
    filled = yaml.safe_load(task_yaml(mc_file, name="t"))
    assert filled["task"] == "t" and filled["dataset_kwargs"]["data_files"]["test"] == str(mc_file.resolve())


def test_last_logits_with_models_that_do_not_take_logits_to_keep():
    """A forward without `logits_to_keep` gets none; one taking **kwargs that passes it to a forward without it is
    tried once more without; any other TypeError is the model's own and is raised."""
    from types import SimpleNamespace

    import torch

    from safemerge.evaluate.loglik import last_logits

    full = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)

    class Plain(torch.nn.Module):
        def forward(self, ids, attention_mask=None):
            return SimpleNamespace(logits=full)

    class PassesOn(torch.nn.Module):
        def forward(self, ids, **kwargs):
            return Plain().forward(ids, **kwargs)

    class Broken(torch.nn.Module):
        def forward(self, ids, **kwargs):
            raise TypeError("unsupported operand type(s)")

    ids = torch.zeros(2, 6, dtype=torch.long)
    for model in (Plain(), PassesOn()):
        assert torch.equal(last_logits(model, ids, 2), full[:, -2:])
    with pytest.raises(TypeError, match="unsupported operand"):
        last_logits(Broken(), ids, 2)
