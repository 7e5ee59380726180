"""Similarity: streamed L2 and task-vector cosines against a plain float64 computation."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from eval_tiny import build_llama, build_tokenizer, save
from safemerge.errors import CheckpointError
from safemerge.evaluate import similarity
from safemerge.layout import layer_index


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base and three models = base + Gaussian noise of three different sizes."""
    root = tmp_path_factory.mktemp("sim")
    tok = build_tokenizer()
    base = build_llama(tok, seed=10)
    paths = {"base": save(base, tok, root / "base")}
    for i, scale in enumerate((1e-3, 1e-2, 5e-2)):
        m = build_llama(tok, seed=10)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
        paths[f"m{i}"] = save(m, tok, root / f"m{i}")
    return paths


def _tensors(path):
    return {k: v.double() for k, v in load_file(path / "model.safetensors").items()}


def test_l2_and_cosine_equal_a_plain_float64_computation(family):
    r = similarity([family["m0"], family["m1"], family["m2"]], base=family["base"], chunk_elems=1000)
    t = {k: _tensors(family[k]) for k in ("base", "m0", "m1", "m2")}
    names = sorted(t["base"])
    flat = {k: torch.cat([t[k][n].flatten() for n in names]) for k in t}
    tau = {k: flat[k] - flat["base"] for k in ("m0", "m1", "m2")}
    pairs = {(p["a"], p["b"]): p for p in r["pairs"]}
    for a, b in (("m0", "m1"), ("m0", "m2"), ("m1", "m2")):
        p = pairs[(str(family[a]), str(family[b]))]
        assert p["l2"] == pytest.approx(torch.linalg.norm(flat[a] - flat[b]).item(), rel=1e-6)
        cos = (tau[a] @ tau[b] / (tau[a].norm() * tau[b].norm())).item()
        assert p["cosine"] == pytest.approx(cos, rel=1e-6, abs=1e-9)
    for k in ("m0", "m1", "m2"):
        assert r["task_vectors"][str(family[k])]["norm"] == pytest.approx(tau[k].norm().item(), rel=1e-6)


def test_per_layer_groups_add_up(family):
    r = similarity([family["m0"], family["m2"]])
    p = r["pairs"][0]
    assert set(p["per_layer"]) == {"embed", "0", "1", "lm_head", "other"}
    assert math.sqrt(sum(v["l2"] ** 2 for v in p["per_layer"].values())) == pytest.approx(p["l2"], rel=1e-9)
    a, b = _tensors(family["m0"]), _tensors(family["m2"])
    layer1 = sum(((a[n] - b[n]) ** 2).sum().item() for n in a if layer_index(n) == 1)
    assert p["per_layer"]["1"]["l2"] == pytest.approx(math.sqrt(layer1), rel=1e-9)
    assert "cosine" not in p and "task_vectors" not in r


def test_one_model_against_base_and_mismatches(family, tmp_path):
    r = similarity([family["m1"]], base=family["base"])
    assert r["pairs"] == [] and r["task_vectors"][str(family["m1"])]["norm"] > 0
    t = load_file(family["m1"] / "model.safetensors")
    t.pop("model.norm.weight")
    save_file(t, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="has no tensor 'model.norm.weight'"):
        similarity([family["m1"], tmp_path / "broken.safetensors"])


def test_two_tied_models_are_compared_alike_whatever_else_is_compared(family, tmp_path):
    """A third model with its own lm_head made every pair count the head, so two tied models counted their embedding
    difference twice: compare's ‖model − expert‖ changed with the aligned model beside them (6.06 → 6.29)."""
    import json
    import shutil

    tied = {}
    for name in ("m0", "m1"):  # as tied checkpoints are saved: no lm_head tensor, tie_word_embeddings true
        tied[name] = tmp_path / name
        shutil.copytree(family[name], tied[name])
        f = tied[name] / "model.safetensors"
        save_file({k: v for k, v in load_file(f).items() if k != "lm_head.weight"}, f, metadata={"format": "pt"})
        cfg = json.loads((tied[name] / "config.json").read_text())
        (tied[name] / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    a, b = (_tensors(tied[n]) for n in ("m0", "m1"))
    want = math.sqrt(sum(torch.sum((a[k] - b[k]) ** 2).item() for k in a))  # every stored tensor once
    alone = similarity([tied["m0"], tied["m1"]])["pairs"][0]["l2"]
    beside = similarity([tied["m0"], tied["m1"], family["m2"]])["pairs"]
    assert alone == pytest.approx(want, rel=1e-12) and beside[0]["l2"] == pytest.approx(want, rel=1e-12)
    m2 = _tensors(family["m2"])  # a tied model against an untied one: its embedding stands in for its head
    head = torch.sum((a["model.embed_tokens.weight"] - m2["lm_head.weight"]) ** 2).item()
    assert beside[1]["l2"] == pytest.approx(math.sqrt(sum(torch.sum((a[k] - m2[k]) ** 2).item() for k in a) + head),
                                            rel=1e-12)
