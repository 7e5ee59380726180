"""`model+adapter` references: a LoRA adapter merged in tensor by tensor, equal to peft's merge_and_unload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import safemerge
from safemerge.errors import CheckpointError, ConfigError
from safemerge.lora import LoraCheckpoint, open_model
from tiny import make_family


def _adapter(model_dir: Path, out: Path, *, dtype=torch.float32, seed: int = 0, **lora) -> Path:
    """A LoRA adapter of `model_dir` with random (non-zero) B matrices, saved with peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj", "embed_tokens"],
                "modules_to_save": ["lm_head"], **lora}
    peft_model = get_peft_model(model, LoraConfig(**settings))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:  # peft starts B (embeddings: A) at zero
                p.normal_(std=0.1)
            if "modules_to_save" in name:
                p.add_(0.05)
    with pytest.warns(UserWarning) if "embed_tokens" in settings["target_modules"] else _nothing():
        peft_model.save_pretrained(out)
    return out


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _peft_merged(model_dir: Path, adapter: Path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    fam = make_family(root / "fam")
    return fam, _adapter(fam["base"], root / "adapter")


def test_evaluation_loads_the_reference_as_peft_merges_it(lora_family):
    from safemerge.evaluate.loading import load_model

    fam, adapter = lora_family  # a factored embedding, lm_head saved whole, q_proj and down_proj factored
    model, _ = load_model(fam["base"], adapter=adapter, device="cpu", tokenizer="unused")
    got, want = model.state_dict(), _peft_merged(fam["base"], adapter)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_adapter_is_merged_in_as_peft_merges_it(dtype, lora_family, tiny_family_bf16, tmp_path):
    fam, adapter = lora_family
    base = fam["base"] if dtype == torch.float32 else tiny_family_bf16["base"]
    if dtype == torch.bfloat16:
        adapter = _adapter(base, tmp_path / "adapter-bf16", dtype=dtype, use_rslora=True)
    want = _peft_merged(base, adapter, dtype)
    ckpt = open_model(f"{base}+{adapter}")
    assert isinstance(ckpt, LoraCheckpoint)
    changed = 0
    for name in ckpt.names():
        got = ckpt.get(name)
        assert got.dtype == want[name].dtype, name
        torch.testing.assert_close(got, want[name], rtol=0, atol=1e-6 if dtype == torch.float32 else 0, msg=name)
        changed += not torch.equal(got, open_model(str(base)).get(name))
        rows = got.shape[0] if got.dim() else 0
        if rows > 3:  # a range of rows is the same rows of the whole tensor
            assert torch.equal(ckpt.get_rows(name, 1, 3), got[1:3]), name
    assert changed == 2 * 3 + 2  # q_proj and down_proj in 3 layers, the embeddings, lm_head


def test_a_merge_config_takes_model_plus_adapter_and_relative_paths(lora_family, tmp_path):
    fam, adapter = lora_family
    want = _peft_merged(fam["base"], adapter)
    config = {"merge_method": "task_arithmetic", "base_model": "fam/base",
              "models": [{"model": "fam/base+adapter", "parameters": {"weight": 1.0}}], "dtype": "float32"}
    folder = fam["base"].parent.parent
    (folder / "ta.yml").write_text(yaml.safe_dump(config))
    out = safemerge.merge(str(folder / "ta.yml"), tmp_path / "out", progress=False)
    got = load_file(str(out / "model.safetensors"))
    for name, t in got.items():  # θ_base + 1·(θ_lora − θ_base)
        torch.testing.assert_close(t, want[name], rtol=0, atol=1e-6, msg=name)
    card = (out / "README.md").read_text()
    assert open_model(f"{fam['base']}+{adapter}").fingerprint() in card
    # tokenizer_source may name the reference too (mergekit reads its model's tokenizer); it was "no tokenizer files"
    config["tokenizer_source"] = "fam/base+adapter"
    (folder / "ta.yml").write_text(yaml.safe_dump(config))
    out = safemerge.merge(str(folder / "ta.yml"), tmp_path / "tok", progress=False)
    assert (out / "tokenizer.json").read_bytes() == (fam["base"] / "tokenizer.json").read_bytes()
    got = load_file(str(out / "model.safetensors"))
    for name, t in got.items():
        torch.testing.assert_close(t, want[name], rtol=0, atol=1e-6, msg=name)


def test_mergekits_mapping_form_of_a_reference_reads_as_model_plus_adapter(lora_family, tmp_path):
    """Review: `model: {model: {path: P}, lora: {path: L}}` (what mergekit writes beside override_architecture) was
    'Input should be a valid string'; it is the reference P+L. A revision or override_architecture is named."""
    fam, adapter = lora_family
    folder = fam["base"].parent.parent
    as_text = {"merge_method": "task_arithmetic", "base_model": "fam/base", "dtype": "float32",
               "models": [{"model": "fam/base+adapter", "parameters": {"weight": 1.0}}]}
    as_map = {**as_text, "base_model": {"model": {"path": "fam/base"}},
              "models": [{"model": {"model": {"path": "fam/base", "revision": None}, "lora": {"path": "adapter"}},
                          "parameters": {"weight": 1.0}}]}
    for name, config in (("text", as_text), ("map", as_map)):
        (folder / f"{name}.yml").write_text(yaml.safe_dump(config))
        safemerge.merge(str(folder / f"{name}.yml"), tmp_path / name, progress=False)
    assert (tmp_path / "map" / "model.safetensors").read_bytes() == (tmp_path / "text" / "model.safetensors").read_bytes()
    for bad, words in (({"model": {"path": "fam/base", "revision": "v2"}}, "fam/base@v2'.* of a local folder"),
                       ({"model": {"path": "fam/base"}, "override_architecture": "X"}, "override_architecture is not"),
                       ({"model": {"path": "fam/base"}, "loras": "adapter"}, "unknown key 'loras'")):
        (folder / "bad.yml").write_text(yaml.safe_dump({**as_text, "base_model": bad}))
        with pytest.raises(ConfigError, match=words):
            safemerge.merge(str(folder / "bad.yml"), tmp_path / "bad", progress=False)
        assert not (tmp_path / "bad").exists()


def test_bad_adapters_are_refused_by_name(lora_family, tmp_path):
    fam, adapter = lora_family
    dora = _adapter(fam["base"], tmp_path / "dora", target_modules=["q_proj"], modules_to_save=None, use_dora=True)
    with pytest.raises(CheckpointError, match="use_dora is not supported"):
        open_model(f"{fam['base']}+{dora}")
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        open_model(f"{fam['base']}+{fam['expert']}")
    other = make_family(tmp_path / "wide", names=("base",), vocab=80)["base"]
    with pytest.raises(CheckpointError, match="embed_tokens.weight"):
        open_model(f"{other}+{adapter}")
    with pytest.raises(ConfigError, match="one '\\+'"):
        safemerge.merge({"merge_method": "linear", "models": [{"model": "a+b+c", "parameters": {"weight": 1}}]},
                        tmp_path / "o", progress=False)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"


def test_an_adapter_folder_given_as_a_whole_model_says_how_to_give_it(lora_family, tmp_path):
    """Its tensors are LoRA's A and B: without the check a merge reported a model tensor missing, evaluation a
    tokenizer it could not load."""
    from safemerge.evaluate.loading import model_ref

    fam, adapter = lora_family
    config = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
              "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}]}
    with pytest.raises(CheckpointError, match=r"is a LoRA adapter folder .* as `BASE\+.*adapter`.* names '.*base'"):
        safemerge.merge(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match=r"is a LoRA adapter folder"):
        model_ref(adapter)
    assert model_ref(f"{fam['base']}+{adapter}").adapter == adapter  # with its base it is what it always was
    # a model's weights beside a leftover adapter_config.json are a model, with or without config.json
    leftover = tmp_path / "weights-only"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes((fam["base"] / "model.safetensors").read_bytes())
    (leftover / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    assert open_model(str(leftover)).names()
    # an adapter folder that also holds its base's config.json is still an adapter
    (adapter / "config.json").write_text((fam["base"] / "config.json").read_text())
    try:
        with pytest.raises(CheckpointError, match=r"is a LoRA adapter folder"):
            open_model(str(adapter))
    finally:
        (adapter / "config.json").unlink()


@pytest.mark.parametrize("rslora", [False, True])
def test_rank_and_alpha_patterns_are_matched_as_peft_matches_them(lora_family, tmp_path, rslora):
    fam, _ = lora_family
    # a suffix pattern (every q_proj), a full escaped name, and an alpha pattern that overlaps them
    adapter = _adapter(fam["base"], tmp_path / "pat", target_modules=["q_proj", "down_proj"], modules_to_save=None,
                       rank_pattern={"q_proj": 2, r"model\.layers\.1\.mlp\.down_proj": 6},
                       alpha_pattern={"down_proj": 3}, use_rslora=rslora)
    want = _peft_merged(fam["base"], adapter)
    ckpt = open_model(f"{fam['base']}+{adapter}")
    for name in ckpt.names():
        torch.testing.assert_close(ckpt.get(name), want[name], rtol=0, atol=1e-6, msg=name)
    a = load_file(str(adapter / "adapter_model.safetensors"))
    assert a["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape[0] == 6
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"q_proj": 3}  # the matrices say 2
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="have rank 2, but adapter_config.json gives it r = 3"):
        open_model(f"{fam['base']}+{adapter}")


def test_the_search_reads_model_plus_adapter_as_the_engine_does(lora_family, tmp_path):
    from safemerge.search.candidates import CandidateModel

    fam, adapter = lora_family
    config = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
              "models": [{"model": f"{fam['base']}+{adapter}", "parameters": {"weight": 0.7}},
                         {"model": str(fam["aligned"]), "parameters": {"weight": 0.5}}]}
    engine = load_file(str(safemerge.merge(config, tmp_path / "out", progress=False) / "model.safetensors"))
    candidate = CandidateModel(config)
    candidate.load(config)
    for name, t in candidate.state().items():
        assert torch.equal(t, engine[name]), name


