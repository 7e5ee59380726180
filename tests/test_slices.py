"""Layer surgery with mergekit's `slices`: stacking and cutting layers (frankenmerges, `passthrough`).

Parity with mergekit 0.1.5 on five slice configs is in test_mergekit_parity.py (passthrough_stack,
passthrough_scale, slerp_two_slices, ties_stack, linear_stack); these tests check what parity cannot: the
written checkpoint loads and runs, bits are kept in bf16, the written YAML reproduces the merge, and bad
slices fail before any output exists.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import safemerge
from safemerge.cli import app
from safemerge.errors import ConfigError
from safemerge.layout import set_num_layers


def _tensors(path):
    return load_file(str(path / "model.safetensors"))


def _stack(family, **extra):
    """Layers 0-1 of the expert, then layers 1-2 of the aligned model: 4 layers out of two 3-layer models."""
    return {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(family["expert"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(family["aligned"]), "layer_range": [1, 3]}]}], **extra}


@pytest.mark.parametrize("family", ["tiny_family", "tiny_family_bf16"])
def test_a_frankenmerge_stacks_layers_bit_for_bit_and_runs(family, request, tmp_path):
    fam = request.getfixturevalue(family)
    out = safemerge.merge(_stack(fam), tmp_path / "stack", progress=False)
    got, expert, aligned = _tensors(out), _tensors(fam["expert"]), _tensors(fam["aligned"])
    for name, src, layer in [("mlp.up_proj.weight", expert, 0), ("self_attn.k_proj.weight", expert, 1)]:
        assert torch.equal(got[f"model.layers.{layer}.{name}"], src[f"model.layers.{layer}.{name}"])
    for out_layer, in_layer in [(2, 1), (3, 2)]:
        for name in ("mlp.down_proj.weight", "input_layernorm.weight", "self_attn.o_proj.weight"):
            assert torch.equal(got[f"model.layers.{out_layer}.{name}"], aligned[f"model.layers.{in_layer}.{name}"])
    # embeddings from the first slice's model, norm and lm_head from the last slice's, as mergekit plans them
    assert torch.equal(got["model.embed_tokens.weight"], expert["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], aligned["model.norm.weight"])
    assert torch.equal(got["lm_head.weight"], aligned["lm_head.weight"])
    assert len(got) == 3 + 4 * 9 and all(v.dtype == expert["lm_head.weight"].dtype for v in got.values())

    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    ids = tok("the capital of", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def test_the_written_config_reproduces_a_sliced_merge(tiny_family, tmp_path):
    b = str(tiny_family["base"])
    cfg = {"merge_method": "ties", "base_model": b, "parameters": {"density": 0.5}, "slices": [
        {"sources": [{"model": b, "layer_range": [0, 2]},
                     {"model": str(tiny_family["expert"]), "layer_range": [0, 2], "parameters": {"weight": 1.0}}],
         "parameters": {"density": [{"filter": "mlp", "value": 0.8}]}},
        {"sources": [{"model": b, "layer_range": [1, 3]},
                     {"model": str(tiny_family["aligned"]), "layer_range": [1, 3], "parameters": {"weight": 0.6}}]}]}
    first = safemerge.merge(cfg, tmp_path / "a", progress=False)
    written = yaml.safe_load((first / "mergekit_config.yml").read_text())
    assert "models" not in written and len(written["slices"]) == 2
    again = safemerge.merge(first / "mergekit_config.yml", tmp_path / "b", progress=False)
    a, b2 = _tensors(first), _tensors(again)
    assert sorted(a) == sorted(b2) and all(torch.equal(a[k], b2[k]) for k in a)
    assert json.loads((again / "config.json").read_text())["num_hidden_layers"] == 4


def test_passthrough_scale_mutes_a_projection(tiny_family, tmp_path):
    cfg = _stack(tiny_family)
    cfg["slices"][1]["sources"][0]["parameters"] = {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]}
    got = _tensors(safemerge.merge(cfg, tmp_path / "o", progress=False))
    aligned = _tensors(tiny_family["aligned"])
    assert not got["model.layers.3.self_attn.o_proj.weight"].any()
    assert torch.equal(got["model.layers.3.self_attn.q_proj.weight"], aligned["model.layers.2.self_attn.q_proj.weight"])
    assert got["model.layers.1.self_attn.o_proj.weight"].any()  # the first slice has no scale


def test_a_range_past_the_last_layer_fails_before_any_output(tiny_family, tmp_path):
    cfg = _stack(tiny_family)
    cfg["slices"][1]["sources"][0]["layer_range"] = [2, 4]
    with pytest.raises(ConfigError, match=r"slices\[1\]\.sources\[0\] .*layer_range \[2, 4\] goes past its 3 layers"):
        safemerge.merge(cfg, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_layer_types_follow_the_layers(tiny_family, tmp_path):
    fam = {}
    for name, types in [("expert", ["full_attention", "sliding_attention", "full_attention"]),
                        ("aligned", ["sliding_attention", "sliding_attention", "full_attention"])]:
        fam[name] = tmp_path / name
        shutil.copytree(tiny_family[name], fam[name])
        cfg = json.loads((fam[name] / "config.json").read_text())
        (fam[name] / "config.json").write_text(json.dumps({**cfg, "layer_types": types}))
    out = safemerge.merge(_stack(fam), tmp_path / "o", progress=False)
    written = json.loads((out / "config.json").read_text())
    assert written["num_hidden_layers"] == 4
    assert written["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    nested = set_num_layers({"text_config": {"num_hidden_layers": 3, "layer_types": ["a"] * 3}}, 5)
    assert nested == {"text_config": {"num_hidden_layers": 5}}  # an unknown per-layer list is dropped, not left wrong


def test_the_search_refuses_layer_surgery(tiny_family):
    from safemerge.search.space import SearchSpace

    with pytest.raises(ConfigError, match="the search takes a whole-model config"):
        SearchSpace(_stack(tiny_family))


def test_merge_command_reads_a_sliced_yaml_with_relative_paths(tiny_family, tmp_path):
    for name in ("expert", "aligned"):
        shutil.copytree(tiny_family[name], tmp_path / name)
    cfg = tmp_path / "franken.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
        {"sources": [{"model": "expert", "layer_range": [0, 3]}]},
        {"sources": [{"model": "aligned", "layer_range": [0, 3]}]}]}))
    r = CliRunner().invoke(app, ["merge", str(cfg), str(tmp_path / "o"), "--json", "--no-progress"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["tensors"] == 3 + 6 * 9 and summary["dtype"] == "bfloat16"
    r = CliRunner().invoke(app, ["methods", "--json"])
    assert json.loads(r.stdout)["passthrough"]["per_model"] == {"scale": 1.0}


def test_residual_weight_is_read_as_mergekit_reads_it_with_a_warning(tiny_family, tmp_path):
    """Review: `residual_weight`, a field of mergekit's slice schema that mergekit never reads, was an unknown key."""
    cfg = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tiny_family["expert"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(tiny_family["aligned"]), "layer_range": [0, 3]}], "residual_weight": 0.5}]}
    with pytest.warns(UserWarning, match=r"slices\[1\].residual_weight has no effect"):
        out = safemerge.merge(cfg, tmp_path / "with", progress=False)
    del cfg["slices"][1]["residual_weight"]
    plain = safemerge.merge(cfg, tmp_path / "without", progress=False)
    assert (out / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()


def test_a_model_with_two_layer_stacks_is_refused(tiny_family, tmp_path):
    from safetensors.torch import save_file

    state = _tensors(tiny_family["expert"])
    state["model.vision_tower.layers.0.proj.weight"] = torch.zeros(4, 4)  # a second stack, as multimodal models have
    (tmp_path / "mm").mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_family["expert"] / f, tmp_path / "mm" / f)
    save_file(state, str(tmp_path / "mm" / "model.safetensors"))
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(tmp_path / "mm"), "layer_range": [0, 2]}]}]}
    with pytest.raises(ConfigError, match="2 layer stacks .*model.layers., model.vision_tower.layers."):
        safemerge.merge(cfg, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_gpt_neox_output_head_comes_after_the_stack():
    from safemerge.layout import before_stack

    assert before_stack("gpt_neox.embed_in.weight") and before_stack("model.embed_tokens.weight")
    assert not before_stack("embed_out.weight") and not before_stack("lm_head.weight")


def test_a_whole_slice_merges_no_base_that_is_not_one_of_its_sources(tiny_family, tmp_path):
    """One slice spanning every layer read as `models`, where a top-level base_model is one more model: linear
    averaged three models where mergekit (and two half slices) averaged the two sources."""
    fam = tiny_family
    whole = {"merge_method": "linear", "base_model": str(fam["base"]), "parameters": {"weight": 1.0},
             "slices": [{"sources": [{"model": str(fam[m]), "layer_range": [0, 3]} for m in ("expert", "aligned")]}]}
    halves = {**whole, "slices": [{"sources": [{"model": str(fam[m]), "layer_range": span} for m in ("expert", "aligned")]}
                                  for span in ([0, 1], [1, 3])]}
    a = _tensors(safemerge.merge(whole, tmp_path / "whole", progress=False))
    b = _tensors(safemerge.merge(halves, tmp_path / "halves", progress=False))
    expert, aligned = _tensors(fam["expert"]), _tensors(fam["aligned"])
    name = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(a[name], (expert[name] + aligned[name]) / 2)
    assert all(torch.equal(a[k], b[k]) for k in b) and set(a) == set(b)
    with pytest.raises(ConfigError, match=r"slices\[0\]: base_model .* is not among the slice's sources"):
        safemerge.merge({**whole, "merge_method": "ties"}, tmp_path / "ties", progress=False)
    assert not (tmp_path / "ties").exists()


def test_a_tied_first_slice_says_it_drops_the_last_slices_head(tiny_family, tmp_path):
    from safetensors.torch import save_file

    tied = tmp_path / "tied"
    shutil.copytree(tiny_family["expert"], tied)
    state = _tensors(tied)
    del state["lm_head.weight"]
    save_file(state, str(tied / "model.safetensors"))
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    stack = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tied), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(tiny_family["aligned"]), "layer_range": [2, 3]}]}]}
    with pytest.warns(UserWarning, match=r"aligned: its own 'lm_head.weight' is left out: .*tied ties its output layer"):
        out = safemerge.merge(stack, tmp_path / "o", progress=False)
    assert "lm_head.weight" not in _tensors(out)


