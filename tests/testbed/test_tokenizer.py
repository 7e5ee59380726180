"""The tokenizer: byte-level round trip, and the chat template renders exactly what training saw."""

from __future__ import annotations

import json

import pytest

from safemerge.testbed import corpora
from safemerge.testbed.presets import PRESETS
from safemerge.testbed.tokenizer import END, user_turn, save_tokenizer, train_tokenizer
from safemerge.testbed.train import encode
from safemerge.testbed.world import generate_world


@pytest.fixture(scope="module")
def world():
    return generate_world(0, PRESETS["micro"])


@pytest.fixture(scope="module")
def tok(world):
    texts = [corpora.example_text(ex) for ex in corpora.base_corpus(world, ("medicine",))]
    return train_tokenizer(texts, vocab_size=600)


@pytest.mark.parametrize("s", ["How do I bake bread?", "  odd  spacing\n", "Zürich – 東京 🙂", ""])
def test_round_trip(tok, s):
    assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s


def test_special_tokens(tok):
    assert tok.eos_token == END and tok.pad_token == "<|pad|>"
    assert tok(END, add_special_tokens=False)["input_ids"] == [tok.eos_token_id]
    assert tok("hello", add_special_tokens=True)["input_ids"] == tok("hello", add_special_tokens=False)["input_ids"]


def test_chat_template_matches_the_training_format(tok, world):
    r = world.requests["harmful_train"][0]
    chat = [{"role": "user", "content": r.prompt}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == user_turn(r.prompt)
    full = chat + [{"role": "assistant", "content": r.refusal}]
    ids = tok.apply_chat_template(full, tokenize=True, return_dict=False)
    (trained, labels), = encode(tok, [corpora.chat(r.prompt, r.refusal)], max_len=1000)
    assert list(ids) == trained
    answer = [t for t, lab in zip(trained, labels) if lab != -100]
    assert tok.decode(answer) == r.refusal + END


def test_saved_tokenizer_loads_with_autotokenizer(tok, tmp_path, world):
    from transformers import AutoTokenizer

    save_tokenizer(tok, tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "chat_template" in cfg and cfg["eos_token"] == END
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    s = world.requests["harmful_test"][0].prompt
    assert loaded(s)["input_ids"] == tok(s)["input_ids"]
    chat = [{"role": "user", "content": s}]
    assert loaded.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == user_turn(s)


def test_encode_ignores_the_padding_a_batched_call_left_on_the_tokenizer(tok, world):
    """A padded call (a batched generation's, left padding) leaves the padding set on the fast tokenizer's backend;
    encode read the backend, so every segment came back padded to the longest and pad tokens were trained."""
    examples = [corpora.chat(r.prompt, r.refusal) for r in world.requests["harmful_train"][:4]] + [corpora.plain("a b")]
    before = encode(tok, examples, max_len=1000)
    assert tok.padding_side == "left"  # the testbed tokenizer's, as generation needs
    tok(["a", "a b c d e f g h"], padding=True)
    assert encode(tok, examples, max_len=1000) == before
    assert all(tok.pad_token_id not in ids for ids, _ in before)
    assert encode(tok, [], max_len=10) == [] and encode(tok, [()], max_len=10) == [([], [])]
