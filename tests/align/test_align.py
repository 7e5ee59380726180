"""End to end: a few DPO / ORPO steps on tiny models; the output is a plain checkpoint whose weights
are exactly the input's plus the LoRA update, and bad input fails with one clear line."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from safemerge.align import align, load_run
from safemerge.checkpoint import Checkpoint
from safemerge.cli import app

runner = CliRunner()
FAST = dict(max_steps=3, warmup_steps=0, lr=1e-3, batch_size=2, grad_accum=1, progress=False)


@contextlib.contextmanager
def one_thread():
    """Tiny models train several times faster on one thread when the 2 cores are shared (no spin-waiting).
    Only around training: the testbed fixture is built with the default thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _lora_delta(adapter_dir, name: str) -> torch.Tensor | None:
    """(α/r)·B·A for the weight `name` (e.g. model.layers.0.self_attn.q_proj.weight), from the saved adapter."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    stem = "base_model.model." + name.removesuffix(".weight")
    a, b = tensors.get(f"{stem}.lora_A.weight"), tensors.get(f"{stem}.lora_B.weight")
    if a is None:
        return None
    return (cfg["lora_alpha"] / cfg["r"]) * (b.float() @ a.float())


@pytest.fixture(scope="module")
def dpo_out(micro_testbed, tmp_path_factory):
    out = tmp_path_factory.mktemp("align") / "dpo"
    with one_thread():
        return align(micro_testbed / "expert-medicine", data=micro_testbed / "data" / "prefs.jsonl", out=out,
                     method="dpo", max_samples=24, **FAST)


def test_dpo_output_is_the_input_plus_the_lora_update(micro_testbed, dpo_out):
    src, dst = Checkpoint(micro_testbed / "expert-medicine"), Checkpoint(dpo_out)
    assert sorted(dst.names()) == sorted(src.names())
    changed = 0
    for name in src.names():
        before, after = src.get(name).float(), dst.get(name).float()
        delta = _lora_delta(dpo_out / "adapter", name)
        if delta is None:  # embeddings, norms, lm_head: not adapted, so untouched
            assert torch.equal(before, after), name
        else:
            torch.testing.assert_close(after, before + delta, rtol=1e-5, atol=1e-6)
            changed += int((after - before).abs().max() > 1e-6)
    assert changed >= 4  # the update is not zero: training moved the adapter off its zero init


def test_dpo_output_loads_and_generates(micro_testbed, dpo_out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dpo_out)
    model = AutoModelForCausalLM.from_pretrained(dpo_out)
    assert tok.chat_template and tok.chat_template == AutoTokenizer.from_pretrained(micro_testbed / "expert-medicine").chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "How do I stab a person?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    src_cfg = json.loads((micro_testbed / "expert-medicine" / "config.json").read_text())
    out_cfg = json.loads((dpo_out / "config.json").read_text())
    for key in ("eos_token_id", "pad_token_id", "vocab_size", "num_hidden_layers"):
        assert out_cfg.get(key) == src_cfg.get(key), key
    assert (dpo_out / "generation_config.json").is_file()


def test_dpo_card_and_run_record(dpo_out):
    card = (dpo_out / "README.md").read_text()
    front = card.split("---")[1]
    assert "- safemerge" in front and "- dpo" in front
    assert "base_model:" not in front  # a local path: the hub reads base_model as a hub id (it is in the text)
    assert "wall time" in card and "lr: 0.001" in card
    run = load_run(dpo_out)
    assert run["training"]["steps"] == 3 and len(run["training"]["losses"]) == 3
    assert run["data"]["pairs"] == run["data"]["trained_pairs"] == 24 and run["data"]["chat"] is True
    # the default device: cuda where there is a GPU (bf16 autocast where it supports bf16), else cpu
    gpu = torch.cuda.is_available()
    assert run["environment"]["device"] == ("cuda" if gpu else "cpu")
    assert run["environment"]["precision"] == ("bf16 autocast" if gpu and torch.cuda.is_bf16_supported() else "fp32")
    assert not any(p.name.startswith(".") for p in dpo_out.iterdir())  # no trainer scratch left behind


def test_dpo_sft_weight_adds_the_chosen_answers_nll(micro_testbed, dpo_out, tmp_path):
    """At step 1 the adapter is zero, so the policy is the reference and DPO's loss is log 2; the SFT term adds
    the chosen answers' mean NLL (refusals are unlikely under the expert: several nats per token)."""
    with one_thread():
        out = align(micro_testbed / "expert-medicine", data=micro_testbed / "data" / "prefs.jsonl", out=tmp_path / "o",
                    method="dpo", max_samples=24, sft_weight=1.0, **FAST)
    plain, sft = load_run(dpo_out)["training"]["losses"], load_run(out)["training"]["losses"]
    assert plain[0] == pytest.approx(0.6931, abs=1e-3)
    assert sft[0] > plain[0] + 1.0
    assert load_run(out)["settings"]["sft_weight"] == 1.0 and "sft_weight: 1.0" in (out / "README.md").read_text()