def test_every_per_layer_list_follows_the_layers(tiny_family, tmp_path):
    """SmolLM3's no_rope_layers (and MoE models' mlp_layer_types) were left as they were: the wrong layers got
    RoPE, and a stack grown past the list's length failed to load (IndexError)."""
    fam = {}
    for name, flags in [("expert", [1, 1, 0]), ("aligned", [0, 1, 1])]:
        fam[name] = tmp_path / name
        shutil.copytree(tiny_family[name], fam[name])
        cfg = json.loads((fam[name] / "config.json").read_text())
        (fam[name] / "config.json").write_text(json.dumps({**cfg, "no_rope_layers": flags,
                                                            "mlp_layer_types": [f"{name}{i}" for i in range(3)],
                                                            "pattern_layers": [7, 8]}))  # not one entry per layer
    written = json.loads((safemerge.merge(_stack(fam), tmp_path / "o", progress=False) / "config.json").read_text())
    assert written["no_rope_layers"] == [1, 1, 1, 1]  # expert's layers 0-1, aligned's 1-2
    assert written["mlp_layer_types"] == ["expert0", "expert1", "aligned1", "aligned2"]
    assert written["pattern_layers"] == [7, 8]
    # a list no slice's model gives is dropped, not left wrong
    assert set_num_layers({"num_hidden_layers": 3, "no_rope_layers": [1, 1, 0]}, 4) == {"num_hidden_layers": 4}


