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
