"""A LoRA expert (`model+adapter`) is evaluated, audited and compared as the model with its adapter merged in.

The adapter here is the programmed refuser's change from the complier (same tokenizer and shapes), extracted at
full rank: merged into the complier, it must answer as the refuser does, and nothing of the complier's answers
may leak into its results (store keys, fingerprints)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import safemerge
from safemerge.errors import CheckpointError, SafemergeError
from safemerge.evaluate import audit, evaluate_domain, evaluate_safety, get_backend, model_ref, similarity
from safemerge.evaluate.loading import load_model

pytestmark = pytest.mark.filterwarnings("ignore:.*no chat template:safemerge.evaluate.backends.EvaluationWarning")

@pytest.fixture(scope="module")
def refuser_lora(refuser, complier, tmp_path_factory):
    """(complier, adapter): the refuser's change from the complier as a full-rank LoRA adapter."""
    out = tmp_path_factory.mktemp("lora") / "refuser-lora"
    safemerge.extract_lora(refuser, complier, out, rank=512, progress=False)
    return complier, out


def test_the_reference_loads_as_the_model_it_was_extracted_from(refuser_lora, refuser):
    complier, adapter = refuser_lora
    merged, _ = load_model(complier, adapter=adapter, device="cpu")
    want, _ = load_model(refuser, device="cpu")
    for name, value in want.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], value, rtol=0, atol=1e-5, msg=name)


def test_audit_safety_domain_and_similarity_of_a_lora_expert(refuser_lora, refuser, prompts_file, mc_file, store):
    complier, adapter = refuser_lora
    ref = f"{complier}+{adapter}"
    r = audit([complier, ref, refuser], safety_prompts=prompts_file, domain_tasks=[mc_file], threshold=0.25,
              device="cpu", store=store, max_new_tokens=8)
    low, lora, high = r["models"]
    assert low["safe_rate"] == 0 and lora["safe_rate"] == high["safe_rate"] > 0.25  # answers as the refuser
    assert lora["domain"] == {k: {**v, "cached": False} for k, v in high["domain"].items()}
    assert r["flagged"] == [str(complier)] and lora["model"] == ref and lora["name"] == "refuser-lora"
    assert len({low["fingerprint"], lora["fingerprint"], high["fingerprint"]}) == 3
    # asked again: answered from the store, under the reference's own key
    again = evaluate_safety(ref, prompts=prompts_file, device="cpu", store=store, max_new_tokens=8)
    assert again["cached"] and again["safe_rate"] == lora["safe_rate"] and again["model"] == ref
    s = similarity([ref, refuser], base=complier)
    assert s["models"] == [ref, str(refuser)] and s["pairs"][0]["l2"] < 1e-4
    assert s["task_vectors"][ref]["norm"] == pytest.approx(s["task_vectors"][str(refuser)]["norm"], rel=1e-5)


def test_an_edited_adapter_is_evaluated_again(refuser_lora, prompts_file, store, tmp_path):
    complier, adapter = refuser_lora
    edited = shutil.copytree(adapter, tmp_path / "adapter")
    ref = f"{complier}+{edited}"
    first = evaluate_safety(ref, prompts=prompts_file, device="cpu", store=store, max_new_tokens=8)
    weights = load_file(edited / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
              str(edited / "adapter_model.safetensors"), metadata={"format": "pt"})
    second = evaluate_safety(ref, prompts=prompts_file, device="cpu", store=store, max_new_tokens=8)
    assert not second["cached"] and second["model_fingerprint"] != first["model_fingerprint"]


def test_the_adapters_tokenizer_and_chat_template_are_used_when_it_has_them(refuser_lora, chat_model, tmp_path):
    complier, adapter = refuser_lora
    assert model_ref(f"{complier}+{adapter}").chat_template is None  # no tokenizer beside the adapter: the model's
    with_tok = shutil.copytree(adapter, tmp_path / "adapter")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(chat_model / f, with_tok / f)
    ref = model_ref(f"{complier}+{with_tok}")
    assert ref.chat_template is not None and ref.chat_template == model_ref(chat_model).chat_template
    assert ref.tokenizer.chat_template == ref.chat_template


