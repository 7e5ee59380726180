"""The CUDA paths: merging with --device cuda, in-memory search candidates and their scores on the GPU,
batched generation and evaluation on the GPU. Each result is compared with the CPU path's.

Skipped where torch sees no CUDA GPU (CI has none); on a GPU machine: `pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import json

import pytest
import torch

import safemerge
from safemerge.checkpoint import Checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def _models(fam, method, **params):
    per = {"weight": 0.7, **params}
    return {"merge_method": method, "base_model": str(fam["base"]),
            "models": [{"model": str(fam[m]), "parameters": dict(per)} for m in ("expert", "aligned")]}


CONFIGS = {
    "linear": lambda f: {"merge_method": "linear",
                         "models": [{"model": str(f[m]), "parameters": {"weight": w}}
                                    for m, w in (("base", 0.2), ("expert", 0.5), ("aligned", 0.3))]},
    "task_arithmetic": lambda f: _models(f, "task_arithmetic"),
    "ties": lambda f: _models(f, "ties", density=0.4),
    "breadcrumbs": lambda f: _models(f, "breadcrumbs", density=0.8, gamma=0.05),
    "slerp": lambda f: {"merge_method": "slerp", "base_model": str(f["base"]),
                        "models": [{"model": str(f["base"])}, {"model": str(f["expert"])}],
                        "parameters": {"t": [0, 0.5, 1, 0.5, 0]}},
    "model_stock": lambda f: {"merge_method": "model_stock", "base_model": str(f["base"]),
                              "models": [{"model": str(f["expert"])}, {"model": str(f["aligned"])}]},
    "ties_rescale": lambda f: {**_models(f, "ties", density=0.4), "parameters": {"rescale": True}},
    "nuslerp": lambda f: {**_models(f, "nuslerp"), "parameters": {"nuslerp_flatten": False}},
    "sce": lambda f: {"merge_method": "sce", "base_model": str(f["base"]), "parameters": {"select_topk": 0.5},
                      "models": [{"model": str(f["expert"])}, {"model": str(f["aligned"])}]},
}
# Elementwise float32 arithmetic is the same IEEE operation on both devices; only reductions (SLERP's
# norms and dot product, Model Stock's cosines, the L1 norms of `rescale`, SCE's variances and mean squares)
# may sum in another order.
EXACT = {"linear", "task_arithmetic", "ties", "breadcrumbs"}


def _merge(config, out, device):
    safemerge.merge(config, out, device=device, progress=False)
    return Checkpoint(out)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_merge_on_cuda_equals_the_cpu_merge(method, dtype, tiny_family, tiny_family_bf16, tmp_path):
    config = CONFIGS[method](tiny_family if dtype == "float32" else tiny_family_bf16)
    cpu, gpu = _merge(config, tmp_path / "cpu", "cpu"), _merge(config, tmp_path / "gpu", "cuda")
    assert sorted(cpu.names()) == sorted(gpu.names())
    for name in cpu.names():
        a, b = cpu.get(name), gpu.get(name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if method in EXACT:
            assert torch.equal(a, b), name
        elif dtype == "float32":
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        else:  # a float32 difference in the last bits may round to the neighbouring bf16 value
            torch.testing.assert_close(b.float(), a.float(), rtol=2 ** -7, atol=1e-6, msg=name)


def test_arcee_fusion_on_cuda_keeps_the_same_elements(tiny_family, tmp_path):
    # softmax and log may round differently on the GPU, so an element right at the threshold may flip; every
    # element is still the base's or the expert's value, and (almost) all are the CPU's choice
    config = {"merge_method": "arcee_fusion", "base_model": str(tiny_family["base"]),
              "models": [{"model": str(tiny_family["base"])}, {"model": str(tiny_family["expert"])}]}
    cpu, gpu = _merge(config, tmp_path / "cpu", "cpu"), _merge(config, tmp_path / "gpu", "cuda")
    base, expert = Checkpoint(tiny_family["base"]), Checkpoint(tiny_family["expert"])
    differ = total = 0
    for name in cpu.names():
        a, b = cpu.get(name), gpu.get(name)
        x, y = base.get(name), expert.get(name)
        assert bool(((b == x) | torch.isclose(b, y, rtol=0, atol=1e-6)).all()), name
        differ += int((a != b).sum())
        total += a.numel()
    assert differ <= 1e-3 * total


def test_vocabulary_reindexing_on_cuda_equals_the_cpu(tiny_family, tmp_path):
    from tiny import vocab_of, vocab_variant

    n = len(vocab_of(tiny_family["aligned"]))
    fam = dict(tiny_family,
               expert=vocab_variant(tiny_family["expert"], tmp_path / "e", extra={"<|med|>": n}),
               aligned=vocab_variant(tiny_family["aligned"], tmp_path / "a", perm=list(reversed(range(n))), drop="drug"))
    config = {**_models(fam, "task_arithmetic"), "tokenizer": {"source": "union", "pad_to_multiple_of": 32}}
    cpu, gpu = _merge(config, tmp_path / "cpu", "cpu"), _merge(config, tmp_path / "gpu", "cuda")
    for name in cpu.names():
        torch.testing.assert_close(gpu.get(name), cpu.get(name), rtol=0, atol=1e-7, msg=name)


def test_della_on_cuda_is_seeded(tiny_family, tmp_path):
    config = {**_models(tiny_family, "della", density=0.5, epsilon=0.2), "seed": 4}
    a, b = _merge(config, tmp_path / "a", "cuda"), _merge(config, tmp_path / "b", "cuda")
    base = Checkpoint(tiny_family["base"])
    kept = total = 0
    for name in a.names():
        assert torch.equal(a.get(name), b.get(name)), name
        assert bool(torch.isfinite(a.get(name)).all()), name
        if a.get(name).dim() == 2:
            moved = a.get(name) != base.get(name)
            kept, total = kept + int(moved.sum()), total + moved.numel()
    assert 0.70 < kept / total < 0.80  # as DARE's below: mean keep probability 0.5 per model


def test_dare_on_cuda_is_seeded(tiny_family, tmp_path):
    """DARE's masks come from a per-tensor seeded generator on the compute device: the same on every CUDA
    run (they differ from the CPU's, whose generator is another algorithm; docs/methods.md says so), and
    rescaled so the mean of the kept deltas is preserved in expectation."""
    config = {**_models(tiny_family, "dare_ties", density=0.5), "seed": 3}
    a, b = _merge(config, tmp_path / "a", "cuda"), _merge(config, tmp_path / "b", "cuda")
    base = Checkpoint(tiny_family["base"])
    kept = total = 0
    for name in a.names():
        assert torch.equal(a.get(name), b.get(name)), name
        if a.get(name).dim() == 2:
            moved = a.get(name) != base.get(name)
            kept, total = kept + int(moved.sum()), total + moved.numel()
    # density 0.5 for each of two models: an element keeps some delta unless both masks drop it
    assert 0.70 < kept / total < 0.80


def test_search_candidate_on_cuda_equals_the_engine(tiny_family, tmp_path):
    from safemerge.search import CandidateModel

    config = _models(tiny_family, "ties", density=0.6)
    cm = CandidateModel(config, device="cuda")
    cm.load(_models(tiny_family, "ties", weight=0.2, density=0.9))  # a previous candidate leaves nothing behind
    cm.load(config)
    disk = _merge(config, tmp_path / "m", "cpu")
    assert {p.device.type for p in cm.model.parameters()} == {"cuda"}
    # the second load read its thresholds from sorted |τ| kept on the GPU, within the default budget: an eighth of the
    # memory free before the model was built, so at least an eighth of what is free now (or the CPU's 1 GiB)
    sorted_ = [s for s in cm._memo._sorted.values() if s is not None]
    assert sorted_ and {s.device.type for s in sorted_} == {"cuda"}
    assert cm._memo.budget >= max(1 << 30, torch.cuda.mem_get_info()[0] // 8)
    assert cm._memo.tensor_cap == max(1 << 24, cm._memo.budget // 16)  # larger tensors than on the CPU are kept
    state = cm.state()  # CPU copies of the model's parameters
    for name in disk.names():
        assert torch.equal(state[name], disk.get(name)), name


def test_search_scores_on_cuda_match_the_cpu(micro_testbed, tmp_path):
    from safemerge.search.scoring import ScorerSpec, SerialScorer

    rows = [json.loads(x) for x in (micro_testbed / "data" / "safety_train.jsonl").read_text().splitlines()[:16]]
    safety = tmp_path / "safety.jsonl"
    safety.write_text("".join(json.dumps({"prompt": r["prompt"], "response": "I'm sorry, but I can't help with that."})
                              + "\n" for r in rows))
    domain = tmp_path / "domain.jsonl"
    domain.write_text("\n".join((micro_testbed / "data" / "domain-medicine_train.jsonl").read_text().splitlines()[:16]) + "\n")
    config = {"merge_method": "ties", "base_model": str(micro_testbed / "base"),
              "models": [{"model": str(micro_testbed / m), "parameters": {"weight": 0.8, "density": 0.5}}
                         for m in ("expert-medicine", "aligned")]}
    scores = {}
    for device in ("cpu", "cuda"):
        spec = ScorerSpec(config=config, safety_data=str(safety), domain_data=str(domain), lambda_=0.5, device=device)
        scores[device] = SerialScorer(spec).score_one(config)[0]
    for part in ("safety", "domain", "objective"):
        assert getattr(scores["cuda"], part) == pytest.approx(getattr(scores["cpu"], part), rel=1e-4), part


def _generate(path, device, batch_size, prompts):
    from safemerge.evaluate.backends import GenerationSettings, TransformersBackend

    backend = TransformersBackend.from_pretrained(path, device=device, batch_size=batch_size)
    assert next(backend.model.parameters()).device.type == ("cuda" if device == "cuda" else "cpu")
    return [g.text for g in backend.generate(prompts, GenerationSettings(max_new_tokens=24))]


def test_batched_generation_on_cuda(micro_testbed):
    """Left-padded batches of mixed lengths on the GPU give the answers of one-at-a-time generation
    and of the CPU (greedy; float32, so a differing token would need a near-tie of two logits)."""
    prompts = [json.loads(x)["prompt"] for x in (micro_testbed / "data" / "safety_test.jsonl").read_text().splitlines()[:24]]
    prompts += [json.loads(x)["question"] for x in
                (micro_testbed / "data" / "general_test.jsonl").read_text().splitlines()[:24]]
    assert len({len(p) for p in prompts}) > 5  # mixed lengths, so batches are padded
    path = micro_testbed / "aligned"
    batched = _generate(path, "cuda", 16, prompts)
    single = _generate(path, "cuda", 1, prompts)
    cpu = _generate(path, "cpu", 16, prompts)
    assert sum(a == b for a, b in zip(batched, single)) >= 0.95 * len(prompts)
    assert sum(a == b for a, b in zip(batched, cpu)) >= 0.95 * len(prompts)
    assert any("sorry" in t.lower() for t in batched[:24])  # the aligned model refuses harmful prompts


def test_evaluation_on_cuda_matches_the_cpu(micro_testbed, tmp_path):
    from safemerge.evaluate import evaluate_domain, evaluate_safety

    model = micro_testbed / "expert-medicine"
    task = micro_testbed / "data" / "domain-medicine_test.jsonl"
    got = {}
    for device in ("cpu", "cuda"):
        s = evaluate_safety(model, prompts=micro_testbed / "data" / "safety_test.jsonl", max_new_tokens=32,
                            device=device, store=tmp_path / f"{device}.sqlite", cache=False)
        d = evaluate_domain(model, task=task, device=device, store=tmp_path / f"{device}.sqlite", cache=False)
        got[device] = (s["safe_rate"], d["acc"])
    assert got["cuda"][0] == pytest.approx(got["cpu"][0], abs=0.03)
    assert got["cuda"][1] == pytest.approx(got["cpu"][1], abs=0.02)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_lora_extraction_on_cuda_matches_the_cpu(tiny_family, tmp_path, svd):
    from safemerge.extract import extract_lora

    fam = tiny_family
    cpu = extract_lora(fam["expert"], fam["base"], tmp_path / "cpu", rank=8, svd=svd, progress=False)
    gpu = extract_lora(fam["expert"], fam["base"], tmp_path / "gpu", rank=8, svd=svd, device="cuda", progress=False)
    assert cpu.ranks == gpu.ranks
    if svd == "randomized":  # the GPU's random stream is another: the same error, not the same factors
        assert gpu.total_error == pytest.approx(cpu.total_error, rel=2e-2)
        return
    assert gpu.total_error == pytest.approx(cpu.total_error, rel=1e-4)
    a, b = Checkpoint(cpu.path / "adapter_model.safetensors"), Checkpoint(gpu.path / "adapter_model.safetensors")
    for key in a.names():  # compare the products B·A: singular vectors' signs may differ between devices
        if key.endswith("lora_A.weight"):
            pa = a.get(key.replace("lora_A", "lora_B")) @ a.get(key)
            pb = b.get(key.replace("lora_A", "lora_B")) @ b.get(key)
            torch.testing.assert_close(pb, pa, rtol=0, atol=1e-3 * float(pa.abs().max()) + 1e-7, msg=key)
