"""Multi-stage configs (mergekit-multi's): merges of merges, dependency order, incremental reruns, errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import safemerge
from safemerge.cli import app
from safemerge.errors import CheckpointError, ConfigError


def _write(path, *docs):
    path.write_text("---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs))
    return path


def _docs(fam, *, soup_weight=0.5, final_weight=0.7):
    final = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]), "dtype": "float32",
             "models": [{"model": "soup", "parameters": {"weight": final_weight}},
                        {"model": "ta", "parameters": {"weight": 0.4}}]}
    soup = {"name": "soup", "merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(fam["expert"]), "parameters": {"weight": soup_weight}},
                       {"model": str(fam["aligned"]), "parameters": {"weight": 1 - soup_weight}}]}
    ta = {"name": "ta", "merge_method": "task_arithmetic", "base_model": str(fam["base"]), "dtype": "float32",
          "models": [{"model": "soup", "parameters": {"weight": 1.0}}, {"model": str(fam["aligned"]), "parameters": {"weight": 0.5}}]}
    return final, soup, ta  # the final merge first: the order comes from the references, not the file


def _tensors(path):
    return load_file(str(path / "model.safetensors"))


def test_merges_of_merges_equal_the_merges_run_one_by_one(tiny_family, tmp_path):
    final, soup, ta = _docs(tiny_family)
    cfg = _write(tmp_path / "multi.yml", final, soup, ta)
    r = safemerge.multimerge(cfg, tmp_path / "out", intermediate_dir=tmp_path / "inter", progress=False)
    assert r.made == ["soup", "ta", "the final merge"] and r.kept == []
    # the same merges by hand, each stage's output given by path
    by_hand = tmp_path / "by-hand"
    safemerge.merge({k: v for k, v in soup.items() if k != "name"}, by_hand / "soup", progress=False)
    ta_cfg = json.loads(json.dumps(ta).replace('"soup"', json.dumps(str(by_hand / "soup"))))
    safemerge.merge({k: v for k, v in ta_cfg.items() if k != "name"}, by_hand / "ta", progress=False)
    final_cfg = json.loads(json.dumps(final).replace('"soup"', json.dumps(str(by_hand / "soup")))
                           .replace('"ta"', json.dumps(str(by_hand / "ta"))))
    safemerge.merge(final_cfg, by_hand / "final", progress=False)
    for name, path in (("soup", tmp_path / "inter" / "soup"), ("ta", tmp_path / "inter" / "ta"), ("final", tmp_path / "out")):
        want, got = _tensors(by_hand / name), _tensors(path)
        assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want), name
    assert r.outputs == {"soup": tmp_path / "inter" / "soup", "ta": tmp_path / "inter" / "ta", None: tmp_path / "out"}
    assert r.final == tmp_path / "out"
    assert r.summary() == {"outputs": {"soup": str(tmp_path / "inter" / "soup"), "ta": str(tmp_path / "inter" / "ta")},
                           "final": str(tmp_path / "out"), "made": ["soup", "ta", "the final merge"], "kept": []}


def test_stages_in_the_modules_form_mergekit_writes_back_read_earlier_merges(tiny_family, tmp_path):
    final, soup, ta = _docs(tiny_family)
    plain = safemerge.multimerge(_write(tmp_path / "plain.yml", final, soup, ta), tmp_path / "plain",
                                 intermediate_dir=tmp_path / "i1", progress=False)

    def as_module(doc):
        return {**{k: v for k, v in doc.items() if k != "models"}, "modules": {"default": {"models": doc["models"]}}}

    r = safemerge.multimerge(_write(tmp_path / "modules.yml", as_module(final), soup, as_module(ta)), tmp_path / "mod",
                             intermediate_dir=tmp_path / "i2", progress=False)
    assert r.made == plain.made == ["soup", "ta", "the final merge"]  # `soup` inside modules.default is a reference
    want, got = _tensors(tmp_path / "plain"), _tensors(tmp_path / "mod")
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)


def test_reruns_keep_what_did_not_change_and_remake_what_reads_a_remade_merge(tiny_family, tmp_path):
    cfg, out, inter = tmp_path / "multi.yml", tmp_path / "out", tmp_path / "inter"
    _write(cfg, *_docs(tiny_family))
    safemerge.multimerge(cfg, out, intermediate_dir=inter, progress=False)
    first = _tensors(out)
    again = safemerge.multimerge(cfg, out, intermediate_dir=inter, progress=False)
    assert again.made == [] and again.kept == ["soup", "ta", "the final merge"]
    _write(cfg, *_docs(tiny_family, final_weight=0.2))  # only the final merge changed
    r = safemerge.multimerge(cfg, out, intermediate_dir=inter, progress=False)
    assert r.made == ["the final merge"] and r.kept == ["soup", "ta"]
    assert any(not (first[k] == v).all() for k, v in _tensors(out).items())
    _write(cfg, *_docs(tiny_family, soup_weight=0.3, final_weight=0.2))  # the soup changed: everything reads it
    r = safemerge.multimerge(cfg, out, intermediate_dir=inter, progress=False)
    assert r.made == ["soup", "ta", "the final merge"]
    assert safemerge.multimerge(cfg, out, intermediate_dir=inter, lazy=False, progress=False).kept == []


def test_an_output_deleted_or_replaced_since_is_made_again(tiny_family, tmp_path):
    """Review: laziness checked that OUT/config.json was there: a merge whose weights had been deleted was kept (and
    the next failed with 'no model weights found'), one whose weights were another model's was kept, silently."""
    import shutil

    cfg, out, inter = tmp_path / "multi.yml", tmp_path / "out", tmp_path / "inter"
    _write(cfg, *_docs(tiny_family))
    safemerge.multimerge(cfg, out, intermediate_dir=inter, progress=False)
    first = _tensors(out)
    (inter / "soup" / "model.safetensors").unlink()
    r = safemerge.multimerge(cfg, out, intermediate_dir=inter, progress=False)
    assert r.made == ["soup", "ta", "the final merge"] and r.kept == []
    shutil.copy(tiny_family["base"] / "model.safetensors", out / "model.safetensors")
    r = safemerge.multimerge(cfg, out, intermediate_dir=inter, progress=False)
    assert r.made == ["the final merge"] and r.kept == ["soup", "ta"]
    assert all((first[k] == v).all() for k, v in _tensors(out).items())
    record = json.loads((inter / "multimerge.json").read_text())  # as written before outputs were recorded
    (inter / "multimerge.json").write_text(json.dumps({k: {f: v for f, v in e.items() if f != "output"}
                                                       for k, e in record.items()}))
    (inter / "soup" / "model.safetensors").unlink()
    r = safemerge.multimerge(cfg, out, intermediate_dir=inter, progress=False)
    assert r.made == ["soup", "ta", "the final merge"]


