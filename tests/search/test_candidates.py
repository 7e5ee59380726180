"""In-memory candidates give exactly the tensors that the streaming engine writes for the same config."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import safemerge
from safemerge.checkpoint import Checkpoint
from safemerge.errors import CheckpointError
from safemerge.search import CandidateModel

from conftest import task_config


def _slerp(family, t):
    return {"merge_method": "slerp", "base_model": str(family["base"]),
            "models": [{"model": str(family["base"])}, {"model": str(family["expert"])}], "parameters": {"t": t}}


CASES = {
    "task_arithmetic": (lambda f: task_config(f, weight=0.3), lambda f: task_config(f, weight=0.9)),
    "ties": (lambda f: task_config(f, "ties", density=0.3), lambda f: task_config(f, "ties", weight=0.8, density=0.7)),
    "dare_ties": (lambda f: {**task_config(f, "dare_ties", density=0.4), "seed": 5},
                  lambda f: {**task_config(f, "dare_ties", weight=0.7, density=0.6), "seed": 5}),
    "slerp": (lambda f: _slerp(f, 0.8), lambda f: _slerp(f, 0.35)),
    "breadcrumbs_ties": (lambda f: task_config(f, "breadcrumbs_ties", density=0.5, gamma=0.05),
                         lambda f: task_config(f, "breadcrumbs_ties", weight=0.7, density=0.8, gamma=0.02)),
    "della": (lambda f: {**task_config(f, "della", density=0.4), "seed": 3},
              lambda f: {**task_config(f, "della", weight=0.7, density=0.6, epsilon=0.2), "seed": 3}),
    "nuslerp": (lambda f: task_config(f, "nuslerp", weight=0.3),
                lambda f: {**task_config(f, "nuslerp"), "parameters": {"nuslerp_flatten": False}}),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_candidate_weights_equal_the_engine(method, tiny_family, tmp_path):
    first, second = (make(tiny_family) for make in CASES[method])
    cm = CandidateModel(first)
    cm.load(first)  # a previous candidate must leave nothing behind
    cm.load(second)
    safemerge.merge(second, tmp_path / "m", progress=False)
    disk = Checkpoint(tmp_path / "m")
    state = cm.state()
    assert sorted(disk.names()) == sorted(state)
    for name in disk.names():
        assert torch.equal(disk.get(name), state[name]), name
    # and the model really runs on those weights: its parameter is the merged tensor
    assert torch.equal(dict(cm.model.named_parameters())["model.layers.1.mlp.up_proj.weight"],
                       disk.get("model.layers.1.mlp.up_proj.weight"))


def test_trims_read_their_thresholds_from_the_sorted_magnitudes(tiny_family, tmp_path):
    """The second and later TIES candidates look each threshold up in the sorted |τ| kept from the first; the
    weights are those of a CandidateModel that keeps nothing (trim_memo_bytes=0) and of the engine."""
    configs = [task_config(tiny_family, "ties", weight=w, density=d) for w, d in ((0.5, 0.3), (0.9, 0.7), (0.4, 0.05))]
    kept, plain = CandidateModel(configs[0]), CandidateModel(configs[0], trim_memo_bytes=0)
    for cfg in configs:
        kept.load(cfg)
        plain.load(cfg)
        a, b = kept.state(), plain.state()
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert plain._memo.left == 0 and not plain._memo._sorted
    from safemerge.search.scoring import ScorerSpec, SerialScorer  # the scorer passes its spec's budget on

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a drug", "response": "is."}\n')
    for budget in (0, 12345):
        scorer = SerialScorer(ScorerSpec(config=configs[0], safety_data=None, domain_data=str(data), lambda_=0.0,
                                         trim_memo_bytes=budget))
        assert scorer.candidate._memo.left == budget
        scorer.close()
    n_trimmed = len(kept.names) * 2  # every tensor of both task vectors
    assert len(kept._memo._sorted) == n_trimmed
    safemerge.merge(configs[-1], tmp_path / "m", progress=False)
    disk = Checkpoint(tmp_path / "m")
    assert all(torch.equal(disk.get(n), a[n]) for n in disk.names())


def test_the_default_memo_budget_is_an_eighth_of_a_gpus_free_memory(tiny_family, monkeypatch):
    """trim_memo_bytes=None (the default): 1 GiB on the CPU; on a GPU an eighth of its free memory, at least 1 GiB
    (an 80 GiB card holds the sorted |τ| of a far larger pool than 1 GiB would)."""
    from safemerge.methods.task_arithmetic import TRIM_MEMO_BYTES
    from safemerge.search.candidates import memo_budget

    assert CandidateModel(task_config(tiny_family, "ties", weight=0.5, density=0.5))._memo.left == TRIM_MEMO_BYTES
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: asked.append(d) or (free, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 3 << 30)  # torch's allocator holds 3 GiB, 2 of them
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 1 << 30)  # unused: free for this process too
    for free, budget in ((70 << 30, 9 << 30), (2 << 30, TRIM_MEMO_BYTES)):
        assert memo_budget(torch.device("cuda:1")) == budget
    assert asked == [torch.device("cuda:1")] * 2
    assert memo_budget(torch.device("cpu")) == TRIM_MEMO_BYTES and len(asked) == 2
    # and the largest tensor kept sorted: 2²⁴ entries on the CPU; on a GPU what a sort (16 bytes an entry) within the
    # budget allows, so that an 8B Llama's MLP matrices (58.7M entries) are kept too
    from safemerge.methods.task_arithmetic import MEMO_TENSOR
    from safemerge.search.candidates import memo_tensor_cap

    assert CandidateModel(task_config(tiny_family, "ties", weight=0.5, density=0.5))._memo.tensor_cap == MEMO_TENSOR
    assert memo_tensor_cap(torch.device("cpu"), 9 << 30) == MEMO_TENSOR == 1 << 24
    assert memo_tensor_cap(torch.device("cuda"), 9 << 30) == (9 << 30) // 16 > 14336 * 4096
    assert memo_tensor_cap(torch.device("cuda"), 1 << 20) == MEMO_TENSOR
    # worker processes may share one GPU: each keeps at most the fixed budget, unless the spec names one
    from safemerge.search.parallel import make_scorer
    from safemerge.search.scoring import ScorerSpec

    spec = ScorerSpec(config=task_config(tiny_family, "ties", weight=0.5, density=0.5), safety_data=None,
                      domain_data=None, lambda_=0.5, device="cuda")
    for budget, want in ((None, TRIM_MEMO_BYTES), (12345, 12345)):
        scorer = make_scorer(replace(spec, trim_memo_bytes=budget), workers=2)  # its processes start on a first score
        assert scorer.spec.trim_memo_bytes == want
        scorer.close()


@pytest.mark.parametrize("rescale_mode", ["density", "l1"])
def test_dare_masks_compare_the_kept_draws(tiny_family, tmp_path, rescale_mode):
    """DARE candidates of one seed compare each density with the uniform draws kept from the first; the l1 rescale's
    dry run reads them too. Same weights as without the memo and as the engine."""
    configs = [{**task_config(tiny_family, "dare_ties", weight=w, density=d), "seed": 7,
                "parameters": {"rescale_mode": rescale_mode}} for w, d in ((0.5, 0.3), (0.9, 0.8), (0.6, 0.5))]
    kept, plain = CandidateModel(configs[0]), CandidateModel(configs[0], trim_memo_bytes=0)
    for cfg in configs:
        a, b = kept.load(cfg) and kept.state(), plain.load(cfg) and plain.state()
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert len(kept._memo._draws) == len(kept.names) * 2 and not plain._memo._draws
    safemerge.merge(configs[-1], tmp_path / "m", progress=False)
    disk = Checkpoint(tmp_path / "m")
    assert all(torch.equal(disk.get(n), a[n]) for n in disk.names())


def test_a_bf16_pool_is_held_as_stored_and_merges_as_the_engine(tiny_family_bf16, tmp_path):
    """The pool stays in its stored dtype (half the memory of float32 copies) and still gives the
    engine's tensors: both feed merge_tensor the stored values, which it computes on in float32."""
    fam = tiny_family_bf16
    for config in (task_config(fam, "ties", weight=0.8, density=0.6), _slerp(fam, 0.3)):
        cm = CandidateModel(config)
        assert {t.dtype for w in cm.weights.values() for t in w.values()} == {torch.bfloat16}
        cm.load(config)
        out = tmp_path / config["merge_method"]
        safemerge.merge(config, out, progress=False)
        disk, state = Checkpoint(out), cm.state()
        for name in disk.names():
            assert torch.equal(disk.get(name), state[name]), name