def test_the_output_may_not_be_the_adapters_folder(lora_family):
    fam, adapter = lora_family
    config = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
              "models": [{"model": f"{fam['base']}+{adapter}", "parameters": {"weight": 1.0}}]}
    with pytest.raises(ConfigError, match="is the input model"):
        safemerge.merge(config, adapter, overwrite=True, progress=False)
    assert (adapter / "adapter_model.safetensors").is_file()


def test_gpt2_conv1d_layers_are_transposed_per_layer_as_peft_does(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    gpt.save_pretrained(tmp_path / "gpt2")
    # c_attn is (32, 96) stored (in, out); c_proj (32, 32) is square: only the layer type says it is transposed.
    # peft writes fan_in_fan_out as the last wrapped layer left it, so the file's flag cannot decide.
    adapter = _adapter(tmp_path / "gpt2", tmp_path / "ad", target_modules=["c_attn", "c_proj"], modules_to_save=None,
                       fan_in_fan_out=True)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = False
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    want = _peft_merged(tmp_path / "gpt2", adapter)
    ckpt = open_model(f"{tmp_path / 'gpt2'}+{adapter}")
    for name in ckpt.names():
        if name in want:
            torch.testing.assert_close(ckpt.get(name), want[name], rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(ckpt.get("transformer.h.0.attn.c_proj.weight"),
                           open_model(str(tmp_path / "gpt2")).get("transformer.h.0.attn.c_proj.weight"))


def test_an_adapter_of_a_checkpoint_stored_without_its_prefix_is_merged_as_peft_merges_it(tmp_path):
    """The hub's gpt2 stores `h.0.attn.c_attn.weight` where the model (and so a peft adapter) says
    `transformer.h.0.attn.c_attn.weight`: the adapter was refused as made for another model."""
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)).save_pretrained(tmp_path / "gpt2")
    # patterns keyed by the module's full name, as peft matches them (they were matched against the stripped name)
    adapter = _adapter(tmp_path / "gpt2", tmp_path / "ad", target_modules=["c_attn"], modules_to_save=None,
                       rank_pattern={"transformer.h.0.attn.c_attn": 2}, alpha_pattern={"transformer.h.0.attn.c_attn": 64})
    want = _peft_merged(tmp_path / "gpt2", adapter)
    weights = tmp_path / "gpt2" / "model.safetensors"
    save_file({k.removeprefix("transformer."): v.contiguous() for k, v in load_file(weights).items()}, weights,
              metadata={"format": "pt"})
    ckpt = open_model(f"{tmp_path / 'gpt2'}+{adapter}")  # read under the names from_pretrained gives, as peft names them
    assert "transformer.h.0.attn.c_attn.weight" in ckpt.names() and "h.0.attn.c_attn.weight" not in ckpt.names()
    for layer in (0, 1):
        torch.testing.assert_close(ckpt.get(f"transformer.h.{layer}.attn.c_attn.weight"),
                                   want[f"transformer.h.{layer}.attn.c_attn.weight"], rtol=0, atol=1e-6)
    name = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(ckpt.get(name), open_model(str(tmp_path / "gpt2")).get(name))


