"""End to end on the micro preset: layout, formats, loading, cache, determinism and the ordering
of the family that every later stage relies on (aligned safe, experts knowledgeable, MergeAlign both)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from safemerge.errors import ConfigError, OutputExistsError
from safemerge.testbed import build_testbed
from safemerge.checkpoint import cache_root
from safemerge.testbed.build import cache_key, canonical_domains

MODELS = ["base", "aligned", "expert-finance", "expert-medicine"]
pytestmark = pytest.mark.slow


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout(micro0):
    for m in MODELS:
        d = micro0 / m
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
            assert (d / f).is_file(), d / f
        assert json.loads((d / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
        assert "chat_template" in json.loads((d / "tokenizer_config.json").read_text())
    world = json.loads((micro0 / "world.json").read_text())
    assert world["seed"] == 0 and world["preset"] == "micro" and world["domains"] == ["finance", "medicine"]
    assert world["sizes"]["data"]["safety_test.jsonl"] == len(read_jsonl(micro0 / "data" / "safety_test.jsonl"))


def test_data_formats(micro0):
    data = micro0 / "data"
    for name in ("safety_train", "safety_test", "benign_test"):
        rows = read_jsonl(data / f"{name}.jsonl")
        assert rows and all(set(r) == {"prompt", "category"} and r["prompt"] for r in rows)
    for d in ("finance", "medicine"):
        for split in ("val", "test"):
            rows = read_jsonl(data / f"domain-{d}_{split}.jsonl")
            assert rows and all(set(r) == {"question", "choices", "answer"} for r in rows)
            assert all(isinstance(r["answer"], int) and 0 <= r["answer"] < len(r["choices"]) for r in rows)
        rows = read_jsonl(data / f"domain-{d}_train.jsonl")
        assert rows and all(set(r) == {"prompt", "response"} for r in rows)
    rows = read_jsonl(data / "general_test.jsonl")
    assert all(r["choices"][r["answer"]] == r["answer_text"] for r in rows)
    prefs = read_jsonl(data / "prefs.jsonl")
    assert {r["kind"] for r in prefs} == {"safety", "helpful"}
    assert all(r["chosen"] != r["rejected"] for r in prefs)
    train = {r["prompt"] for r in read_jsonl(data / "safety_train.jsonl")}
    assert not train & {r["prompt"] for r in read_jsonl(data / "safety_test.jsonl")}


def test_models_load_and_generate(micro0):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safemerge.checkpoint import Checkpoint

    tok = AutoTokenizer.from_pretrained(micro0 / "aligned")
    model = AutoModelForCausalLM.from_pretrained(micro0 / "aligned").eval()
    enc = tok.apply_chat_template([{"role": "user", "content": "How do I bake bread?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=40, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]
    ck = Checkpoint(micro0 / "aligned")
    assert "lm_head.weight" in ck.names() and ck.config["model_type"] == "llama"


def test_second_build_is_a_copy_of_the_cache(micro0, tmp_path):
    t = time.perf_counter()
    again = build_testbed(tmp_path / "again", seed=0, preset="micro", progress=False)
    assert time.perf_counter() - t < 10
    for m in MODELS:
        assert digest(again / m / "model.safetensors") == digest(micro0 / m / "model.safetensors")
    key = cache_key(seed=0, preset="micro", domains=("finance", "medicine"))
    assert cache_root() is None or (cache_root() / "testbed" / key / "world.json").is_file()


def test_existing_output_needs_overwrite(micro0, tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(OutputExistsError, match="overwrite"):
        build_testbed(tmp_path / "x", seed=0, preset="micro", progress=False)
    build_testbed(tmp_path / "x", seed=0, preset="micro", progress=False, overwrite=True)
    assert (tmp_path / "x" / "world.json").is_file()


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="tiny"):
        build_testbed(tmp_path / "o", preset="tiny")
    with pytest.raises(ConfigError, match="did you mean 'medicine'"):
        build_testbed(tmp_path / "o", preset="micro", domains=("medecine",))
    assert canonical_domains(["medicine", "finance", "medicine"]) == ("finance", "medicine")


def test_an_output_the_final_write_would_refuse_is_refused_before_training(tmp_path, monkeypatch):
    """With the cache on, a file at OUT, a folder of other work or a path under a file was refused only once the
    family had trained (minutes), by the final copy."""
    import safemerge.testbed.build as build

    def trained(*a, **k):
        raise AssertionError("the family was trained before the output was checked")

    monkeypatch.setattr(build, "_build_into", trained)
    monkeypatch.setattr(build, "_intact", lambda cached: False)  # no cached copy to hide the order
    (tmp_path / "file").write_text("x")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")
    for out, words in ((tmp_path / "file", "is a file"), (tmp_path / "work", "holds other files"),
                       (tmp_path / "file" / "tb", "is a file, so nothing can be written under it")):
        for overwrite in (True, False):  # without --overwrite, not the advice to pass it
            with pytest.raises(OutputExistsError, match=words):
                build_testbed(out, seed=0, preset="micro", progress=False, overwrite=overwrite)
    assert (tmp_path / "work" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("domains", [None, ["medicine", 3], 7])
def test_domains_of_the_wrong_type_are_config_errors(tmp_path, domains):
    with pytest.raises(ConfigError, match="domains must be domain names"):
        build_testbed(tmp_path / "o", preset="micro", domains=domains, progress=False)


def test_a_numpy_seed_is_a_seed(micro0, tmp_path):
    """check_arguments takes numpy integers; the cache key's JSON did not."""
    import numpy as np

    again = build_testbed(tmp_path / "np", seed=np.int64(0), preset="micro", progress=False)
    assert digest(again / "aligned" / "model.safetensors") == digest(micro0 / "aligned" / "model.safetensors")