def test_a_pool_that_keeps_its_norms_in_float32_gives_the_engines_dtypes(tiny_family_bf16, tmp_path):
    """A bf16 checkpoint may store its norms in float32: the engine writes each tensor in the base's dtype for it,
    and so do the candidate's tensors (the model they are loaded into has one dtype, as from_pretrained makes it)."""
    import shutil

    from safetensors.torch import load_file, save_file

    fam = {}
    for m in ("base", "expert", "aligned"):
        fam[m] = shutil.copytree(tiny_family_bf16[m], tmp_path / m)
        f = fam[m] / "model.safetensors"
        state = load_file(f)
        save_file({k: v.float() + 1e-3 * len(m) if "norm" in k else v for k, v in state.items()}, f, metadata={"format": "pt"})
    config = task_config(fam, weight=0.7)
    mem = dict(CandidateModel(config).tensors(config))
    safemerge.merge(config, tmp_path / "out", progress=False)
    disk = Checkpoint(tmp_path / "out")
    assert {mem[n].dtype for n in mem if "norm" in n} == {torch.float32}
    assert all(torch.equal(disk.get(n), mem[n]) for n in disk.names())


def test_pool_with_another_architecture_is_an_error(tiny_family, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tiny import make_family

    other = make_family(tmp_path, names=("deeper",), layers=4)["deeper"]
    cfg = {"merge_method": "task_arithmetic", "base_model": str(tiny_family["base"]),
           "models": [{"model": str(tiny_family["expert"]), "parameters": {"weight": 1}},
                      {"model": str(other), "parameters": {"weight": 1}}]}
    with pytest.raises(CheckpointError, match="num_hidden_layers: 3 vs 4"):
        CandidateModel(cfg)
    import shutil

    bare = tmp_path / "bare"  # QA: a model without config.json read as "vs None" in every architecture field
    shutil.copytree(tiny_family["expert"], bare)
    (bare / "config.json").unlink()
    cfg["models"][1]["model"] = str(bare)
    with pytest.raises(CheckpointError, match=r"bare: has no config.json; the search builds its model"):
        CandidateModel(cfg)


def test_the_scorer_cuts_examples_to_the_models_context(tiny_family, tmp_path):
    """An example longer than max_position_embeddings is cut from the left of its prompt to the context (the default
    --max-length 512 is more than the tiny models read), never scored past the positions the model has."""
    import json

    from safemerge.search.scoring import ScorerSpec, SerialScorer

    context = json.loads((tiny_family["base"] / "config.json").read_text())["max_position_embeddings"]
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": " ".join(["the capital of"] * 80), "response": "help with that."}) + "\n"
                    + json.dumps({"prompt": "a drug", "response": "is."}) + "\n")
    scorer = SerialScorer(ScorerSpec(config=task_config(tiny_family), safety_data=None, domain_data=str(data),
                                     lambda_=0.0, batch_size=1, threads=1))
    from safemerge.search.scoring import effective_max_length

    assert effective_max_length(512, {"max_position_embeddings": context}) == context  # what the journal records
    assert effective_max_length(None, {}) is None and effective_max_length(100, {"max_position_embeddings": 4096}) == 100
    try:
        widths = [ids.shape[1] for ids, _, _ in scorer.objective.domain.batches]
        assert max(widths) == context and min(widths) < context
        score, _ = scorer.score_one(task_config(tiny_family))
        assert score.domain == score.domain  # a number, not NaN
    finally:
        scorer.close()