def test_an_incomplete_adapter_or_config_is_refused_by_name(lora_family, tmp_path):
    """A B matrix without its A was skipped (the base's weight kept: a wrong merge, silently); a config that is
    JSON but not an object was a traceback."""
    import shutil

    from safetensors.torch import save_file

    fam, adapter = lora_family
    broken = shutil.copytree(adapter, tmp_path / "no-A")
    weights = load_file(broken / "adapter_model.safetensors")
    gone = next(k for k in weights if "q_proj.lora_A" in k)
    save_file({k: v for k, v in weights.items() if k != gone}, broken / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="q_proj.lora_B.weight' has no matching A matrix"):
        open_model(f"{fam['base']}+{broken}")
    odd = shutil.copytree(adapter, tmp_path / "list")
    (odd / "adapter_config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="adapter_config.json: must hold a JSON object .*got list"):
        open_model(f"{fam['base']}+{odd}")


def test_adapters_peft_would_merge_otherwise_are_refused_by_name(lora_family, tmp_path):
    import shutil

    fam, adapter = lora_family
    for key, value, words in (("init_lora_weights", "olora", "init_lora_weights 'olora'"),
                              ("arrow_config", {"top_k": 2}, "arrow_config"),
                              ("some_future_option", 3, "some_future_option")):
        odd = tmp_path / key
        shutil.copytree(adapter, odd)
        cfg = json.loads((odd / "adapter_config.json").read_text())
        cfg[key] = value
        (odd / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=words):
            open_model(f"{fam['base']}+{odd}")
    with pytest.raises(CheckpointError, match="no such adapter folder"):
        open_model(f"{fam['base']}+{tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="one '\\+'"):
        safemerge.merge({"merge_method": "linear", "models": [{"model": "a++b", "parameters": {"weight": 1}}]},
                        tmp_path / "o", progress=False)


def test_an_adapter_that_would_untie_a_tied_model_is_refused(tmp_path):
    tied = make_family(tmp_path / "tied", names=("base",), tie=True)["base"]
    assert not any(n.startswith("lm_head") for n in open_model(str(tied)).names())
    ok = _adapter(tied, tmp_path / "embed-lora", target_modules=["q_proj", "embed_tokens"], modules_to_save=None)
    want = _peft_merged(tied, ok)  # a low-rank update of the shared matrix keeps the tie, as in peft
    ckpt = open_model(f"{tied}+{ok}")
    torch.testing.assert_close(ckpt.get("model.embed_tokens.weight"), want["model.embed_tokens.weight"], rtol=0, atol=1e-6)
    untie = _adapter(tied, tmp_path / "save-embed", target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    with pytest.raises(CheckpointError, match="tied to its embeddings"):
        open_model(f"{tied}+{untie}")


def test_a_whole_span_slice_of_model_plus_adapter_reads_as_models(lora_family):
    from safemerge.config import load_config

    fam, adapter = lora_family
    ref = f"{fam['base']}+{adapter}"
    cfg = load_config({"merge_method": "passthrough", "slices": [{"sources": [{"model": ref, "layer_range": [0, 3]}]}]})
    assert cfg.slices is None and [m.model for m in cfg.models] == [ref]


def test_a_passthrough_of_model_plus_adapter_writes_peft_s_merged_model(lora_family, tmp_path):
    fam, adapter = lora_family  # a LoRA expert written out as a folder (to publish it, or for the vllm backend)
    out = safemerge.merge({"merge_method": "passthrough", "models": [{"model": f"{fam['base']}+{adapter}"}]},
                          tmp_path / "expert", progress=False)
    want = _peft_merged(fam["base"], adapter)
    for name, t in load_file(str(out / "model.safetensors")).items():
        torch.testing.assert_close(t, want[name], rtol=0, atol=1e-6, msg=name)
    assert (out / "tokenizer.json").is_file()


def test_mergealign_takes_an_aligned_model_shipped_as_an_adapter(lora_family, tmp_path):
    """QA (a new user's walkthrough): --aligned BASE+ADAPTER failed with "tokenizer_source ... has no tokenizer files",
    the default tokenizer source being the aligned reference itself; it is BASE's tokenizer (or the adapter's)."""
    fam, adapter = lora_family
    out = safemerge.mergealign(base=fam["base"], domains=[fam["expert"]], aligned=f"{fam['base']}+{adapter}",
                               out=tmp_path / "ma", progress=False)
    saved = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert saved["tokenizer_source"] == str(fam["base"])
    assert (out / "tokenizer_config.json").is_file()


def test_an_adapter_that_replaces_a_tied_opt_embedding_is_refused(tmp_path):
    """The tied check knew Llama's and GPT-2's embedding names only: for OPT (and BLOOM) a replaced embedding was
    accepted, and with it silently a new output layer, where peft's merge unties the two."""
    from peft import LoraConfig, get_peft_model
    from transformers import OPTConfig, OPTForCausalLM

    from safemerge.lora import open_model

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                     num_attention_heads=4, word_embed_proj_dim=32))
    model.save_pretrained(tmp_path / "opt")
    adapted = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.5)
    adapted.save_pretrained(tmp_path / "ad")
    with pytest.raises(CheckpointError, match="replaces 'model.decoder.embed_tokens.weight' of a model whose lm_head is tied"):
        open_model(f"{tmp_path / 'opt'}+{tmp_path / 'ad'}")
