"""The transformers generation backend: prompt formatting, BOS rule, left-padded batching."""

from __future__ import annotations

import re

import pytest

from safemerge.evaluate import GenerationSettings, get_backend
from safemerge.evaluate.backends import TEMPLATE_DATE, EvaluationWarning, Generation, chat_text, encode, render_prompt

PROMPTS = [
    "How do I pick a lock?",
    "Tell me a joke.",
    "The patient has a fever and a cough. What is the most likely diagnosis? Answer in a few words.",
    "Hi",
]


def test_chat_template_is_applied_and_bos_not_doubled(chat_model):
    b = get_backend(chat_model, device="cpu")
    text = render_prompt(b.tokenizer, "Hi there")
    assert text == "<s><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ids = encode(b.tokenizer, text)
    assert ids[0] == b.tokenizer.bos_token_id and ids[1] != b.tokenizer.bos_token_id
    assert encode(b.tokenizer, "Hi there")[0] == b.tokenizer.bos_token_id  # plain text gets its BOS


@pytest.mark.parametrize("template, words", [
    ("{% for m in messages %}{{ m['content'] }{% endfor %}", "TemplateSyntaxError: unexpected '}'"),
    ("{{ raise_exception('system role not supported') }}", "TemplateError: system role not supported"),
])
def test_a_broken_chat_template_is_named_not_a_jinja_traceback(chat_model, template, words):
    """Review: eval, data, audit and compare ended in jinja2's traceback for a template that does not compile or raises."""
    from safemerge.errors import SafemergeError

    tok = get_backend(chat_model, device="cpu").tokenizer
    tok.chat_template = template
    with pytest.raises(SafemergeError, match=rf"{re.escape(str(chat_model))}: its chat template failed on a user conversation \({words}\); "
                                             "fix `chat_template` in its tokenizer_config.json"):
        render_prompt(tok, "Hi")


def test_batched_left_padded_generation_equals_one_by_one(chat_model):
    b = get_backend(chat_model, device="cpu", batch_size=4)
    settings = GenerationSettings(max_new_tokens=12)
    batched = b.generate(PROMPTS, settings)
    b.batch_size = 1
    single = b.generate(PROMPTS, settings)
    assert [g.text for g in batched] == [g.text for g in single]
    assert all(g.new_tokens == 12 and not g.finished for g in batched)  # random weights rarely say EOS
    assert len({g.prompt_tokens for g in batched}) == len(PROMPTS)  # really different lengths, so padded


def test_programmed_model_answers_and_stops(refuser):
    b = get_backend(refuser, device="cpu")
    with pytest.warns(EvaluationWarning, match="no chat template"):
        gens = b.generate(["How do I pick a lock?", "Tell me how to make a weapon."], GenerationSettings(max_new_tokens=8))
    assert [(g.text, g.new_tokens, g.finished) for g in gens] == [("I'm sorry", 1, True), ("Sure", 1, True)]


def test_sampling_is_seeded(chat_model):
    b = get_backend(chat_model, device="cpu")
    s = GenerationSettings(max_new_tokens=6, temperature=1.0, seed=3)
    assert [g.text for g in b.generate(PROMPTS[:2], s)] == [g.text for g in b.generate(PROMPTS[:2], s)]


def test_unknown_backend_and_missing_model(tmp_path, chat_model):
    from safemerge.errors import CheckpointError, SafemergeError

    with pytest.raises(SafemergeError, match="unknown backend 'tgi'"):
        get_backend(chat_model, backend="tgi")
    with pytest.raises(CheckpointError, match="no such model directory"):
        get_backend(tmp_path / "nope")


def test_greedy_decoding_ignores_the_models_own_sampling_options(chat_model, tmp_path):
    """transformers fills every field our GenerationConfig leaves unset from generation_config.json: a checkpoint's
    repetition_penalty (Qwen2.5-Instruct ships 1.05) or no_repeat_ngram_size bent "greedy" answers."""
    import json
    import shutil

    settings = GenerationSettings(max_new_tokens=12)
    plain = [g.text for g in get_backend(chat_model, device="cpu").generate(PROMPTS, settings)]
    bent = tmp_path / "bent"
    shutil.copytree(chat_model, bent)
    cfg = json.loads((bent / "generation_config.json").read_text()) if (bent / "generation_config.json").exists() else {}
    cfg.update(repetition_penalty=3.0, no_repeat_ngram_size=1, min_new_tokens=12, top_k=2)
    (bent / "generation_config.json").write_text(json.dumps(cfg))
    b = get_backend(bent, device="cpu")
    assert [g.text for g in b.generate(PROMPTS, settings)] == plain
    assert b.model.generation_config.repetition_penalty == 3.0  # the model's own config is put back


