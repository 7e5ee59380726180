"""`safemerge extract-lora`: a fine-tune's change as a PEFT LoRA adapter, read back alike by peft and by safemerge."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import safemerge
from safemerge.checkpoint import Checkpoint
from safemerge.errors import CheckpointError, ConfigError, OutputExistsError
from safemerge.extract import extract_lora
from safemerge.lora import open_model
from tiny import llama_config, make_family, save_tokenizer


def _peft_merged(model_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {k: v.detach() for k, v in PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict().items()}


def _changed(base: Path, out: Path, changes: dict[str, torch.Tensor]) -> Path:
    """A copy of the model at `base` with `changes` added to the named tensors."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        state = model.state_dict()
        for name, delta in changes.items():
            state[name].add_(delta)
    model.save_pretrained(out)
    save_tokenizer(out)
    return out


def _low_rank(shape, rank: int, seed: int, scale: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)


def _assert_same(got: dict, want: Checkpoint, atol: float) -> None:
    for name in want.names():
        torch.testing.assert_close(got[name].float(), want.get(name).float(), rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("extract") / "fam", names=("base", "expert"))


def test_full_rank_gives_back_the_model_through_peft_and_through_safemerge(fam, tmp_path):
    res = extract_lora(fam["expert"], fam["base"], tmp_path / "ad", rank=1000, progress=False)
    expert = Checkpoint(fam["expert"])
    _assert_same(_peft_merged(fam["base"], res.path), expert, atol=2e-6)
    ours = open_model(f"{fam['base']}+{res.path}")
    _assert_same({n: ours.get(n) for n in ours.names()}, expert, atol=2e-6)
    cfg = json.loads((res.path / "adapter_config.json").read_text())
    kv = {rf"model\.layers\.{i}\.self_attn\.{p}": 16 for i in range(3) for p in ("k_proj", "v_proj")}
    assert cfg["r"] == cfg["lora_alpha"] == 32 and cfg["rank_pattern"] == kv == cfg["alpha_pattern"]  # k, v: (16, 32)
    assert {"lm_head", "model.embed_tokens", "model.norm"} <= set(cfg["modules_to_save"])  # as mergekit: saved whole
    assert "model.layers.0.self_attn.q_proj" in cfg["target_modules"] and res.total_error < 1e-5
    card = (res.path / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and "base_model" not in front  # the hub reads a hub id there, not a path
    assert str(fam["base"]) in card  # the text still names it


def test_rank_r_is_the_truncated_svd_and_its_error_is_the_dropped_energy(fam, tmp_path):
    res = extract_lora(fam["expert"], fam["base"], tmp_path / "ad", rank=3, progress=False)
    name = "model.layers.1.mlp.down_proj"
    delta = Checkpoint(fam["expert"]).get(name + ".weight") - Checkpoint(fam["base"]).get(name + ".weight")
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    want = (u[:, :3] * s[:3]) @ vh[:3]
    w = load_file(str(res.path / "adapter_model.safetensors"))
    got = w[f"base_model.model.{name}.lora_B.weight"].double() @ w[f"base_model.model.{name}.lora_A.weight"].double()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert res.ranks[name] == 3
    assert res.errors[name] == pytest.approx(math.sqrt(float((s[3:] ** 2).sum() / (s ** 2).sum())), rel=1e-4)
    assert 0.5 < res.total_error < 1  # random noise has a flat spectrum: rank 3 of 32-64 keeps little of it


def test_only_changed_modules_go_in_and_per_module_ranks_are_read_alike(fam, tmp_path):
    q, down = "model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight"
    expert = _changed(fam["base"], tmp_path / "exp", {q: _low_rank((32, 32), 1, 0), down: _low_rank((32, 64), 3, 1)})
    res = extract_lora(expert, fam["base"], tmp_path / "ad", rank=8, sv_epsilon=1e-4, progress=False)
    assert res.ranks == {"model.layers.0.self_attn.q_proj": 1, "model.layers.2.mlp.down_proj": 3}
    assert res.whole == [] and res.unchanged == 3 * 9 + 3 - 2  # 9 modules a layer, embeddings, norm, lm_head
    cfg = json.loads((res.path / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["rank_pattern"] == {r"model\.layers\.0\.self_attn\.q_proj": 1} == cfg["alpha_pattern"]
    assert cfg["modules_to_save"] is None
    want = Checkpoint(expert)
    _assert_same(_peft_merged(fam["base"], res.path), want, atol=1e-6)
    ours = open_model(f"{fam['base']}+{res.path}")
    _assert_same({n: ours.get(n) for n in ours.names()}, want, atol=1e-6)
    with pytest.raises(CheckpointError, match="same weights"):
        extract_lora(fam["base"], fam["base"], tmp_path / "none", progress=False)


def test_randomized_svd_is_seeded_and_recovers_a_low_rank_change(fam, tmp_path):
    q = "model.layers.1.self_attn.q_proj.weight"
    expert = _changed(fam["base"], tmp_path / "exp", {q: _low_rank((32, 32), 2, 5)})
    one = extract_lora(expert, fam["base"], tmp_path / "a", rank=4, svd="randomized", progress=False)
    two = extract_lora(expert, fam["base"], tmp_path / "b", rank=4, svd="randomized", progress=False)
    assert one.total_error < 1e-5
    assert (one.path / "adapter_model.safetensors").read_bytes() == (two.path / "adapter_model.safetensors").read_bytes()


def test_include_exclude_and_save_module(fam, tmp_path):
    res = extract_lora(fam["expert"], fam["base"], tmp_path / "a", rank=4, include=[r"layers\.0\."],
                       exclude=["mlp"], save_modules=["k_proj"], progress=False)
    assert set(res.ranks) == {f"model.layers.0.self_attn.{p}" for p in ("q_proj", "v_proj", "o_proj")}
    assert res.whole == ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                         "model.layers.0.self_attn.k_proj"]  # include/exclude say what goes in, save_module how
    assert "model.layers.1.self_attn.k_proj" in res.excluded and "lm_head" in res.excluded
    with pytest.raises(ConfigError, match="no module of that name"):
        extract_lora(fam["expert"], fam["base"], tmp_path / "b", save_modules=["kproj"], progress=False)


def test_gpt2_conv1d_tied_embeddings_and_a_qwen2_bias_round_trip_through_peft(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)).save_pretrained(tmp_path / "g")
    expert = _changed(tmp_path / "g", tmp_path / "gx", {"transformer.h.0.attn.c_attn.weight": _low_rank((32, 96), 2, 0),
                                                       "transformer.wte.weight": _low_rank((64, 32), 2, 1)})
    with pytest.warns(UserWarning, match="tied"):
        res = extract_lora(expert, tmp_path / "g", tmp_path / "ga", rank=4, progress=False)
    cfg = json.loads((res.path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] and res.ranks == {"transformer.h.0.attn.c_attn": 4, "transformer.wte": 4}
    keys = load_file(str(res.path / "adapter_model.safetensors"))
    assert "base_model.model.transformer.wte.lora_embedding_A" in keys
    _assert_same(_peft_merged(tmp_path / "g", res.path), Checkpoint(expert), atol=1e-6)
    ours = open_model(f"{tmp_path / 'g'}+{res.path}")  # the shared embedding's update, read by safemerge
    _assert_same({n: ours.get(n) for n in ours.names()}, Checkpoint(expert), atol=1e-6)

    qcfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=False)
    Qwen2ForCausalLM(qcfg).save_pretrained(tmp_path / "q")
    qx = _changed(tmp_path / "q", tmp_path / "qx", {"model.layers.0.self_attn.q_proj.bias": torch.full((32,), 0.1),
                                                   "model.layers.0.self_attn.v_proj.weight": _low_rank((16, 32), 1, 2)})
    res = extract_lora(qx, tmp_path / "q", tmp_path / "qa", rank=4, progress=False)
    assert res.whole == ["model.layers.0.self_attn.q_proj"] and set(res.ranks) == {"model.layers.0.self_attn.v_proj"}
    _assert_same(_peft_merged(tmp_path / "q", res.path), Checkpoint(qx), atol=1e-6)


def test_a_tied_head_that_the_checkpoints_also_store_goes_with_the_embeddings(tmp_path):
    """Review: a tied model whose checkpoint stores lm_head.weight too (a copy of the embeddings) was refused: the head
    'is not a parameter' (named_parameters() lists a shared one once), so no change to the embeddings could be taken."""
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=4)).save_pretrained(tmp_path / "g")
    expert = _changed(tmp_path / "g", tmp_path / "gx", {"transformer.wte.weight": _low_rank((64, 32), 2, 1)})
    for d in (tmp_path / "g", expert):
        weights = load_file(str(d / "model.safetensors"))
        weights["lm_head.weight"] = weights["transformer.wte.weight"].clone()
        save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="tied"):
        res = extract_lora(expert, tmp_path / "g", tmp_path / "ga", rank=4, progress=False)
    assert res.ranks == {"transformer.wte": 4}
    _assert_same(_peft_merged(tmp_path / "g", res.path), Checkpoint(expert), atol=1e-6)


