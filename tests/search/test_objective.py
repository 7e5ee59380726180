"""The objective: CE on answer tokens only, chat template applied, λ mixing, and the data file checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from safemerge.data.loaders import DataError
from safemerge.errors import ConfigError
from safemerge.search.objective import Objective, Pair, answer_ce, encode_pair, load_pairs, make_batches


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_family["expert"]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


PAIRS = [Pair("the capital of", "drug for help"), Pair("a drug", "sorry I can't help with that ."),
         Pair("help with that the capital of a drug is", "is")]


def test_answer_tokens_follow_the_chat_template(model_and_tokenizer):
    from safemerge.evaluate.backends import encode

    _, tok = model_and_tokenizer
    ids, n_prompt = encode_pair(tok, PAIRS[0])
    rendered = tok.apply_chat_template([{"role": "user", "content": "the capital of"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered.startswith("<|user|> the capital of") and rendered.endswith("<|assistant|>")
    assert ids[:n_prompt] == encode(tok, rendered)  # the prompt exactly as generation sees it
    # the answer is what the template appends for the assistant turn: the response and its end marker
    assert tok.decode(ids[n_prompt:]).split() == ["drug", "for", "help", "<|end|>"]


def test_ce_is_the_mean_over_answer_tokens_only(model_and_tokenizer):
    model, tok = model_and_tokenizer
    batches = make_batches(tok, PAIRS, batch_size=2)  # padded batches of unequal lengths
    total, count = 0.0, 0
    for pair in PAIRS:  # reference: one example at a time, no padding, explicit log-softmax
        ids, n_prompt = encode_pair(tok, pair)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        for pos in range(n_prompt, len(ids)):
            total -= float(logp[pos - 1, ids[pos]])
            count += 1
    assert batches.n_tokens == count
    assert answer_ce(model, batches) == pytest.approx(total / count, rel=1e-5)



@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "peft"])
def test_prompt_positions_are_not_projected_onto_the_vocabulary(model_and_tokenizer, wrapped):
    model, tok = model_and_tokenizer
    if wrapped:  # a PEFT model's forward takes **kwargs and passes logits_to_keep on
        import copy

        from peft import LoraConfig, get_peft_model

        model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"])).eval()
    batches = make_batches(tok, PAIRS, batch_size=3)  # one batch: prompts of 4 to 12 tokens
    (ids, mask, labels), = batches.batches
    first_answer = int((labels != -100).any(0).nonzero()[0])
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, inp, out: seen.append(out.shape[1]))
    try:
        value = answer_ce(model, batches)
    finally:
        hook.remove()
    # from the position that predicts the earliest answer token to the end, not the whole sequence
    assert seen == [ids.shape[1] - first_answer + 1] and seen[0] < ids.shape[1]
    with torch.no_grad():  # transformers' own loss projects every position: the same mean
        assert value == pytest.approx(float(model(ids, attention_mask=mask, labels=labels).loss), rel=1e-5)

def test_lambda_mixes_the_two_means(model_and_tokenizer):
    model, tok = model_and_tokenizer
    safety, domain = PAIRS[:1], PAIRS[1:]
    s = answer_ce(model, make_batches(tok, safety))
    d = answer_ce(model, make_batches(tok, domain))
    score = Objective(tok, safety=safety, domain=domain, lambda_=0.25)(model)
    assert (score.safety, score.domain) == pytest.approx((s, d))
    assert score.objective == pytest.approx(0.25 * s + 0.75 * d)
    only_domain = Objective(tok, safety=None, domain=domain, lambda_=0.0)(model)
    assert math.isnan(only_domain.safety) and only_domain.objective == pytest.approx(d)


@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan")])
def test_lambda_outside_unit_interval_is_an_error(model_and_tokenizer, lam):
    with pytest.raises(ConfigError, match="must be in \\[0, 1\\]"):
        Objective(model_and_tokenizer[1], safety=PAIRS, domain=PAIRS, lambda_=lam)


def test_missing_set_for_a_weighted_term_is_an_error(model_and_tokenizer):
    with pytest.raises(ConfigError, match="--safety-data"):
        Objective(model_and_tokenizer[1], safety=None, domain=PAIRS, lambda_=0.5)


def test_data_file_without_response_names_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "c", "answer": "d"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl: line 2 has no text 'response' field"):
        load_pairs(f)
    f.write_text("not json\n")
    with pytest.raises(DataError, match="line 1 is not JSON"):
        load_pairs(f)
    assert len(load_pairs(_ok(tmp_path), limit=1)) == 1
    # review: a Latin-1 file was scored with replacement characters, a JSON array named 'no prompt field'
    f.write_bytes(b'{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(DataError, match="d.jsonl: line 1 is not UTF-8 text"):
        load_pairs(f)
    f.write_text(json.dumps([{"prompt": "a", "response": "b"}]))
    with pytest.raises(DataError, match="d.jsonl: a JSON array; the search reads JSONL"):
        load_pairs(f)


def test_a_line_separator_inside_a_string_does_not_split_the_row(tmp_path):
    """JSON may hold U+2028, U+2029 and U+0085 unescaped inside a string (`safemerge data` writes them so); rows are
    split at newlines only."""
    f = tmp_path / "d.jsonl"
    rows = [{"prompt": "pick a lock?\u2028Be specific.", "response": "No.\u2029Sorry\x85."}, {"prompt": "b", "response": "c"}]
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    got = load_pairs(f)
    assert [(p.prompt, p.response) for p in got.pairs] == [(r["prompt"], r["response"]) for r in rows]


def test_a_byte_order_mark_is_skipped(tmp_path):
    """Review: the audit's prompt reader skipped a UTF-8 BOM, the objective's said 'line 1 is not JSON'."""
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + _ok(tmp_path).read_bytes())
    assert [p.prompt for p in load_pairs(f).pairs] == ["p0", "p1", "p2"]


def _ok(tmp_path):
    f = tmp_path / "ok.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n" for i in range(3)))
    return f


def test_a_max_length_that_leaves_no_answer_token_is_an_error(model_and_tokenizer):
    _, tok = model_and_tokenizer
    with pytest.raises(ConfigError, match="max_length 1 leaves an example no answer token"):
        make_batches(tok, PAIRS, max_length=1)
    with pytest.warns(UserWarning, match=rf"{len(PAIRS)} of {len(PAIRS)} examples have answers longer than max_length 2"):
        batches = make_batches(tok, PAIRS, max_length=2)  # one prompt token and one answer token each (review: silent)
    assert batches.n_tokens == len(PAIRS)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_batches(tok, PAIRS, max_length=512)  # nothing cut: nothing said


def test_an_empty_prompt_without_template_gets_the_prefix_token(model_and_tokenizer):
    """Nothing predicted the first answer token of an empty prompt (no template, no BOS added), yet it counted in the
    mean; lm-eval puts the prefix token (BOS, else EOS) before an empty context, and so does the objective now."""
    from safemerge.evaluate.backends import prefix_token_id

    _, tok = model_and_tokenizer
    assert tok("", add_special_tokens=True)["input_ids"] == []  # this tokenizer adds no BOS by itself
    ids, n_prompt = encode_pair(tok, Pair("", "good day"), chat_template=False)
    assert n_prompt == 1 and ids[0] == prefix_token_id(tok) and ids[1:] == tok.encode("good day</s>", add_special_tokens=False)