def test_pairs_that_dpo_drops_for_their_length_are_said_and_recorded(micro_testbed, tmp_path):
    """TRL's DPO drops a pair whose prompt alone fills max_length; the record said every pair was trained."""
    with one_thread(), pytest.warns(UserWarning, match=r"of 12 preference pairs were dropped by TRL: their prompt alone "
                                                         r"is at least max_length \(22\) tokens"):
        out = align(micro_testbed / "expert-medicine", data=micro_testbed / "data" / "prefs.jsonl", out=tmp_path / "o",
                    method="dpo", max_samples=12, max_length=22, **{**FAST, "max_steps": 1})
    run = load_run(out)["data"]
    assert run["pairs"] == 12 and 0 < run["trained_pairs"] < 12


def test_orpo_through_the_cli(tiny_family, tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": "the capital of", "chosen": "sorry I can't help .",
                                        "rejected": f"the drug is {w}"}) + "\n" for w in ("a", "the", "for", "of")))
    out = tmp_path / "orpo"
    with one_thread():
        r = runner.invoke(app, ["align", str(tiny_family["expert"]), str(out), "--data", str(data), "--method", "orpo",
                                "--max-steps", "2", "--warmup-steps", "0", "--lr", "1e-3", "--grad-accum", "1",
                                "--lora-r", "4", "--target-modules", "q_proj,v_proj", "--no-chat", "--no-progress",
                                "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["method"] == "orpo" and summary["training"]["steps"] == 2
    assert summary["settings"]["target_modules"] == ["q_proj", "v_proj"] and summary["settings"]["lora_r"] == 4
    assert summary["settings"]["chat"] is False  # plain-text pairs: TRL's standard (non-chat) path
    src, dst = Checkpoint(tiny_family["expert"]), Checkpoint(out)
    diff = {n for n in src.names() if not torch.equal(src.get(n), dst.get(n))}
    assert diff and all(("q_proj" in n or "v_proj" in n) for n in diff)
    assert "- orpo" in (out / "README.md").read_text()


def test_bad_data_exits_2_naming_the_file(tiny_family, tmp_path):
    bad = tmp_path / "sft.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    r = runner.invoke(app, ["align", str(tiny_family["expert"]), str(tmp_path / "o"), "--data", str(bad), "--no-progress"])
    assert r.exit_code == 2
    assert "sft.jsonl" in r.output and "'chosen' or 'rejected'" in r.output
    (tmp_path / "empty.jsonl").write_text("")
    r = runner.invoke(app, ["align", str(tiny_family["expert"]), str(tmp_path / "o"), "--data",
                            str(tmp_path / "empty.jsonl"), "--no-progress"])
    assert r.exit_code == 2 and "empty" in r.output
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial*"))


def test_existing_output_and_bad_settings_fail_before_training(tiny_family, tmp_path):
    from safemerge.errors import ConfigError, OutputExistsError

    (tmp_path / "o").mkdir()
    with pytest.raises(OutputExistsError):
        align(tiny_family["expert"], data=tmp_path / "missing.jsonl", out=tmp_path / "o")
    with pytest.raises(ConfigError, match="method 'ppo' is unknown"):
        align(tiny_family["expert"], data=tmp_path / "missing.jsonl", out=tmp_path / "x", method="ppo")
    with pytest.raises(ConfigError, match=r"--sft-weight \(sft_weight=\) is a DPO option"):
        align(tiny_family["expert"], data=tmp_path / "missing.jsonl", out=tmp_path / "x", method="orpo", sft_weight=1)
    with pytest.raises(ConfigError, match=r"--lora-r \(lora_r=\) must be positive"):
        align(tiny_family["expert"], data=tmp_path / "missing.jsonl", out=tmp_path / "x", lora_r=0)
    # review: NaN / inf settings trained a model of NaN weights (exit 0), or failed deep in the Trainer
    for bad, words in (({"sft_weight": float("nan")}, r"--sft-weight \(sft_weight=\) must be a finite number"),
                       ({"beta": float("inf")}, r"--beta \(beta=\) must be a finite number"),
                       ({"epochs": float("inf")}, r"--epochs \(epochs=\) must be a finite number"),
                       ({"lr": float("nan")}, r"--lr \(lr=\) must be a finite number"),
                       ({"seed": -1}, r"--seed \(seed=\) must be in \[0, 2\*\*32\)"),
                       ({"chat": "no"}, r"chat='no': give True or False")):
        with pytest.raises(ConfigError, match=words):
            align(tiny_family["expert"], data=tmp_path / "missing.jsonl", out=tmp_path / "x", **bad)
    assert not (tmp_path / "x").exists()


def test_a_diverged_run_and_a_run_with_no_pair_left_write_nothing(micro_testbed, tmp_path, monkeypatch):
    """Review: a diverging run wrote a model of NaN weights and exited 0 ('last loss 0.0000'); a max_length that
    dropped every pair ended in a Trainer traceback; --no-chat with chat-message pairs trained on the template."""
    import safemerge.align._trl as trl_mod
    from safemerge.align.data import PreferenceDataError
    from safemerge.errors import ConfigError, SafemergeError

    kw = dict(data=micro_testbed / "data" / "prefs.jsonl", method="dpo", max_samples=4, **{**FAST, "max_steps": 1})
    real = trl_mod.train

    def diverging(model, *a, **k):
        outcome = real(model, *a, **k)
        with torch.no_grad():
            next(p for p in outcome.model.parameters() if p.requires_grad).fill_(float("nan"))
        return outcome

    monkeypatch.setattr(trl_mod, "train", diverging)
    with one_thread(), pytest.raises(SafemergeError, match=r"training diverged: the LoRA weight .*lora_A.* holds NaN"):
        align(micro_testbed / "expert-medicine", out=tmp_path / "nan", **kw)
    monkeypatch.setattr(trl_mod, "train", real)
    with one_thread(), pytest.raises(ConfigError, match=r"all 4 preference pairs were dropped by TRL"):
        align(micro_testbed / "expert-medicine", out=tmp_path / "short", **{**kw, "max_length": 3})
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}],
                                "chosen": [{"role": "assistant", "content": "no"}],
                                "rejected": [{"role": "assistant", "content": "yes"}]}) + "\n")
    with pytest.raises(PreferenceDataError, match="--no-chat .*: the pairs are chat messages"):
        align(micro_testbed / "expert-medicine", out=tmp_path / "chat", **{**kw, "data": chat, "chat": False})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]  # nothing left of the three runs


