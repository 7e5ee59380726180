"""Hub ids ("org/name", "org/name@revision") as model references: read from the local Hugging Face cache (fetched
first where a hub is reachable; the tests run with HF_HUB_OFFLINE=1, conftest). Each test fills a cache of its own
in the layout huggingface_hub writes (models--org--name/{refs/main, snapshots/<commit>/})."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import safemerge
from safemerge.checkpoint import Checkpoint
from safemerge.errors import CheckpointError, ConfigError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache(root: Path, repos: dict[str, Path]) -> Path:
    """A hub cache at `root` holding each folder under its repo id, at COMMIT, which `main` points at; each file of
    the snapshot a link to its blob, as huggingface_hub stores them."""
    for repo, folder in repos.items():
        store = root / f"models--{repo.replace('/', '--')}"
        (store / "refs").mkdir(parents=True)
        (store / "refs" / "main").write_text(COMMIT)
        (store / "blobs").mkdir()
        snapshot = store / "snapshots" / COMMIT
        snapshot.mkdir(parents=True)
        for f in folder.iterdir():
            blob = store / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copyfile(f, blob)
            (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return root


@pytest.fixture
def hub(tiny_family, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = _cache(tmp_path / "hf-cache", {"acme/tiny-base": tiny_family["base"], "acme/tiny-expert": tiny_family["expert"],
                                      "acme/tiny-aligned": tiny_family["aligned"]})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # relative paths in the configs below are not folders here
    return cache


def _config(base: str, expert: str, aligned: str) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
            "models": [{"model": expert, "parameters": {"weight": 1.0}}, {"model": aligned, "parameters": {"weight": 1.0}}]}


def test_a_merge_reads_hub_ids_from_the_local_cache_as_the_same_folders(hub, tiny_family, tmp_path):
    """A mergekit config names its models by hub id; safemerge said 'a hub id is not downloaded by safemerge'."""
    local = _config(str(tiny_family["base"]), str(tiny_family["expert"]), str(tiny_family["aligned"]))
    by_id = _config("acme/tiny-base", f"acme/tiny-expert@{COMMIT}",  # a revision as mergekit writes one
                    {"model": {"path": "acme/tiny-aligned", "revision": "main"}})  # and in its mapping form
    for name, config in (("local", local), ("hub", by_id)):
        (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(config))
        safemerge.merge(str(tmp_path / f"{name}.yml"), tmp_path / name, progress=False)
    got, want = tmp_path / "hub", tmp_path / "local"
    assert (got / "model.safetensors").read_bytes() == (want / "model.safetensors").read_bytes()
    assert (got / "tokenizer.json").read_bytes() == (want / "tokenizer.json").read_bytes()
    card = (got / "README.md").read_text()
    assert card.startswith("---") and "base_model: acme/tiny-base" in card  # the hub id, as the hub reads it
    assert not any(hub in p.parents for p in got.rglob("*"))  # nothing written into the cache's snapshot


def test_a_hub_id_not_in_the_cache_offline_is_named_with_how_to_fetch_it(hub, tiny_family, tmp_path):
    for ref, words in (("acme/no-such-model", "it is not in the local Hugging Face cache and the hub cannot be reached"),
                       ("acme/tiny-base@v9", "it is not in the local Hugging Face cache")):
        with pytest.raises(CheckpointError, match=f"{ref}: no such local folder, and as a hub id: {words}") as e:
            Checkpoint(ref)
        assert "hf download acme/" in str(e.value)
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(_config("acme/tiny-base", "acme/no-such-model",
                                                             str(tiny_family["aligned"]))))
    with pytest.raises(CheckpointError, match="acme/no-such-model: no such local folder"):
        safemerge.merge(str(tmp_path / "bad.yml"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_revision_of_a_local_folder_is_still_refused(hub, tiny_family, tmp_path):
    (tmp_path / "acme").mkdir()  # `acme/x` is now a mistyped local path, not a hub id: nothing is fetched for it
    with pytest.raises(CheckpointError, match="no such model directory or file; check the path"):
        Checkpoint("acme/tiny-base")
    config = _config(str(tiny_family["base"]), {"model": {"path": str(tiny_family["expert"]), "revision": "v2"}},
                     str(tiny_family["aligned"]))
    (tmp_path / "rev.yml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="revision 'v2' of a local folder"):
        safemerge.merge(str(tmp_path / "rev.yml"), tmp_path / "out", progress=False)


def test_evaluation_and_the_cli_resolve_hub_ids_too(hub, tiny_family, tmp_path):
    from safemerge.evaluate.loading import model_folders

    assert model_folders("acme/tiny-base") == (hub / "models--acme--tiny-base" / "snapshots" / COMMIT, None)
    assert model_folders("acme/tiny-base+acme/tiny-expert@main")[1] == hub / "models--acme--tiny-expert" / "snapshots" / COMMIT
    # the CLI, in a process of its own, with the cache given as users give it (HF_HUB_CACHE)
    (tmp_path / "c.yml").write_text(yaml.safe_dump(_config("acme/tiny-base", "acme/tiny-expert", "acme/tiny-aligned")))
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", "from safemerge.cli import main; main()", "merge", "c.yml", "out",
                          "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert set(Checkpoint(tmp_path / "out").names()) == set(Checkpoint(tiny_family["base"]).names())


def test_an_adapter_by_hub_id_on_a_stage_and_an_extraction_against_a_revision(tiny_family, tmp_path, monkeypatch):
    """Review: multimerge read a hub-id adapter on an earlier stage's output as a local folder; extract-lora wrote
    `org/name@rev` as base_model_name_or_path, which peft cannot load."""
    from huggingface_hub import constants

    from safemerge.extract import extract_lora

    adapter = extract_lora(tiny_family["aligned"], tiny_family["base"], tmp_path / "made", rank=4, progress=False).path
    cache = _cache(tmp_path / "hf-cache", {"acme/tiny-base": tiny_family["base"], "acme/tiny-expert": tiny_family["expert"],
                                           "acme/tiny-adapter": adapter})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    stages = [{"name": "soup", "merge_method": "linear", "dtype": "float32",
               "models": [{"model": "acme/tiny-base", "parameters": {"weight": 1.0}},
                          {"model": "acme/tiny-expert", "parameters": {"weight": 1.0}}]},
              {"merge_method": "linear", "dtype": "float32", "models": [{"model": "soup+acme/tiny-adapter",
                                                                         "parameters": {"weight": 1.0}}]}]
    (tmp_path / "multi.yml").write_text(yaml.safe_dump_all(stages))
    safemerge.multimerge(str(tmp_path / "multi.yml"), tmp_path / "final", intermediate_dir=tmp_path / "stages",
                         progress=False)
    assert (tmp_path / "final" / "model.safetensors").is_file()
    out = extract_lora("acme/tiny-expert", "acme/tiny-base@main", tmp_path / "lora", rank=4, progress=False).path
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("acme/tiny-base", "main")
    assert "base_model: acme/tiny-base\n" in (out / "README.md").read_text()