def test_bad_lora_references_are_named(refuser_lora, prompts_file, mc_file, tmp_path):
    complier, adapter = refuser_lora
    with pytest.raises(CheckpointError, match="missing: no such model directory"):
        evaluate_safety(f"{tmp_path / 'missing'}+{adapter}", prompts=prompts_file, device="cpu", cache=False)
    with pytest.raises(CheckpointError, match=r"no-adapter is not a folder; a LoRA reference is `model_path\+adapter_path`"):
        evaluate_safety(f"{complier}+{tmp_path / 'no-adapter'}", prompts=prompts_file, device="cpu", cache=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: no adapter_config.json"):
        evaluate_domain(f"{complier}+{tmp_path / 'empty'}", task=mc_file, cache=False)
    with pytest.raises(SafemergeError, match="the vllm backend reads model folders"):
        get_backend(model_ref(f"{complier}+{adapter}"), backend="vllm")


def test_names_the_transformers_model_lacks_are_an_error(refuser_lora, tmp_path):
    complier, adapter = refuser_lora
    renamed = shutil.copytree(adapter, tmp_path / "adapter")
    cfg = json.loads((renamed / "adapter_config.json").read_text())
    weights = load_file(renamed / "adapter_model.safetensors")
    key = next(k for k in weights if "modules_to_save" not in k and k.endswith("lora_A.weight"))
    module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    assert cfg["r"] and module  # the fixture's adapter factors linear layers
    # a checkpoint whose names differ from the modules transformers builds (as when transformers renames them)
    model = tmp_path / "model"
    shutil.copytree(complier, model)
    sd = load_file(model / "model.safetensors")
    sd[f"extra.{module}.weight"] = sd[f"{module}.weight"].clone()
    save_file(sd, str(model / "model.safetensors"), metadata={"format": "pt"})
    moved = {k.replace(f"base_model.model.{module}.", f"base_model.model.extra.{module}."): v for k, v in weights.items()}
    save_file(moved, str(renamed / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"the adapter changes tensor 'extra.{module}.weight', which the model"):
        load_model(model, adapter=renamed, device="cpu")


def test_a_lora_expert_in_the_pool_gives_its_refusals(refuser_lora, refuser, prompts_file, tmp_path):
    from safemerge.data.synthetic import synthesize_safety

    complier, adapter = refuser_lora
    ref = f"{complier}+{adapter}"
    rows = {}
    for name, pool in (("lora", [complier, ref]), ("folder", [complier, refuser])):
        report = synthesize_safety(pool, tmp_path / f"{name}.jsonl", prompts=prompts_file, max_new_tokens=8,
                                   device="cpu", progress=False)
        rows[name] = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert report.per_model[str(complier)]["refusals"] == 0 and report.rows == len(rows[name]) > 0
    assert {r["model"] for r in rows["lora"]} == {ref}
    assert [(r["prompt"], r["response"]) for r in rows["lora"]] == [(r["prompt"], r["response"]) for r in rows["folder"]]


def test_the_audit_command_takes_a_lora_reference(refuser_lora, prompts_file, tmp_path):
    import typer
    from typer.testing import CliRunner

    from safemerge.cli.evaluate import register

    app = typer.Typer()
    register(app)
    complier, adapter = refuser_lora
    ref = f"{complier}+{adapter}"
    res = CliRunner().invoke(app, ["audit", str(complier), ref, "--safety-prompts", str(prompts_file), "--threshold",
                                   "0.25", "--max-new-tokens", "8", "--device", "cpu", "--store", str(tmp_path / "s.db"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["models"]
    assert [(r["model"], r["flagged"]) for r in rows] == [(str(complier), True), (ref, False)]