def test_bad_multi_stage_configs_are_errors_before_any_merge(tiny_family, tmp_path):
    final, soup, ta = _docs(tiny_family)
    inter, out = tmp_path / "inter", tmp_path / "out"

    def fails(match, *docs, out=out, inter=inter, **kw):
        cfg = _write(tmp_path / "bad.yml", *docs)
        with pytest.raises((ConfigError, CheckpointError), match=match):
            safemerge.multimerge(cfg, out, intermediate_dir=inter, progress=False, **kw)
        assert not inter.exists() or not any(inter.iterdir())
        assert out is None or not out.exists() or out in tiny_family.values()

    fails("two merges are named 'soup'", final, soup, dict(soup), ta)
    fails("2 merges have no `name`; only the final merge may be unnamed", final, dict(final), soup, ta)
    fails("name 'a/b' must be a plain folder name", final, dict(soup, name="a/b"), ta)
    fails("name 'multimerge.json' must be a plain folder name", final, dict(soup, name="multimerge.json"), ta)
    fails("name 2024 must be text", final, dict(soup, name=2024), ta)
    fails("name 'base' is a tokenizer_source keyword", final, dict(soup, name="base"), ta)
    fails("has a '\\+', which reads as `model\\+adapter`", final, soup, ta, inter=tmp_path / "a+b")
    # inputs that no merge makes, checked before the first merge: a tokenizer source, an adapter on a merge's output
    fails("the final merge: tokenizer_source .*no-such-tokenizer' is not a model directory",
          dict(final, tokenizer_source=str(tmp_path / "no-such-tokenizer")), soup, ta)
    fails("no-such-adapter: no such adapter folder", final, soup,
          dict(ta, models=[{"model": "soup+" + str(tmp_path / "no-such-adapter"), "parameters": {"weight": 1.0}}]))
    fails("the final merge's output is the input model", final, soup, ta, out=tiny_family["expert"], overwrite=True)
    fails(r"the merges (soup -> ta -> soup|ta -> soup -> ta) read each other's outputs in a cycle",
          final, dict(soup, models=[{"model": "ta", "parameters": {"weight": 1.0}}]), ta)
    fails("merge 'soup' reads its own output", final, dict(soup, models=[{"model": "soup", "parameters": {"weight": 1.0}}]), ta)
    fails(r"has an unnamed \(final\) merge; give the path it is written to", final, soup, ta, out=None)
    fails("every merge is named", dict(final, name="last"), soup, ta)
    fails("overlap", final, soup, ta, out=inter / "final")
    missing = str(tmp_path / "no-such-model")
    fails("no-such-model: no such model directory", final, soup, dict(ta, models=[*ta["models"], {"model": missing, "parameters": {"weight": 1.0}}]))
    fails(r"bad.yml, ta: unknown key 'densty' in per-model parameters",
          final, soup, dict(ta, models=[{"model": "soup", "parameters": {"densty": 0.5}}]))
    out.mkdir()
    (out / "keep.txt").write_text("someone else's")
    cfg = _write(tmp_path / "bad.yml", final, soup, ta)
    from safemerge.errors import OutputExistsError
    with pytest.raises(OutputExistsError, match="holds other files") as e:  # not the advice to pass --overwrite
        safemerge.multimerge(cfg, out, intermediate_dir=inter, progress=False)
    assert "pass --overwrite" not in str(e.value)
    (out / "config.json").write_text('{"model_type": "llama"}')  # a model's folder that this multimerge did not write
    with pytest.raises(ConfigError, match="already exists and was not written by an earlier multimerge into this"):
        safemerge.multimerge(cfg, out, intermediate_dir=inter, progress=False)
    assert (out / "keep.txt").read_text() == "someone else's" and not inter.exists()
    (out / "config.json").unlink()
    (inter / "ta").mkdir(parents=True)  # an intermediate folder that this config did not write is kept too
    (inter / "ta" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConfigError, match=r"inter/ta \(ta's output\) already exists .* --intermediate-dir"):
        safemerge.multimerge(cfg, tmp_path / "out2", intermediate_dir=inter, progress=False)
    assert (inter / "ta" / "config.json").is_file() and not (inter / "soup").exists()
    (inter / "ta" / "config.json").unlink()
    # QA: with --overwrite, a final output folder of other work was refused only after the earlier merges had run
    with pytest.raises(OutputExistsError, match="holds other files"):
        safemerge.multimerge(cfg, out, intermediate_dir=inter, progress=False, overwrite=True)
    assert (out / "keep.txt").read_text() == "someone else's" and not (inter / "soup").exists()