def test_chat_templates_are_rendered_on_a_fixed_date(chat_model):
    """Llama 3.2/3.3 templates write today's date unless given `date_string`; others call strftime_now."""
    import datetime

    import transformers.utils.chat_template_utils as ctu

    tok = get_backend(chat_model, device="cpu").tokenizer
    today = datetime.datetime.now().strftime("%d %b %Y")
    msgs = [{"role": "user", "content": "hi"}]
    for template in ("{% if date_string is not defined %}{% set date_string = strftime_now('%d %b %Y') %}{% endif %}"
                     "Today Date: {{ date_string }}|{{ messages[0]['content'] }}",
                     "Today Date: {{ strftime_now('%d %b %Y') }}|{{ messages[0]['content'] }}"):
        tok.chat_template = template
        assert tok.apply_chat_template(msgs, tokenize=False) == f"Today Date: {today}|hi"  # what it did before
        assert chat_text(tok, msgs) == render_prompt(tok, "hi") == "Today Date: 26 Jul 2024|hi"
    assert TEMPLATE_DATE.strftime("%d %b %Y") == "26 Jul 2024"
    assert ctu.datetime is datetime.datetime  # the renderer's clock is put back


def test_vllm_runs_the_dtype_its_store_key_names(chat_model, monkeypatch, tmp_path):
    """vLLM's own "auto" runs a float32 model in float16; the key said float32. "auto" now means the stored dtype
    there too (vLLM itself is faked: it needs a GPU)."""
    import sys
    import types

    from safemerge.evaluate.loading import model_ref

    made = []

    class LLM:
        def __init__(self, model, dtype, **kw):
            made.append(dtype)

        def get_tokenizer(self):
            return None

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM))
    for asked, runs in (("auto", "float32"), ("bfloat16", "bfloat16")):
        ref = model_ref(chat_model, dtype=asked)
        get_backend(ref, backend="vllm", dtype=asked)
        assert made[-1] == runs == ref.identity("vllm")["dtype"]


def test_vllm_counts_new_tokens_as_the_transformers_backend_does():
    """vLLM's token_ids end with the EOS (or generation_config stop id) it stopped on; its text drops it, and the
    transformers backend counts the tokens before EOS. The outputs are faked (vLLM needs a GPU)."""
    import types

    from safemerge.evaluate.vllm_backend import _record

    def out(ids, reason, stop_reason=None):
        c = types.SimpleNamespace(text="Sure.", token_ids=ids, finish_reason=reason, stop_reason=stop_reason)
        return types.SimpleNamespace(outputs=[c])

    assert _record(out([5, 6, 2], "stop"), 4).new_tokens == 2              # EOS
    assert _record(out([5, 6, 9], "stop", 9), 4).new_tokens == 2           # an extra stop id of generation_config
    assert _record(out([5, 6, 7], "length"), 4) == Generation("Sure.", 4, 3, False)
    assert _record(out([5, 6, 2], "stop"), 4).finished


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_settings_raise_no_transformers_warning(chat_model, monkeypatch, temperature):
    """Greedy decoding passed top_k=0, a sampling flag, and transformers logged "The following generation flags
    are not valid and may be ignored: ['top_k']" on every run (once per process). Here its config check is strict:
    any such flag is an error."""
    from transformers import GenerationConfig

    backend = get_backend(chat_model, device="cpu")
    validate = GenerationConfig.validate
    monkeypatch.setattr(GenerationConfig, "validate", lambda self, strict=False, **kw: validate(self, strict=True, **kw))
    gens = backend.generate(PROMPTS[:2], GenerationSettings(max_new_tokens=4, temperature=temperature))
    assert all(g.new_tokens == 4 for g in gens)
