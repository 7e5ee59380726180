"""Models and data that would give a plausible-looking but wrong number are refused or warned about,
and the results store never serves a result for a model that changed."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
from safetensors.torch import load_file, save_file

from eval_tiny import QUESTIONS
from safemerge.data import load_multiple_choice, load_prompts
from safemerge.data.loaders import DataError
from safemerge.errors import CheckpointError, SafemergeError
from safemerge.evaluate import EvaluationWarning, audit, evaluate_domain, evaluate_safety, similarity


def _copy(src, dst):
    return shutil.copytree(src, dst)


def test_a_model_with_nan_weights_is_an_error_not_a_score(chat_model, mc_file, prompts_file, store, tmp_path):
    bad = _copy(chat_model, tmp_path / "nan")
    sd = load_file(bad / "model.safetensors")
    name = next(n for n in sd if "mlp" in n)
    sd[name][0, 0] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{name}.*NaN or Inf"):
        evaluate_domain(bad, task=mc_file, device="cpu", store=store)
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        evaluate_safety(bad, prompts=prompts_file, max_new_tokens=4, device="cpu", store=store)
    with pytest.raises(CheckpointError, match=rf"{name}.*NaN or Inf"):
        similarity([chat_model, bad])


def test_editing_the_config_in_place_is_a_new_result(chat_model, mc_file, store, tmp_path):
    m = _copy(chat_model, tmp_path / "m")
    first = evaluate_domain(m, task=mc_file, device="cpu", store=store)
    assert evaluate_domain(m, task=mc_file, device="cpu", store=store)["cached"]
    cfg = json.loads((m / "config.json").read_text())
    cfg["rope_theta"] = 10.0
    (m / "config.json").write_text(json.dumps(cfg))
    again = evaluate_domain(m, task=mc_file, device="cpu", store=store)
    assert not again["cached"] and again["model_fingerprint"] == first["model_fingerprint"]


def test_a_stored_result_repeats_its_warnings(plain_model, mc_file, store):
    with pytest.warns(EvaluationWarning, match="no chat template"):
        evaluate_domain(plain_model, task=mc_file, format="chat", device="cpu", store=store)
    with pytest.warns(EvaluationWarning, match="no chat template"):
        r = evaluate_domain(plain_model, task=mc_file, format="chat", device="cpu", store=store)
    assert r["cached"]


def test_an_empty_chat_template_file_is_no_template(chat_model, mc_file, store, tmp_path):
    m = _copy(chat_model, tmp_path / "m")
    (m / "chat_template.jinja").write_text("")
    cfg = json.loads((m / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (m / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.warns(EvaluationWarning, match="no chat template"):
        r = evaluate_domain(m, task=mc_file, format="chat", device="cpu", store=store)
    assert r["format"] == "plain"


def test_generation_warns_without_eos_and_past_the_context(refuser, prompts_file, store, tmp_path):
    import logging

    m = _copy(refuser, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg["max_position_embeddings"] = 16
    (m / "config.json").write_text(json.dumps(cfg))
    logged: list[str] = []
    catch = logging.Handler()
    catch.emit = lambda record: logged.append(record.getMessage())
    reminders = logging.getLogger("transformers.generation.stopping_criteria")
    reminders.addHandler(catch)  # sees what the logger's filters let through
    try:
        with pytest.warns(EvaluationWarning, match="ran past the model.s context of 16 tokens"):
            first = evaluate_safety(m, prompts=prompts_file, max_new_tokens=12, device="cpu", store=store, limit=2)
    finally:
        reminders.removeHandler(catch)
    assert not any("friendly reminder" in line for line in logged)  # transformers' own line, about the padded batch
    with pytest.warns(EvaluationWarning, match="ran past the model.s context of 16 tokens"):  # the stored result says it too
        again = evaluate_safety(m, prompts=prompts_file, max_new_tokens=12, device="cpu", store=store, limit=2)
    assert again["cached"] and any("context of 16 tokens" in w for w in first["warnings"])
    cfg["max_position_embeddings"] = 96  # room for these prompts and their short refusals, not for 256 new tokens
    (m / "config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        roomy = evaluate_safety(m, prompts=prompts_file, max_new_tokens=256, device="cpu", store=store, limit=2)
    assert not any("context" in str(w.message) for w in seen) and roomy["safe_rate"] is not None  # no answer ran past
    tok = json.loads((m / "tokenizer_config.json").read_text())
    tok["eos_token"] = None
    (m / "tokenizer_config.json").write_text(json.dumps(tok))
    for f in ("generation_config.json", "special_tokens_map.json"):
        (m / f).unlink(missing_ok=True)
    cfg.pop("eos_token_id", None)
    cfg["max_position_embeddings"] = 4096
    (m / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(EvaluationWarning, match="names an end-of-sequence token"):
        evaluate_safety(m, prompts=prompts_file, max_new_tokens=4, device="cpu", store=store, limit=2)


def test_data_that_would_score_nothing_or_the_wrong_thing_is_refused(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text('{"prompt": "  "}\n{"prompt": ""}\n')
    with pytest.raises(DataError, match="no prompt left"):
        load_prompts(f)
    f = tmp_path / "bool.jsonl"
    f.write_text(json.dumps({"question": "q?", "choices": ["a", "b"], "answer": True}) + "\n")
    with pytest.raises(DataError, match="'answer' is True, not an index"):
        load_multiple_choice(f)


def test_audit_refuses_two_tasks_of_one_name(chat_model, mc_file, prompts_file, store, tmp_path):
    other = tmp_path / "x" / mc_file.name
    other.parent.mkdir()
    other.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS[:2]))
    with pytest.raises(SafemergeError, match="two domain tasks have the column name"):
        audit([chat_model], safety_prompts=prompts_file, domain_tasks=[mc_file, other], store=store, device="cpu")
    # named apart with DOMAIN=FILE, each column holds its own file's accuracy
    r = audit([chat_model], safety_prompts=prompts_file, domain_tasks=[f"full={mc_file}", f"two={other}"], store=store,
              device="cpu", max_new_tokens=4)
    assert r["tasks"] == ["full", "two"]
    for column, task in (("full", mc_file), ("two", other)):
        alone = evaluate_domain(chat_model, task=task, store=store, device="cpu")
        assert r["models"][0]["domain"][column]["n"] == alone["n"]
        assert r["models"][0]["domain"][column]["acc"] == alone["acc"]


def test_similarity_compares_a_tied_lm_head_in_either_order(chat_model, tmp_path):
    tied = _copy(chat_model, tmp_path / "tied")
    sd = load_file(tied / "model.safetensors")
    if "lm_head.weight" not in sd:
        pytest.skip("the fixture model is tied already")
    del sd["lm_head.weight"]
    save_file(sd, tied / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((tied / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(cfg))
    ab = similarity([chat_model, tied])["pairs"][0]
    ba = similarity([tied, chat_model])["pairs"][0]
    assert ab["l2"] > 0 and ab["l2"] == pytest.approx(ba["l2"])
    assert ab["per_layer"]["lm_head"]["l2"] == pytest.approx(ba["per_layer"]["lm_head"]["l2"])


def test_bad_batch_sizes_files_and_outputs_are_clear_errors(chat_model, mc_file, prompts_file, store, tmp_path):
    for size in (0, -2):
        with pytest.raises(SafemergeError, match=f"--batch-size {size}: must be a whole number of at least 1"):
            evaluate_safety(chat_model, prompts=prompts_file, batch_size=size, store=store)
        with pytest.raises(SafemergeError, match=f"--batch-size {size}: must be a whole number of at least 1"):
            evaluate_domain(chat_model, task=mc_file, batch_size=size, store=store)
    for not_a_folder in (mc_file, chat_model / "model.safetensors"):
        with pytest.raises(CheckpointError, match="is a file; evaluation needs a model folder"):
            evaluate_domain(not_a_folder, task=mc_file, store=store)
    before = prompts_file.read_text()
    with pytest.raises(SafemergeError, match="is the prompts file itself"):
        evaluate_safety(chat_model, prompts=prompts_file, out=prompts_file, overwrite=True, max_new_tokens=2, store=store)
    assert prompts_file.read_text() == before


def test_generation_runs_in_inference_mode(refuser):
    """generate_ids is decorated with torch.inference_mode(): no autograd state while answers are generated."""
    import torch

    from safemerge.evaluate.backends import eos_ids, generate_ids
    from safemerge.evaluate.loading import load_model

    model, tok = load_model(refuser, device="cpu")
    seen = []
    generate_ids(model, [tok("Why?")["input_ids"]], max_new_tokens=2, pad=0, eos=eos_ids(model, tok),
                 score_fn=lambda logits, tokens: seen.append(torch.is_inference_mode_enabled()))
    assert seen == [True]


def test_a_model_that_needs_its_own_code_is_refused_on_one_line(chat_model, mc_file, store, tmp_path):
    """QA: transformers' several-line text offered trust_remote_code=True, which safemerge does not take."""
    custom = tmp_path / "custom"
    shutil.copytree(chat_model, custom)
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="my-own", auto_map={"AutoConfig": "my.MyConfig", "AutoModelForCausalLM": "my.MyModel"})
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="custom: the model needs Python code of its own to load") as e:
        evaluate_domain(custom, task=mc_file, store=store)
    assert "\n" not in str(e.value) and "trust_remote_code" not in str(e.value)