def test_merge_of_a_multi_stage_file_points_to_multimerge(tiny_family, tmp_path):
    cfg = _write(tmp_path / "multi.yml", *_docs(tiny_family))
    with pytest.raises(ConfigError, match="holds 3 merge configs .*safemerge multimerge"):
        safemerge.merge(cfg, tmp_path / "out", progress=False)


def test_the_multimerge_command(tiny_family, tmp_path):
    cfg = _write(tmp_path / "multi.yml", *_docs(tiny_family))
    args = ["multimerge", str(cfg), "-I", str(tmp_path / "inter"), "--out-path", str(tmp_path / "out"), "--no-progress"]
    res = CliRunner().invoke(app, args + ["--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["made"] == ["soup", "ta", "the final merge"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "3/3 the final merge: kept" in res.stdout and "0 made, 3 kept" in res.stdout
    res = CliRunner().invoke(app, args + ["--no-lazy", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["made"] == ["soup", "ta", "the final merge"]
    res = CliRunner().invoke(app, ["multimerge", str(cfg), "-I", str(tmp_path / "inter2")])
    assert res.exit_code != 0 and "--out-path" in res.output


def test_slices_read_intermediate_merges_and_reruns_keep_them(tiny_family, tmp_path):
    """A slice source or slice base that names an earlier merge (not there when the file is read): a whole-stack
    slice reads as `models` once the merge exists, as it does by hand, so a rerun keeps every stage."""
    _, soup, _ = _docs(tiny_family)
    whole = {"name": "whole", "merge_method": "slerp", "dtype": "float32", "parameters": {"t": 0.3},
             "slices": [{"base_model": "soup", "sources": [{"model": "soup", "layer_range": [0, 3]},
                                                           {"model": str(tiny_family["expert"]), "layer_range": [0, 3]}]}]}
    stack = {"merge_method": "passthrough", "dtype": "float32",
             "slices": [{"sources": [{"model": "whole", "layer_range": [0, 2]}]},
                        {"sources": [{"model": "soup", "layer_range": [1, 3]}]}]}
    cfg, out, inter = _write(tmp_path / "multi.yml", stack, whole, soup), tmp_path / "out", tmp_path / "inter"
    assert safemerge.multimerge(cfg, out, intermediate_dir=inter, progress=False).made == ["soup", "whole", "the final merge"]
    by_hand = tmp_path / "whole-by-hand"
    safemerge.merge({"merge_method": "slerp", "dtype": "float32", "base_model": str(inter / "soup"), "parameters": {"t": 0.3},
                     "models": [{"model": str(inter / "soup")}, {"model": str(tiny_family["expert"])}]}, by_hand, progress=False)
    want, got = _tensors(by_hand), _tensors(inter / "whole")
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)
    final, soup_t = _tensors(out), _tensors(inter / "soup")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    assert (final["model.layers.1.mlp.up_proj.weight"] == got["model.layers.1.mlp.up_proj.weight"]).all()
    assert (final["model.layers.3.mlp.up_proj.weight"] == soup_t["model.layers.2.mlp.up_proj.weight"]).all()
    assert safemerge.multimerge(cfg, out, intermediate_dir=inter, progress=False).kept == ["soup", "whole", "the final merge"]


def test_a_merge_read_only_as_tokenizer_source_and_edited_tokenizer_files_are_inputs(tiny_family, tmp_path):
    """What a merge depends on besides its config is in the record: a merge it reads only as `tokenizer_source`
    (remade in a run that stopped before the final merge), and an input's tokenizer files edited in place."""
    final, soup, _ = _docs(tiny_family)
    final = dict(final, tokenizer_source="soup", models=[{"model": str(tiny_family["aligned"]), "parameters": {"weight": 1.0}}])
    cfg, out, inter = tmp_path / "multi.yml", tmp_path / "out", tmp_path / "inter"
    _write(cfg, final, soup)
    safemerge.multimerge(cfg, out, intermediate_dir=inter, progress=False)
    _write(cfg, final, dict(soup, chat_template="chatml"))  # the soup's tokenizer files change, and so the final's

    def stop_before_the_final_merge(line):
        if line.startswith("2/2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        safemerge.multimerge(cfg, out, intermediate_dir=inter, progress=False, report=stop_before_the_final_merge)
    assert safemerge.multimerge(cfg, out, intermediate_dir=inter, progress=False).made == ["the final merge"]
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()
    tok = tiny_family["aligned"] / "tokenizer_config.json"
    before = tok.read_text()
    try:
        tok.write_text(before.replace("{", '{"model_max_length": 4096, ', 1))
        r = safemerge.multimerge(cfg, out, intermediate_dir=inter, progress=False)
    finally:
        tok.write_text(before)
    assert r.made == ["soup", "the final merge"]


def test_a_tokens_row_from_an_earlier_merge(tiny_family, tmp_path):
    _, soup, _ = _docs(tiny_family)
    final = {"merge_method": "linear", "dtype": "float32",
             "models": [{"model": "soup", "parameters": {"weight": 0.5}},
                        {"model": str(tiny_family["base"]), "parameters": {"weight": 0.5}}],
             "tokenizer": {"source": "base", "tokens": {"<|end|>": {"source": "soup", "force": True}}}}
    cfg, out = _write(tmp_path / "multi.yml", final, soup), tmp_path / "out"
    safemerge.multimerge(cfg, out, intermediate_dir=tmp_path / "inter", progress=False)
    end = json.loads((tiny_family["base"] / "tokenizer.json").read_text())["model"]["vocab"]["<|end|>"]
    got, soup_t = _tensors(out), _tensors(tmp_path / "inter" / "soup")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(got[name][end], soup_t[name][end])  # forced: both models take the soup's row


def test_processor_template_and_code_files_of_an_input_are_inputs_too(tiny_family, tmp_path):
    """Review: a rerun kept a merge whose tokenizer source had since gained a processor config or a named chat
    template, which a plain merge copies."""
    import shutil

    aligned = shutil.copytree(tiny_family["aligned"], tmp_path / "aligned")
    fam = dict(tiny_family, aligned=aligned)
    _, soup, _ = _docs(fam)
    soup = dict(soup, tokenizer_source=str(aligned))
    final = {"merge_method": "linear", "dtype": "float32", "models": [{"model": "soup", "parameters": {"weight": 1.0}}]}
    cfg, out, inter = tmp_path / "multi.yml", tmp_path / "out", tmp_path / "inter"
    _write(cfg, final, soup)
    safemerge.multimerge(cfg, out, intermediate_dir=inter, progress=False)
    for name, text in (("processor_config.json", '{"processor_class": "X"}'),
                       ("additional_chat_templates/tool_use.jinja", "TOOL")):
        (aligned / name).parent.mkdir(exist_ok=True)
        (aligned / name).write_text(text)
        assert safemerge.multimerge(cfg, out, intermediate_dir=inter, progress=False).made == ["soup", "the final merge"]
        assert (inter / "soup" / name).read_text() == text
