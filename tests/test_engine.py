"""The streaming engine end to end on tiny checkpoints: complete HF outputs, and bad input refused."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
import yaml

import safemerge
from safemerge.checkpoint import Checkpoint
from safemerge.errors import CheckpointError, ConfigError, OutputExistsError
from safemerge.layout import position
from safemerge.methods import slerp_merge
from tiny import make_family


def ta_config(fam, **over):
    return {"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
            "models": [{"model": str(fam["expert"]), "parameters": {"weight": 1.0}},
                       {"model": str(fam["aligned"]), "parameters": {"weight": 1.0}}], **over}


def test_mergealign_output_is_a_complete_hf_model(tmp_path, tiny_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = safemerge.mergealign(base=tiny_family["base"], domains=[tiny_family["expert"]], aligned=tiny_family["aligned"],
                               out=tmp_path / "ma", progress=False)
    o, b, e, a = (Checkpoint(p) for p in (out, tiny_family["base"], tiny_family["expert"], tiny_family["aligned"]))
    for name in b.names():
        torch.testing.assert_close(o.get(name), e.get(name) + a.get(name) - b.get(name), atol=1e-6, rtol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{"role": "user", "content": "the capital"}], tokenize=False,
                                   add_generation_prompt=True).endswith("<|assistant|>")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in front and {"merge", "safemerge"} <= set(front["tags"])  # a local path: in the inputs
    for ck in (b, e, a):
        assert ck.fingerprint() in card
    again = safemerge.load_config(out / "mergekit_config.yml")
    assert again.merge_method == "task_arithmetic" and [m.parameters["weight"] for m in again.models] == [1.0, 1.0]
    assert (out / "generation_config.json").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_chunked_sharded_bf16_output_matches_whole_tensor_merge(tmp_path, tiny_family):
    cfg = ta_config(tiny_family, out_dtype="bfloat16")
    whole = safemerge.merge(cfg, tmp_path / "whole", progress=False)
    chunked = safemerge.merge(cfg, tmp_path / "chunked", chunk_elements=100, max_shard_size=20_000, progress=False)
    assert (chunked / "model.safetensors.index.json").exists() and len(list(chunked.glob("*.safetensors"))) > 2
    w, c = Checkpoint(whole), Checkpoint(chunked)
    assert sorted(w.names()) == sorted(c.names())
    for n in w.names():
        assert c.dtype(n) == torch.bfloat16
        assert torch.equal(w.get(n), c.get(n)), n
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(chunked).dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_parallel_workers_write_the_same_tensors(tmp_path, tiny_family, method):
    """Several compute threads merge different tensors at once; the output is the same, in order."""
    params = {} if method == "task_arithmetic" else {"parameters": {"density": 0.5}}
    cfg = ta_config(tiny_family, merge_method=method, seed=1, **params)
    threads = torch.get_num_threads()
    one = Checkpoint(safemerge.merge(cfg, tmp_path / "one", workers=1, chunk_elements=300, progress=False))
    many = Checkpoint(safemerge.merge(cfg, tmp_path / "many", workers=3, chunk_elements=300, max_shard_size=30_000,
                                      progress=False))
    assert torch.get_num_threads() == threads  # restored after the merge
    assert list(many.names()) == list(one.names())
    for n in one.names():
        assert torch.equal(one.get(n), many.get(n)), n


def test_a_failing_worker_stops_the_merge_and_leaves_nothing(tmp_path, tiny_family, monkeypatch):
    import safemerge.engine as engine

    calls = []

    def broken(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom in a worker")
        return real(*a, **k)

    real = engine.merge_tensor
    monkeypatch.setattr(engine, "merge_tensor", broken)
    with pytest.raises(RuntimeError, match="boom in a worker"):
        safemerge.merge(ta_config(tiny_family), tmp_path / "x", workers=2, progress=False)
    assert not (tmp_path / "x").exists()


def test_slerp_gradient_uses_layer_positions(tmp_path, tiny_family):
    grad = [0, 0.5, 1, 0.5, 0]
    cfg = {"merge_method": "slerp", "base_model": str(tiny_family["base"]),
           "models": [{"model": str(tiny_family["base"])}, {"model": str(tiny_family["expert"])}],
           "parameters": {"t": grad}}
    out = Checkpoint(safemerge.merge(cfg, tmp_path / "s", progress=False))
    b, e = Checkpoint(tiny_family["base"]), Checkpoint(tiny_family["expert"])
    for name in ("model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight", "lm_head.weight"):
        t = safemerge.config.resolve(grad, tensor=name, t=position(name, 3))
        torch.testing.assert_close(out.get(name), slerp_merge(b.get(name), e.get(name), t=t))
    torch.testing.assert_close(out.get("model.layers.1.mlp.up_proj.weight"), e.get("model.layers.1.mlp.up_proj.weight"))


def test_dare_is_seeded_per_tensor(tmp_path, tiny_family):
    cfg = ta_config(tiny_family, merge_method="dare_ties", parameters={"density": 0.5}, seed=3)
    a = Checkpoint(safemerge.merge(cfg, tmp_path / "a", progress=False))
    b = Checkpoint(safemerge.merge(cfg, tmp_path / "b", progress=False))
    c = Checkpoint(safemerge.merge({**cfg, "seed": 4}, tmp_path / "c", progress=False))
    n = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a.get(n), b.get(n)) and not torch.equal(a.get(n), c.get(n))


def test_tied_embeddings_and_gpt2_layout(tmp_path):
    fam = make_family(tmp_path / "tied", tie=True)
    out = Checkpoint(safemerge.merge(ta_config(fam), tmp_path / "o", progress=False))
    assert "lm_head.weight" not in out.names()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2, n_positions=32)
    paths = {}
    base = GPT2LMHeadModel(cfg)
    for i, name in enumerate(["base", "expert"]):
        m = GPT2LMHeadModel(cfg)
        m.load_state_dict(base.state_dict())
        if i:
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.1 * torch.randn_like(p))
        paths[name] = tmp_path / f"gpt2-{name}"
        m.save_pretrained(paths[name])
    cfg = {"merge_method": "slerp", "base_model": str(paths["base"]),
           "models": [{"model": str(paths["base"])}, {"model": str(paths["expert"])}], "parameters": {"t": [0, 1]}}
    out = Checkpoint(safemerge.merge(cfg, tmp_path / "g", progress=False))
    b, e = Checkpoint(paths["base"]), Checkpoint(paths["expert"])
    torch.testing.assert_close(out.get("transformer.h.0.attn.c_attn.weight"), b.get("transformer.h.0.attn.c_attn.weight"))
    torch.testing.assert_close(out.get("transformer.h.2.attn.c_attn.weight"), e.get("transformer.h.2.attn.c_attn.weight"))
    torch.testing.assert_close(out.get("transformer.wte.weight"), b.get("transformer.wte.weight"))  # t = 0 before the stack
    torch.testing.assert_close(out.get("transformer.ln_f.weight"), b.get("transformer.ln_f.weight"))  # and after it (mergekit)


def test_a_tied_base_says_it_leaves_an_untied_experts_output_layer_out(tmp_path):
    """A tied base (no lm_head.weight) merged with an untied expert: the output ties too, and the expert's trained
    head is left out; that was silent."""
    tied = make_family(tmp_path / "tied", tie=True, names=("base",))
    untied = make_family(tmp_path / "untied", tie=False, names=("expert",))
    cfg = {"merge_method": "task_arithmetic", "base_model": str(tied["base"]),
           "models": [{"model": str(untied["expert"]), "parameters": {"weight": 1.0}}]}
    with pytest.warns(UserWarning, match=r"expert: its own 'lm_head.weight' is left out: .* ties its output layer"):
        out = Checkpoint(safemerge.merge(cfg, tmp_path / "o", progress=False))
    assert "lm_head.weight" not in out.names()
    with warnings.catch_warnings():  # tied on both sides: nothing is left out, nothing is said
        warnings.simplefilter("error")
        safemerge.merge(ta_config(make_family(tmp_path / "both", tie=True)), tmp_path / "p", progress=False)


@pytest.mark.parametrize("broken, text", [("tokenizer_config.json", '{"a": '), ("special_tokens_map.json", "[1, 2]"),
                                          ("generation_config.json", "not json")])
def test_a_broken_side_file_to_copy_is_named_before_the_merge(tiny_family, tmp_path, monkeypatch, broken, text):
    """Not a traceback after every tensor is merged (writing a chat template into tokenizer_config.json), nor a copy
    that transformers cannot read."""
    import shutil

    import safemerge.engine as engine

    src = shutil.copytree(tiny_family["aligned"], tmp_path / "tok")
    (src / broken).write_text(text)
    monkeypatch.setattr(engine, "_stream", lambda *a, **k: pytest.fail("merged before the check"))
    with pytest.raises(CheckpointError, match=rf"tok/{broken}: (is not valid JSON|holds a JSON list)"):
        safemerge.merge(ta_config(tiny_family, tokenizer_source=str(src), chat_template="chatml"), tmp_path / "out",
                        progress=False)
    assert not (tmp_path / "out").exists()


def test_the_generation_config_goes_with_the_tokenizer_and_template(tiny_family, tmp_path):
    """MergeAlign speaks the aligned model's chat template; its EOS ids (the end-of-turn token) must come along, not
    the pretrained base's."""
    import shutil

    fam = {k: tmp_path / k for k in tiny_family}
    for k, v in tiny_family.items():
        shutil.copytree(v, fam[k])
    (fam["aligned"] / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2], "temperature": 0.6}))
    out = safemerge.mergealign(base=fam["base"], domains=[fam["expert"]], aligned=fam["aligned"], out=tmp_path / "ma",
                               progress=False)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, 2]
    merged = safemerge.merge(ta_config(fam), tmp_path / "ta", progress=False)  # no tokenizer_source: the base's
    assert json.loads((merged / "generation_config.json").read_text()) == \
        json.loads((fam["base"] / "generation_config.json").read_text())