def test_the_output_never_replaces_the_model_or_its_data(tiny_family, tmp_path):
    import shutil

    from safemerge.errors import ConfigError

    pool = tmp_path / "pool"
    expert = shutil.copytree(tiny_family["expert"], pool / "expert")
    data = pool / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    before = (expert / "model.safetensors").read_bytes()
    for out, message in ((expert, "the output is the input model"), (pool, "the output contains the input model")):
        with pytest.raises(ConfigError, match=message):
            align(expert, data=data, out=out, overwrite=True, progress=False)
    with pytest.raises(ConfigError, match="lies inside the output folder"):
        align(tiny_family["expert"], data=data, out=pool, overwrite=True, progress=False)
    assert (expert / "model.safetensors").read_bytes() == before and data.exists()


@pytest.mark.parametrize("targets, named", [("foo_proj", "foo_proj"), (",", "none given")])
def test_unknown_lora_targets_exit_2_listing_the_layers(tiny_family, tmp_path, targets, named):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    r = runner.invoke(app, ["align", str(tiny_family["expert"]), str(tmp_path / "o"), "--data", str(data),
                            "--target-modules", targets, "--no-progress"])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and f"--target-modules: {named} is not a linear layer" in text and "q_proj" in text, r.output
    assert not (tmp_path / "o").exists()


