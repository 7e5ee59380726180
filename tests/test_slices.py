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