def test_processors_named_templates_and_custom_code_come_along(tiny_family, tmp_path):
    """Review: the output lost a multimodal model's processor_config.json (AutoProcessor failed), its named chat
    templates (apply_chat_template(chat_template="tool_use") rendered the name itself) and the modules config.json's
    auto_map names (trust_remote_code could not load it)."""
    import shutil

    fam = {k: tmp_path / k for k in tiny_family}
    for k, v in tiny_family.items():
        shutil.copytree(v, fam[k])
    base = fam["base"]
    (base / "processor_config.json").write_text('{"processor_class": "LlavaProcessor"}')
    (base / "additional_chat_templates").mkdir()
    (base / "additional_chat_templates" / "tool_use.jinja").write_text("TOOL {{ messages[0].content }}")
    (base / "configuration_tiny.py").write_text("# custom code\nfrom .helpers_tiny import X\n")
    (base / "helpers_tiny.py").write_text("X = 1\n")  # imported by the module auto_map names
    (tmp_path / "evil.py").write_text("# outside the model\n")
    cfg = json.loads((base / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_tiny.TinyConfig", "AutoModel": "other/repo--modeling_x.X",
                       "AutoTokenizer": ["../evil.Tok", None]}
    (base / "config.json").write_text(json.dumps(cfg))
    out = safemerge.merge(ta_config(fam), tmp_path / "out", progress=False)
    assert (out / "processor_config.json").read_text() == (base / "processor_config.json").read_text()
    assert (out / "additional_chat_templates" / "tool_use.jinja").is_file()
    assert (out / "configuration_tiny.py").read_text().startswith("# custom code") and (out / "helpers_tiny.py").is_file()
    assert not (out / "evil.py").exists() and not (out / "modeling_x.py").exists()  # never a path out, nor another repo's
    (base / "processor_config.json").write_text("[1]")  # copied, so checked before the merge like the tokenizer files
    with pytest.raises(CheckpointError, match="processor_config.json: holds a JSON list"):
        safemerge.merge(ta_config(fam), tmp_path / "bad", progress=False)


def test_a_mixed_dtype_base_keeps_its_configs_dtype(tiny_family_bf16, tmp_path):
    """A bf16 model with float32 norms: the output's tensors keep their dtypes, and config.json said float32, so
    transformers' dtype="auto" loaded the whole model in float32."""
    import shutil

    from safetensors.torch import load_file, save_file

    fam = {k: tmp_path / k for k in tiny_family_bf16}
    for k, v in tiny_family_bf16.items():
        shutil.copytree(v, fam[k])
        f = fam[k] / "model.safetensors"
        tensors = {n: (t.float() if "norm" in n else t) for n, t in load_file(f).items()}
        save_file(tensors, f, metadata={"format": "pt"})
    out = safemerge.merge(ta_config(fam), tmp_path / "o", progress=False)
    c = Checkpoint(out)
    assert {str(c.dtype(n)) for n in c.names()} == {"torch.bfloat16", "torch.float32"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_the_output_dtype_is_written_into_a_multimodal_configs_sub_configs(tiny_family, tmp_path):
    """write_config set only the top-level dtype, so a text_config / vision_config kept saying float32 over bf16
    weights; other nested settings (quantization_config, rope_scaling) are left as they were."""
    import shutil

    fam = {k: tmp_path / k for k in tiny_family}
    for k, v in tiny_family.items():
        shutil.copytree(v, fam[k])
        cfg = json.loads((fam[k] / "config.json").read_text())
        cfg.update(text_config={"dtype": "float32", "hidden_size": 8}, vision_config={"torch_dtype": "float32"},
                   rope_scaling={"dtype": "kept"})
        (fam[k] / "config.json").write_text(json.dumps(cfg))
    out = safemerge.merge(ta_config(fam, dtype="bfloat16"), tmp_path / "o", progress=False)
    written = json.loads((out / "config.json").read_text())
    assert written["dtype"] == "bfloat16" and written["text_config"] == {"dtype": "bfloat16", "hidden_size": 8}
    assert written["vision_config"] == {"torch_dtype": "bfloat16"} and written["rope_scaling"] == {"dtype": "kept"}


def test_quantized_checkpoints_are_refused_and_integer_tensors_named(tiny_family, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    fam = {k: tmp_path / k for k in tiny_family}
    for k, v in tiny_family.items():
        shutil.copytree(v, fam[k])
    cfg_file = fam["expert"] / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ConfigError, match=r"expert: a gptq checkpoint \(config.json has quantization_config\)"):
        safemerge.merge(ta_config(fam), tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()
    shutil.rmtree(fam["expert"])
    shutil.copytree(tiny_family["expert"], fam["expert"])
    f = fam["base"] / "model.safetensors"
    save_file({**load_file(f), "model.layers.0.self_attn.q_proj.g_idx": torch.zeros(4, dtype=torch.int32)}, f,
              metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"1 non-floating-point tensor\(s\) are left out .*g_idx', int32"):
        safemerge.merge(ta_config(fam), tmp_path / "i", progress=False)


# -- bad input --------------------------------------------------------------------------------------
def assert_nothing_written(tmp_path, out):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}")]


def test_missing_tensor_is_named(tmp_path, tiny_family):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(tiny_family["expert"], broken)
    sd = load_file(broken / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, broken / "model.safetensors")
    fam = dict(tiny_family, expert=broken)
    with pytest.raises(CheckpointError, match=r"broken.*model.layers.1.mlp.down_proj.weight.*missing"):
        safemerge.merge(ta_config(fam), tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_vocab_mismatch_says_so(tmp_path, tiny_family):
    other = make_family(tmp_path / "v", names=("expert",), vocab=80)
    with pytest.raises(CheckpointError, match="different vocabularies; set `tokenizer_source: base`"):
        safemerge.merge(ta_config(dict(tiny_family, expert=other["expert"])), tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_a_different_hidden_size_is_not_called_a_vocabulary_difference(tmp_path, tiny_family):
    """QA: an expert of another width got "different vocabularies; set `tokenizer_source: base`", even with it set."""
    from tiny import llama_config
    from transformers import LlamaForCausalLM

    wide = tmp_path / "wide"
    LlamaForCausalLM(llama_config(hidden=48)).save_pretrained(wide)
    for over in ({}, {"tokenizer_source": "base"}):
        with pytest.raises(CheckpointError, match=r"has shape \[64, 48\].*differ in more than their vocabularies"):
            safemerge.merge(ta_config(dict(tiny_family, expert=wide), **over), tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_nonfinite_input_fails_unless_allowed(tmp_path, tiny_family):
    from safetensors.torch import load_file, save_file
    import shutil

    bad = tmp_path / "nan"
    shutil.copytree(tiny_family["expert"], bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.2.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(sd, bad / "model.safetensors")
    cfg = ta_config(dict(tiny_family, expert=bad))
    with pytest.raises(CheckpointError, match=r"nan.*q_proj.*NaN or Inf.*--allow-nonfinite"):
        safemerge.merge(cfg, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path, tmp_path / "out")
    with pytest.warns(UserWarning, match="NaN or Inf"):
        safemerge.merge(cfg, tmp_path / "out", allow_nonfinite=True, progress=False)


def test_a_merge_that_overflows_its_dtype_fails_unless_allowed(tmp_path, tiny_family):
    """Finite inputs, but weights so large that the output is Inf: an error naming the tensor, not a broken model."""
    cfg = ta_config(tiny_family)
    cfg["models"][0]["parameters"]["weight"] = 1e39
    with pytest.raises(CheckpointError, match=r"tensor '.*': the merge gives NaN or Inf in torch.float32.*--allow-nonfinite"):
        safemerge.merge(cfg, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path, tmp_path / "out")
    safemerge.merge(cfg, tmp_path / "out", allow_nonfinite=True, progress=False)  # written when asked for


def test_existing_output_needs_overwrite(tmp_path, tiny_family):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("precious")
    with pytest.raises(OutputExistsError):
        safemerge.merge(ta_config(tiny_family), tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep").read_text() == "precious"
    with pytest.raises(OutputExistsError, match=r"holds other files \(keep\) and none that safemerge writes"):
        safemerge.merge(ta_config(tiny_family), tmp_path / "out", overwrite=True, progress=False)  # not an output
    assert (tmp_path / "out" / "keep").read_text() == "precious"
    (tmp_path / "out" / "config.json").write_text('{"model_type": "llama"}')  # an earlier merge's folder: replaced whole
    safemerge.merge(ta_config(tiny_family), tmp_path / "out", overwrite=True, progress=False)
    assert not (tmp_path / "out" / "keep").exists() and (tmp_path / "out" / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_checkpoint_stored_without_its_prefix_merges_with_its_fine_tunes(tmp_path):
    """Review: the hub's gpt2 stores `h.0.attn.c_attn.weight`, a fine-tune saved by save_pretrained
    `transformer.h.0.attn.c_attn.weight`: merging the two failed ('wpe.weight' is missing: the models must share one
    architecture), as did their L2 distance; mergekit merges them. Tensors are read under from_pretrained's names."""
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from safemerge.evaluate import similarity

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "hub")
    fine = GPT2LMHeadModel.from_pretrained(tmp_path / "hub")
    with torch.no_grad():
        fine.transformer.h[0].attn.c_attn.weight.add_(0.1)
        fine.transformer.wte.weight.add_(0.05)
    fine.save_pretrained(tmp_path / "fine")
    weights = tmp_path / "hub" / "model.safetensors"
    save_file({k.removeprefix("transformer."): v.contiguous() for k, v in load_file(weights).items()}, weights,
              metadata={"format": "pt"})
    assert "wpe.weight" in load_file(weights)
    hub, want = Checkpoint(tmp_path / "hub"), Checkpoint(tmp_path / "fine")
    assert sorted(hub.names()) == sorted(want.names())
    config = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "hub"),
              "models": [{"model": str(tmp_path / "fine"), "parameters": {"weight": 1.0}}]}
    safemerge.merge(config, tmp_path / "out", progress=False)
    out = Checkpoint(tmp_path / "out")
    for name in want.names():
        torch.testing.assert_close(out.get(name), want.get(name), rtol=0, atol=1e-6, msg=name)
    assert similarity([tmp_path / "hub", tmp_path / "fine"])["pairs"][0]["l2"] > 0
    # review: bare weights (no config.json to say their architecture) stored as the hub's are read as it is
    (tmp_path / "bare").mkdir()
    save_file({k.removeprefix("transformer."): v.contiguous() for k, v in load_file(tmp_path / "fine" / "model.safetensors").items()},
              tmp_path / "bare" / "model.safetensors", metadata={"format": "pt"})
    config["models"][0]["model"] = str(tmp_path / "bare" / "model.safetensors")
    safemerge.merge(config, tmp_path / "out2", progress=False)
    out = Checkpoint(tmp_path / "out2")
    for name in want.names():
        torch.testing.assert_close(out.get(name), want.get(name), rtol=0, atol=1e-6, msg=name)
    assert similarity([tmp_path / "hub", tmp_path / "bare" / "model.safetensors"])["pairs"][0]["l2"] > 0
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(loaded.transformer.h[0].attn.c_attn.weight, fine.transformer.h[0].attn.c_attn.weight)


def test_reading_a_prefixed_checkpoint_does_not_import_transformers(tiny_family):
    """The prefix check builds the architecture only where no tensor has a usual prefix: importing transformers costs
    a merge seconds."""
    code = (f"import sys; from safemerge.checkpoint import Checkpoint; c = Checkpoint({str(tiny_family['base'])!r}); "
            "assert c.names() and 'transformers' not in sys.modules, sorted(c.names())[:3]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_overwrite_never_turns_a_file_into_the_output_folder(tmp_path, tiny_family):
    (tmp_path / "out").write_text("a file where the model goes")
    with pytest.raises(OutputExistsError, match="is a file, and the output is a folder"):
        safemerge.merge(ta_config(tiny_family), tmp_path / "out", overwrite=True, progress=False)
    assert (tmp_path / "out").read_text() == "a file where the model goes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_output_under_a_file_is_a_clear_error(tmp_path, tiny_family):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputExistsError, match=r"is a file, so nothing can be written under it"):
        safemerge.merge(ta_config(tiny_family), tmp_path / "f" / "out", progress=False)


@pytest.mark.parametrize("where", ["expert", "expert/sub", "."])
def test_the_output_never_replaces_or_nests_with_an_input(tmp_path, tiny_family, where):
    """With --overwrite an output at an input's path would replace the model being read."""
    import shutil

    fam = {k: shutil.copytree(v, tmp_path / "pool" / k) for k, v in tiny_family.items() if k in ("base", "expert", "aligned")}
    before = (fam["expert"] / "model.safetensors").read_bytes()
    out = tmp_path / "pool" / where
    how = {"expert": "is", "expert/sub": "is inside", ".": "contains"}[where]
    with pytest.raises(ConfigError, match=f"the output {how} the input model"):
        safemerge.merge(ta_config(fam), out, overwrite=True, progress=False)
    assert (fam["expert"] / "model.safetensors").read_bytes() == before
    assert not (fam["expert"] / "sub").exists()


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "mps"])
def test_an_unknown_device_is_a_clear_error(tmp_path, tiny_family, device):
    with pytest.raises(ConfigError, match=f"device '{device}': merging computes on cpu or cuda"):
        safemerge.merge(ta_config(tiny_family), tmp_path / "out", device=device, progress=False)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_a_density_too_small_for_a_tensor_keeps_one_element_as_mergekit(tmp_path, tiny_family):
    cfg = ta_config(tiny_family, merge_method="ties")
    for m in cfg["models"]:
        m["parameters"]["density"] = 0.01  # int(0.01 · 32) = 0 for a 32-element norm weight: mergekit keeps 1
    out = safemerge.merge(cfg, tmp_path / "out", progress=False)
    o, b = Checkpoint(out), Checkpoint(tiny_family["base"])
    norm = next(n for n in b.names() if n.endswith("norm.weight"))
    changed = int((o.get(norm) != b.get(norm)).sum())
    assert 1 <= changed <= 2  # one kept element per model (two when they keep different ones)


def test_a_base_without_tokenizer_warns_and_names_a_model_that_has_one(tmp_path, tiny_family):
    import shutil

    base = shutil.copytree(tiny_family["base"], tmp_path / "base")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (base / f).unlink()
    with pytest.warns(UserWarning, match=rf"base has no tokenizer files.*tokenizer_source: {tiny_family['expert']}"):
        safemerge.merge(ta_config(dict(tiny_family, base=base)), tmp_path / "out", progress=False)


def test_a_tensor_only_one_input_has_is_named_in_a_warning(tmp_path, tiny_family):
    import shutil

    from safetensors.torch import load_file, save_file

    extra = shutil.copytree(tiny_family["expert"], tmp_path / "extra")
    sd = load_file(extra / "model.safetensors")
    sd["model.extra_head.weight"] = torch.zeros(4, 4)
    save_file(sd, extra / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"extra: 1 tensor\(s\) that .* lacks are left out of the merge \(e.g. 'model.extra_head.weight'\)"):
        out = safemerge.merge(ta_config(dict(tiny_family, expert=extra)), tmp_path / "out", progress=False)
    assert "model.extra_head.weight" not in Checkpoint(out).names()


def test_empty_and_scalar_tensors_are_merged(tmp_path):
    from safetensors.torch import save_file

    for name, scale in (("base", 0.0), ("expert", 1.0)):
        (tmp_path / name).mkdir()
        save_file({"e": torch.zeros(0, 4), "s": torch.tensor(1.0 + scale), "w": torch.ones(2, 3) * scale},
                  tmp_path / name / "model.safetensors")
    cfg = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
           "models": [{"model": str(tmp_path / "expert"), "parameters": {"weight": 0.5}}]}
    out = Checkpoint(safemerge.merge(cfg, tmp_path / "out", progress=False))
    assert out.get("e").shape == (0, 4) and float(out.get("s")) == 1.5
    torch.testing.assert_close(out.get("w"), torch.full((2, 3), 0.5))


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, tiny_family):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="no CUDA device"):
        safemerge.merge(ta_config(tiny_family), tmp_path / "out", device="cuda", progress=False)


SLOW_MERGE = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a runner started in the background (`cmd &`) ignores SIGINT
import safemerge.methods.task_arithmetic as ta
from safemerge.methods import METHODS
from dataclasses import replace
orig = METHODS["task_arithmetic"]
def slow(*a, **k):
    time.sleep(0.2)
    return orig.fn(*a, **k)
METHODS["task_arithmetic"] = replace(orig, fn=slow)
import safemerge
safemerge.merge(sys.argv[1], sys.argv[2], progress=False, max_shard_size=10_000)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_merge_leaves_nothing_at_the_target(tmp_path, tiny_family, sig):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(ta_config(tiny_family)))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, str(cfg), str(out)])
    deadline = time.time() + 60
    while not any(p.name.startswith(".out.partial") and any(p.glob("*.safetensors")) for p in tmp_path.iterdir()):
        assert time.time() < deadline and proc.poll() is None, "merge did not start"
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize("value, rendered", [
    ("chatml", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
    ("llama3", "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("alpaca", "### Instruction:\nhi\n\n### Response:\n"),
    ("mistral", "[INST] hi [/INST]"),
    ("exaone", "[|system|][|endofturn|]\n[|user|]hi\n[|assistant|]"),
    ("{% for m in messages %}[{{ m['content'] }}]{% endfor %}", "[hi]"),
])
def test_chat_template_names_and_texts_as_mergekit_reads_them(tmp_path, tiny_family, value, rendered):
    from transformers import AutoTokenizer

    out = safemerge.merge(ta_config(tiny_family, chat_template=value), tmp_path / "out", progress=False)
    text = AutoTokenizer.from_pretrained(out).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                                  add_generation_prompt=True)
    assert text.endswith(rendered)


def test_the_alpaca_template_has_mergekits_turns():
    """Review: safemerge's alpaca dropped user_context turns (mergekit: '### Input:') and wrote every system message
    where it stood (mergekit: the last one, first)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from safemerge.chat_templates import BUILT_IN

    chat = [{"role": "system", "content": "S1"}, {"role": "user", "content": "Q "}, {"role": "user_context", "content": "ctx"},
            {"role": "assistant", "content": "A"}, {"role": "system", "content": "S2"}, {"role": "user", "content": "Q2"}]
    text = render_jinja_template(conversations=[chat], chat_template=BUILT_IN["alpaca"], add_generation_prompt=True,
                                 eos_token="</s>", bos_token="<s>")[0][0]
    assert text == ("S2\n\n### Instruction:\nQ\n\n### Input:\nctx\n\n### Response:\nA</s>\n\n### Instruction:\nQ2"
                    "\n\n### Response:\n")


def test_chat_template_auto_takes_the_inputs_own_and_bad_names_are_refused(tmp_path, tiny_family):
    from safemerge.evaluate.loading import chat_template_text

    out = safemerge.merge(ta_config(tiny_family, chat_template="auto"), tmp_path / "auto", progress=False)
    assert chat_template_text(out).strip() == chat_template_text(tiny_family["aligned"]).strip()
    for bad, words in (("chatm", "neither a built-in template (alpaca, chatml, exaone, llama3, mistral)"), ("{% for %}", "not a valid Jinja")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            safemerge.merge(ta_config(tiny_family, chat_template=bad), tmp_path / "bad", progress=False)
        assert not (tmp_path / "bad").exists()


def test_a_base_without_config_json_is_pointed_out(tmp_path, tiny_family):
    """QA: the output's config.json was {"dtype": ...} alone, which no loader can use, and nothing said so."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_family["base"], base)
    (base / "config.json").unlink()
    with pytest.warns(UserWarning, match=r"base: has no config.json \(or one without model_type\); the output's config.json is "
                                          r".*expert's"):  # (QA of the Python API: it wrote {"dtype": ...} alone)
        safemerge.merge(ta_config({**tiny_family, "base": base}), tmp_path / "out", progress=False)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written == {**json.loads((tiny_family["expert"] / "config.json").read_text()), "dtype": written["dtype"]}
    expert = tmp_path / "expert"  # no input with a config.json: said so
    shutil.copytree(tiny_family["expert"], expert)
    (expert / "config.json").unlink()
    with pytest.warns(UserWarning, match=r"base: has no config.json, so the merged folder will hold weights that "
                                          "transformers cannot load"):
        safemerge.merge(ta_config({**tiny_family, "base": base}, models=[{"model": str(expert), "parameters": {"weight": 1.0}}]),
                        tmp_path / "out3", progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        safemerge.merge(ta_config(tiny_family), tmp_path / "out2", progress=False)  # with one: nothing to say


def test_the_card_names_a_hub_base_model_but_not_a_local_path(tmp_path):
    """QA (a new user's publish --dry-run): the card's front matter said `base_model: /tmp/walk/tb/base`; the hub reads
    that field as a model id."""
    from safemerge.writer import write_model_card

    for base, front in (("/models/llama3-8b", None), ("meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B")):
        write_model_card(tmp_path, base_model=base, merge_config={}, inputs=[{"model": base, "fingerprint": "f"}])
        meta = yaml.safe_load((tmp_path / "README.md").read_text().split("---")[1])
        assert meta.get("base_model") == front and f"`{base}`" in (tmp_path / "README.md").read_text()