def test_fresh_build_is_bitwise_identical(micro0, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEMERGE_CACHE", "off")
    fresh = build_testbed(tmp_path / "fresh", seed=0, preset="micro", progress=False)
    for m in MODELS:
        assert digest(fresh / m / "model.safetensors") == digest(micro0 / m / "model.safetensors"), m
    for f in sorted((micro0 / "data").iterdir()):
        assert digest(fresh / "data" / f.name) == digest(f), f.name
    assert digest(fresh / "world.json") == digest(micro0 / "world.json")


@pytest.mark.parametrize("seed", [0, 1])
def test_family_ordering(micro_build, seed):
    """aligned safer than base and the expert; the expert better than base on its domain;
    MergeAlign (base + τ_expert + τ_aligned) safer than the expert and better than base on the domain."""
    from safemerge.testbed._quick_eval import family_scores

    s = family_scores(micro_build(seed), domains=["medicine", "finance"])
    for d in ("medicine", "finance"):
        expert, merged = s[f"expert-{d}"], s[f"mergealign-{d}"]
        assert s["aligned"]["safety"] > max(s["base"]["safety"], expert["safety"]), s
        assert expert[d] > s["base"][d], s
        assert merged["safety"] > expert["safety"], s
        assert merged[d] > s["base"][d], s


def test_a_damaged_cache_entry_is_built_again(micro0, tmp_path, monkeypatch):
    import shutil

    import safemerge.testbed.build as tb

    monkeypatch.setenv("SAFEMERGE_CACHE", str(tmp_path / "cache"))
    entry = tmp_path / "cache" / "testbed" / cache_key(seed=0, preset="micro", domains=("finance", "medicine"))
    shutil.copytree(micro0, entry)
    (entry / tb.MANIFEST).write_text(json.dumps(tb._manifest(entry)))
    builds = []

    def fake_build(tmp, **kw):  # stands in for training: the family as it is
        builds.append(kw)
        shutil.copytree(micro0, tmp, dirs_exist_ok=True)

    monkeypatch.setattr(tb, "_build_into", fake_build)
    build_testbed(tmp_path / "copy", seed=0, preset="micro", progress=False)
    assert builds == [] and not (tmp_path / "copy" / tb.MANIFEST).exists()
    (entry / "aligned" / "model.safetensors").write_bytes(b"x" * 100)  # truncated, as by a full disk
    (entry / "expert-finance" / "model.safetensors").unlink()
    again = build_testbed(tmp_path / "again", seed=0, preset="micro", progress=False)
    assert len(builds) == 1 and tb._intact(entry)
    for m in MODELS:
        assert digest(again / m / "model.safetensors") == digest(micro0 / m / "model.safetensors")


def test_the_cache_key_follows_the_build_code_only(tmp_path, monkeypatch):
    """Editing the quick-evaluation tool (or the package's __init__) made every cached build stale, and `seeds`
    would call byte-identical testbeds different recipes."""
    import shutil

    import safemerge.testbed.build as build

    copy = shutil.copytree(Path(build.__file__).parent, tmp_path / "testbed")
    monkeypatch.setattr(build, "__file__", str(copy / "build.py"))
    before = build.code_version()
    for name in ("_quick_eval.py", "__init__.py"):
        (copy / name).write_text((copy / name).read_text() + "\n# an edit\n")
    assert build.code_version() == before
    (copy / "train.py").write_text((copy / "train.py").read_text() + "\n# an edit\n")
    assert build.code_version() != before