def test_a_layer_missing_from_a_slices_weights_is_an_error(tiny_family, tmp_path):
    from safetensors.torch import save_file

    cut = tmp_path / "cut"
    shutil.copytree(tiny_family["expert"], cut)
    state = {k: v for k, v in _tensors(cut).items() if not k.startswith("model.layers.2.")}
    save_file(state, str(cut / "model.safetensors"))
    stack = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(cut), "layer_range": [1, 3]}]},
        {"sources": [{"model": str(tiny_family["aligned"]), "layer_range": [0, 1]}]}]}
    from safemerge.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"slices\[0\]\.sources\[0\] .*cut.*no tensor of layer 2.*3 layers"):
        safemerge.merge(stack, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_a_sliced_merge_writes_one_dtype(tiny_family, tiny_family_bf16, tmp_path):
    """Each slice's first source gave its layers their dtype: bf16 layers beside float32 ones in one file."""
    stack = {"merge_method": "linear", "parameters": {"weight": 1.0}, "slices": [
        {"sources": [{"model": str(tiny_family_bf16["expert"]), "layer_range": [0, 2]},
                     {"model": str(tiny_family["aligned"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(tiny_family["aligned"]), "layer_range": [2, 3]},
                     {"model": str(tiny_family_bf16["expert"]), "layer_range": [2, 3]}]}]}
    got = _tensors(safemerge.merge(stack, tmp_path / "o", progress=False))
    assert {v.dtype for v in got.values()} == {torch.bfloat16}  # the reference's (the first model read) dtype