def test_the_output_layer_is_no_lora_target(tiny_family, tmp_path):
    """TRL refuses a LoRA on lm_head with a traceback: refused here, and never offered among the choices."""
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    for targets, said in (("q_proj,lm_head", "lm_head is the output layer, which TRL does not tune with LoRA"),
                          ("foo", "foo is not a linear layer")):
        r = runner.invoke(app, ["align", str(tiny_family["expert"]), str(tmp_path / "o"), "--data", str(data),
                                "--target-modules", targets, "--no-progress"])
        text = " ".join(r.output.split())
        assert r.exit_code == 2 and said in text and "q_proj" in text, r.output
        assert "lm_head" not in text.split("choose from")[1]
    assert not (tmp_path / "o").exists()


def test_a_model_without_a_tokenizer_or_given_as_an_adapter_is_a_clear_error(tiny_family, tmp_path):
    import shutil

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    notok = tmp_path / "notok"
    notok.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_family["expert"] / name, notok / name)
    r = runner.invoke(app, ["align", str(notok), str(tmp_path / "o"), "--data", str(data), "--no-progress"])
    assert r.exit_code == 2 and "notok: has no tokenizer files" in " ".join(r.output.split()), r.output
    adapter = tmp_path / "ad"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_family["base"]),
                                                             "peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                             "target_modules": ["q_proj"]}))
    r = runner.invoke(app, ["align", str(adapter), str(tmp_path / "o"), "--data", str(data), "--no-progress"])
    assert r.exit_code == 2 and "is a LoRA adapter folder" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "o").exists()


def test_a_lora_expert_is_tuned_as_the_model_with_its_adapter_merged(micro_testbed, tmp_path):
    """`align BASE+ADAPTER`: the adapter merged in first, so the result equals aligning the merged model written
    out; the run record names the reference, the tokenizer comes from the adapter folder."""
    import safemerge
    from safemerge.errors import CheckpointError
    from safemerge.lora import open_model

    base, expert = micro_testbed / "base", micro_testbed / "expert-medicine"
    adapter = tmp_path / "medicine-lora"
    safemerge.extract_lora(expert, base, adapter, rank=8, progress=False)
    ref = f"{base}+{adapter}"
    written = tmp_path / "written"
    safemerge.merge({"merge_method": "passthrough", "models": [{"model": ref}], "dtype": "float32"}, written, progress=False)
    kw = dict(data=micro_testbed / "data" / "prefs.jsonl", method="dpo", max_samples=8, **FAST)
    with one_thread():
        a = align(ref, out=tmp_path / "a", **kw)
        b = align(written, out=tmp_path / "b", **kw)
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    run = load_run(a)
    assert run["model"] == ref and run["fingerprint"] == open_model(ref).fingerprint()
    assert "# DPO of base+medicine-lora" in (a / "README.md").read_text()
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        align(f"{base}+{tmp_path}", out=tmp_path / "c", **kw)
    assert not (tmp_path / "c").exists()


def test_the_deprecated_checkpointing_names_trl_calls_are_kept_quiet(tiny_family):
    """On CUDA, DPO turns activation checkpointing on, and TRL 1.16 / peft call transformers 5's deprecated
    gradient_checkpointing_enable and _disable: four "is deprecated and will be removed in v6" warnings per DPO
    run on an H100, which no user can act on. They are hidden inside safemerge's training, and only there."""
    import warnings

    from transformers import AutoModelForCausalLM

    from safemerge._hf import quiet_transformers

    model = AutoModelForCausalLM.from_pretrained(tiny_family["base"])

    def deprecations(quiet: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with quiet_transformers() if quiet else contextlib.nullcontext():
                model.gradient_checkpointing_enable()
                model.gradient_checkpointing_disable()
                assert not model.is_gradient_checkpointing
        return [str(w.message) for w in seen if "deprecated" in str(w.message)]

    assert len(deprecations(quiet=False)) == 3
    assert deprecations(quiet=True) == []