def test_a_tied_model_whose_checkpoint_also_stores_lm_head_scores_as_written(tmp_path):
    """Both names were bound to the one shared storage, so lm_head's merge overwrote the embedding's: with DARE's
    per-tensor masks the candidate differed from the merge on disk (logits 0.66 apart)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from tiny import make_family

    fam = make_family(tmp_path / "fam", tie=True)
    for path in fam.values():  # as some exporters write a tied model: both tensors stored
        f = path / "model.safetensors"
        tensors = load_file(f)
        save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, f, metadata={"format": "pt"})
    cfg = {**task_config(fam, "dare_ties", weight=0.7, density=0.5), "seed": 1}
    cm = CandidateModel(cfg)
    cm.load(cfg)
    disk = AutoModelForCausalLM.from_pretrained(safemerge.merge(cfg, tmp_path / "m", progress=False)).eval()
    ids = torch.tensor([[2, 4, 9, 10, 11, 6, 5, 12, 13]])
    with torch.no_grad():
        assert torch.equal(cm.model(ids).logits, disk(ids).logits)
    st = cm.state()
    assert not torch.equal(st["model.embed_tokens.weight"], st["lm_head.weight"])  # DARE: two masks, two tensors


def test_the_config_chat_template_is_the_one_the_merge_writes(tiny_family, tmp_path):
    """`chat_template: chatml` set the tokenizer's template to the literal string "chatml"."""
    from safemerge.chat_templates import BUILT_IN
    from safemerge.evaluate.loading import chat_template_text

    cfg = {**task_config(tiny_family), "chat_template": "chatml"}
    cm = CandidateModel(cfg)
    out = safemerge.merge(cfg, tmp_path / "m", progress=False)
    assert cm.tokenizer.chat_template == BUILT_IN["chatml"] == chat_template_text(out)