def test_positional_embeddings_of_a_tied_model_are_saved_whole_without_the_lm_head_warning(tmp_path):
    """Only the input embeddings are tied to the head: GPT-2's positional embeddings (wpe) were factored as LoRA under a
    warning about 'the model's lm_head', which they have nothing to do with; they are saved whole as in an untied model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=4)).save_pretrained(tmp_path / "g")
    expert = _changed(tmp_path / "g", tmp_path / "gx", {"transformer.wte.weight": _low_rank((64, 32), 2, 1),
                                                       "transformer.wpe.weight": _low_rank((32, 32), 2, 2)})
    with pytest.warns(UserWarning) as caught:
        res = extract_lora(expert, tmp_path / "g", tmp_path / "ga", rank=4, progress=False)
    tied = [str(w.message) for w in caught if "tied" in str(w.message)]
    assert len(tied) == 1 and tied[0].startswith("transformer.wte:"), tied
    assert res.ranks == {"transformer.wte": 4} and res.whole == ["transformer.wpe"]
    _assert_same(_peft_merged(tmp_path / "g", res.path), Checkpoint(expert), atol=1e-6)


def test_bad_input_is_refused_by_name_and_leaves_nothing(fam, tmp_path, monkeypatch):
    wide = make_family(tmp_path / "wide", names=("base",), vocab=80)["base"]
    with pytest.raises(CheckpointError, match="resized its vocabulary"):
        extract_lora(wide, fam["base"], tmp_path / "o", progress=False)
    narrow = tmp_path / "narrow"  # review: a model of another hidden size was said to have resized its vocabulary
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(llama_config(hidden=16)).save_pretrained(narrow)
    with pytest.raises(CheckpointError, match=r"tensor .*\(models of other sizes: is it the base\?\)"):
        extract_lora(narrow, fam["base"], tmp_path / "o", progress=False)
    deeper = make_family(tmp_path / "deep", names=("base",), layers=4)["base"]
    with pytest.raises(CheckpointError, match="layers.3"):
        extract_lora(deeper, fam["base"], tmp_path / "o", progress=False)
    for kwargs, words in (({"rank": 0}, "positive whole number"), ({"svd": "fast"}, "exact, randomized"),
                          ({"include": ["("]}, "not a regular expression"), ({"dtype": "int8"}, "bfloat16"),
                          ({"include": ["q_proj", "nomatch"]}, "--include 'nomatch': matches no module of")):
        with pytest.raises(ConfigError, match=words):
            extract_lora(fam["expert"], fam["base"], tmp_path / "o", progress=False, **kwargs)
    with pytest.raises(ConfigError, match="is inside the input model"):
        extract_lora(fam["expert"], fam["base"], fam["expert"] / "ad", progress=False)
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExistsError):
        extract_lora(fam["expert"], fam["base"], tmp_path / "taken", progress=False)
    # review: against BASE+ADAPTER, the card said to merge it back as BASE+ADAPTER+OUT, which nothing reads
    adapter = extract_lora(fam["expert"], fam["base"], tmp_path / "ad4", rank=4, progress=False).path
    with pytest.raises(ConfigError, match=r"--base .*\+.*ad4: a model with a LoRA adapter; .*write it out first"):
        extract_lora(fam["expert"], f"{fam['base']}+{adapter}", tmp_path / "on-ref", progress=False)
    assert not (tmp_path / "on-ref").exists()

    import safemerge.extract as ex

    calls = []
    real = ex._truncated_svd

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ex, "_truncated_svd", failing)
    with pytest.raises(KeyboardInterrupt):
        extract_lora(fam["expert"], fam["base"], tmp_path / "new" / "ad", progress=False)
    assert not (tmp_path / "new").exists()


def test_cli_extracts_an_alignment_vector_that_mergealign_merges_in(tmp_path):
    from safemerge.cli import app

    fam = make_family(tmp_path / "fam")
    ad = tmp_path / "aligned-lora"
    r = CliRunner().invoke(app, ["extract-lora", str(fam["aligned"]), str(ad), "--base", str(fam["base"]),
                                 "--rank", "64", "--json", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["relative_error"] < 1e-5
    config = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]), "dtype": "float32",
              "models": [{"model": str(fam["expert"]), "parameters": {"weight": 1.0}},
                         {"model": f"{fam['base']}+{ad}", "parameters": {"weight": 1.0}}]}
    got = load_file(str(safemerge.merge(config, tmp_path / "m1", progress=False) / "model.safetensors"))
    want = load_file(str(safemerge.mergealign(base=fam["base"], domains=[fam["expert"]], aligned=fam["aligned"],
                                              out=tmp_path / "m2", progress=False) / "model.safetensors"))
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=0, atol=2e-6, msg=name)
    r = CliRunner().invoke(app, ["extract-lora", str(fam["base"]), str(tmp_path / "x"), "--base", str(fam["base"])])
    assert r.exit_code == 2 and "same weights" in r.output


def test_an_untied_head_of_another_name_is_not_taken_for_a_tied_one(tmp_path):
    """GPT-NeoX's untied head is `embed_out`: the test for "tied" looked for `lm_head.weight`, so the embeddings were
    factored at rank r (relative error 0.69 at rank 8) with a warning about tying, instead of saved whole."""
    import warnings

    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, tie_word_embeddings=False)
    base = GPTNeoXForCausalLM(cfg)
    base.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        base.gpt_neox.embed_in.weight.add_(0.02 * torch.randn_like(base.gpt_neox.embed_in.weight))
    base.save_pretrained(tmp_path / "fine")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = safemerge.extract_lora(tmp_path / "fine", tmp_path / "base", tmp_path / "lora", rank=8, progress=False)
    assert res.whole == ["gpt_neox.embed_in"] and res.total_error == 0.0
    assert not [w for w in caught if "tied" in str(w.message)]
