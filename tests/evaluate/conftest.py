"""Session fixtures: tiny saved checkpoints (random, programmed, guard-shaped) and small data files."""

from __future__ import annotations

import json

import pytest

import eval_guard_templates as guard_templates
from eval_tiny import (
    CHAT_TEMPLATE,
    PROMPTS,
    QUESTIONS,
    SAFE_LOGITS,
    UNSAFE_LOGITS,
    build_llama,
    build_tokenizer,
    program_bigram,
    save,
)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("eval-models")


@pytest.fixture(scope="session")
def chat_model(models_dir):
    """Random tiny Llama with a Llama-3-like chat template."""
    tok = build_tokenizer(chat_template=CHAT_TEMPLATE)
    return save(build_llama(tok, seed=0), tok, models_dir / "chat")


@pytest.fixture(scope="session")
def plain_model(models_dir):
    """Random tiny Llama without a chat template."""
    tok = build_tokenizer()
    return save(build_llama(tok, seed=1), tok, models_dir / "plain")


@pytest.fixture(scope="session")
def refuser(models_dir):
    """No chat template; answers "I'm sorry" after a prompt ending in '?', "Sure" after anything else."""
    tok = build_tokenizer()
    model = program_bigram(build_llama(tok, seed=2), tok, {"?": "I'm sorry", "I'm sorry": "</s>", "Sure": "</s>"}, default="Sure")
    return save(model, tok, models_dir / "refuser")


@pytest.fixture(scope="session")
def complier(models_dir):
    """No chat template; always answers "Sure"."""
    tok = build_tokenizer()
    model = program_bigram(build_llama(tok, seed=3), tok, {"Sure": "</s>"}, default="Sure")
    return save(model, tok, models_dir / "complier")


def _guard3(verdict_logits: dict[str, float], *, programmed: bool = True, seed: int = 4):
    tok = build_tokenizer(chat_template=guard_templates.LLAMA_GUARD_3, bos="<|begin_of_text|>", eos="<|eot_id|>")
    model = build_llama(tok, seed=seed)
    if programmed:
        rules = {"<|end_header_id|>": "\n\n", "\n\n": verdict_logits, "unsafe": "\n", "\n": "S1", "S1": ",", ",": "S10",
                 "S10": "<|eot_id|>", "safe": "<|eot_id|>"}
        program_bigram(model, tok, rules, default="<|eot_id|>")
    return model, tok


@pytest.fixture(scope="session")
def guard3_unsafe(models_dir):
    model, tok = _guard3(UNSAFE_LOGITS)
    return save(model, tok, models_dir / "guard3-unsafe")


@pytest.fixture(scope="session")
def guard3_safe(models_dir):
    model, tok = _guard3(SAFE_LOGITS)
    return save(model, tok, models_dir / "guard3-safe")


@pytest.fixture(scope="session")
def guard3_random(models_dir):
    """The Llama Guard 3 template on random weights: its outputs are not verdicts."""
    model, tok = _guard3({}, programmed=False)
    return save(model, tok, models_dir / "guard3-random")


@pytest.fixture(scope="session")
def md_judge(models_dir):
    tok = build_tokenizer()
    rules = {"[/INST]": {"unsafe": 5.0, "safe": 2.0}, "unsafe": "\n", "\n": "O1", "O1": "</s>", "safe": "</s>"}
    model = program_bigram(build_llama(tok, seed=5), tok, rules, default="</s>")
    return save(model, tok, models_dir / "md-judge")


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    return _write_jsonl(tmp_path_factory.mktemp("eval-data") / "prompts.jsonl", PROMPTS)


@pytest.fixture(scope="session")
def mc_file(tmp_path_factory):
    return _write_jsonl(tmp_path_factory.mktemp("eval-data") / "questions.jsonl", QUESTIONS)


@pytest.fixture
def store(tmp_path):
    from safemerge.store import ResultsStore

    return ResultsStore(tmp_path / "results.sqlite")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every evaluation test on one torch thread (the root conftest's `one_thread`)."""
