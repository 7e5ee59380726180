"""The real code paths on the architectures practitioners merge, not only Llama.

Each case is a tiny random family (base; expert = base + small deltas; aligned = base + other deltas) of one
architecture, built from a config object (nothing is downloaded):

- qwen2:   attention q/k/v biases, `tie_word_embeddings=True` (no lm_head.weight in the checkpoint)
- mistral: the Llama layout under another model_type, untied head
- gemma:   tied embeddings, embeddings scaled by √hidden, RMSNorm as (1 + w)
- gemma2:  tied, extra pre/post feed-forward norms, sliding-window layers
- phi3:    fused `qkv_proj` and `gate_up_proj`, untied head
- gpt2:    Conv1D layers (weights stored transposed, (in, out)), tied `wte`, learned position embeddings
- qwen2-bf16: the Qwen2 family stored in bfloat16, as real checkpoints are
- mistral-sw, gemma2-sw (evaluation only): a sliding window of 8 tokens, shorter than every prompt, so that
  batched generation's left padding meets windowed attention

The tokenizer mimics Llama-3's specifics: a byte-level BPE with a `<|begin_of_text|>`-style BOS, a chat template
whose turns end with `<|eot_id|>`, no pad token, and a generation_config.json whose eos_token_id is a list
([end-of-text, end-of-turn]).

Every path goes through the public API: `safemerge.merge` (task_arithmetic, ties, slerp) against the formulas
computed here by hand, `safemerge.mergealign`, `safemerge.evaluate_safety` / `evaluate_domain` (batched against
one at a time and against transformers' own greedy generation), the search's in-memory `CandidateModel` and
`SerialScorer` against `merge`'s output, and `safemerge.extract_lora` through peft.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "evaluate"))
from eval_tiny import PROMPTS, QUESTIONS, build_tokenizer  # noqa: E402  (the evaluation tests' tiny tokenizer)

import safemerge  # noqa: E402

# -- the cases --------------------------------------------------------------------------------------------
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 32, 2, 4, 2, 8
INIT = 0.1  # weights' std: large enough for peaked logits (greedy choices that numerics do not flip)
BASE_NOISE, DELTA = 0.05, 0.02  # base = HF init + BASE_NOISE·N(0,1) (no zero biases, no exact-one norms)

LLAMA3_TEMPLATE = (  # Llama-3's chat template (shortened): BOS, header tokens, turns ended by <|eot_id|>
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _common(vocab: int, special: dict) -> dict:
    return dict(vocab_size=vocab, initializer_range=INIT, bos_token_id=special["bos"], eos_token_id=special["eos"],
                pad_token_id=None)


def make_config(arch: str, vocab: int, special: dict, *, window: int | None = None):
    import transformers as tf

    c = _common(vocab, special)
    llama_like = dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256)
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like, tie_word_embeddings=True, **c)
    if arch == "mistral":
        return tf.MistralConfig(**llama_like, tie_word_embeddings=False, sliding_window=window, **c)
    if arch == "gemma":
        return tf.GemmaConfig(**llama_like, head_dim=HEAD_DIM, tie_word_embeddings=True, **c)
    if arch == "gemma2":
        return tf.Gemma2Config(**llama_like, head_dim=HEAD_DIM, tie_word_embeddings=True, sliding_window=window or 128, **c)
    if arch == "phi3":
        return tf.Phi3Config(**llama_like, tie_word_embeddings=False, **c)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=256, tie_word_embeddings=True, **c)
    raise ValueError(arch)


CASES = ["qwen2", "mistral", "gemma", "gemma2", "phi3", "gpt2", "qwen2-bf16"]
# evaluation only: a sliding window (8 tokens) shorter than every prompt, so left padding meets windowed attention
WINDOWED = ["mistral-sw", "gemma2-sw"]
TIED = {"qwen2": True, "mistral": False, "gemma": True, "gemma2": True, "phi3": False, "gpt2": True}

# (case, path) -> reason: what peft cannot do with safemerge's adapters (strict, so a peft release that can shows up).
# peft 0.21.2 runs a LoRA on a tied embedding unmerged on the input lookup only, not on the tied lm_head; its
# ensure_weight_tying fixes that but then merges the update twice (huggingface/peft#2777), so extract_lora does not set
# it, warns, and docs/methods.md says the adapter is the fine-tune once merged (merge_and_unload or BASE+ADAPTER).
_UNMERGED_TIED = "peft 0.21.2 applies a tied-embedding LoRA unmerged to the input lookup only (docs/methods.md)"
KNOWN: dict[tuple[str, str], str] = {(c, "extract_lora_peft_unmerged"): _UNMERGED_TIED
                                     for c in ("qwen2", "gemma", "gemma2", "gpt2", "qwen2-bf16")}


def cases(path: str, extra: tuple[str, ...] = ()):
    out = []
    for case in [*CASES, *extra]:
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN[case, path])] if (case, path) in KNOWN else []
        out.append(pytest.param(case, id=case, marks=marks))
    return out


def arch_of(case: str) -> str:
    return case.split("-")[0]


def dtype_of(case: str) -> torch.dtype:
    return torch.bfloat16 if case.endswith("-bf16") else torch.float32


pytestmark = pytest.mark.usefixtures("one_thread")  # the root conftest's


# -- the tokenizer and the families -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE, Llama-3 style: BOS `<|begin_of_text|>`, EOS `</s>` (end of text), turns end with
    `<|eot_id|>` (a second EOS that only generation_config.json names), no pad token."""
    tok = build_tokenizer(chat_template=LLAMA3_TEMPLATE, bos="<|begin_of_text|>", eos="</s>")
    tok.pad_token = None
    assert tok.pad_token_id is None
    return tok


def special_ids(tok) -> dict:
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    return {"bos": tok.bos_token_id, "eos": [tok.eos_token_id, eot], "eot": eot}


_FAMILIES: dict[str, dict[str, Path]] = {}


@pytest.fixture(scope="module")
def families(tmp_path_factory, tokenizer):
    """case -> {"base", "expert", "aligned": folder}; each family built on first use."""

    def get(case: str) -> dict[str, Path]:
        if case not in _FAMILIES:
            _FAMILIES[case] = build_family(tmp_path_factory.mktemp(case), case, tokenizer)
        return _FAMILIES[case]

    yield get
    _FAMILIES.clear()


def build_family(root: Path, case: str, tok) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    arch, dtype = arch_of(case), dtype_of(case)
    special = special_ids(tok)
    cfg = make_config(arch, len(tok), special, window=8 if case.endswith("-sw") else None)
    seed = [*CASES, *WINDOWED].index(case)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in base.parameters():  # tied parameters appear once
            p.add_(BASE_NOISE * torch.randn_like(p))
    state = {k: v.clone() for k, v in base.state_dict().items()}
    paths = {}
    for i, name in enumerate(("base", "expert", "aligned")):
        model = AutoModelForCausalLM.from_config(cfg)
        g = torch.Generator().manual_seed(1000 * seed + i)
        with torch.no_grad():
            model.load_state_dict(state)
            if name != "base":
                for p in model.parameters():
                    p.add_(DELTA * torch.randn(p.shape, generator=g))
        model.to(dtype)
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
        gen = {"bos_token_id": special["bos"], "eos_token_id": special["eos"], "do_sample": False}
        (paths[name] / "generation_config.json").write_text(json.dumps(gen))
    return paths


# -- helpers ----------------------------------------------------------------------------------------------
def file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def load(folder: Path, **kw):
    """The model as transformers loads it, and what it says about missing / unexpected / mismatched keys."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kw)
    return model.eval(), info


def loaded_state(folder: Path) -> dict[str, torch.Tensor]:
    model, info = load(folder)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (folder, info)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_close(got: dict, want: dict, dtype: torch.dtype, *, what: str) -> None:
    assert set(got) == set(want), f"{what}: names differ: {sorted(set(got) ^ set(want))[:5]}"
    for k in want:
        assert got[k].dtype == dtype, f"{what}: {k} is {got[k].dtype}, expected {dtype}"
        if dtype == torch.bfloat16:  # the formula in float32, cast once: at most a rounding step apart
            torch.testing.assert_close(got[k].float(), want[k].float(), rtol=1e-2, atol=1e-4, msg=lambda m: f"{what} {k}: {m}")
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} {k}: {m}")


def check_output_layout(out: Path, base: Path) -> None:
    """The output has the base's tensors (no lm_head added to or dropped from a tied model) and its tying."""
    assert set(file_tensors(out)) == set(file_tensors(base))
    oc, bc = (json.loads((p / "config.json").read_text()) for p in (out, base))
    assert oc["model_type"] == bc["model_type"] and oc["architectures"] == bc["architectures"]
    assert oc.get("tie_word_embeddings") == bc.get("tie_word_embeddings"), (oc.get("tie_word_embeddings"), bc.get("tie_word_embeddings"))
    assert (out / "chat_template.jinja").is_file() or "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == json.loads((base / "generation_config.json").read_text())["eos_token_id"]


def inputs_f32(fam: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.float() for k, v in loaded_state(p).items()} for n, p in fam.items()}


def ties_ref(base: torch.Tensor, others: list[torch.Tensor], weights: list[float], densities: list[float]) -> torch.Tensor:
    """TIES as docs/methods.md states it: trim each τ_i to its top-k by magnitude (k = max(1, ⌊ρ_i·n⌋), ties in
    index order), elect the sign of Σ w_i·τ̃_i (+ where ≥ 0), disjoint weighted mean (normalize: true), divisor 1
    where no model agrees."""
    taus = []
    for x, rho in zip(others, densities):
        tau = (x - base).flatten()
        k = max(1, int(rho * tau.numel()))
        idx = torch.sort(tau.abs(), descending=True, stable=True).indices[:k]
        kept = torch.zeros_like(tau)
        kept[idx] = tau[idx]
        taus.append(kept)
    weighted = [w * t for w, t in zip(weights, taus)]
    sign = torch.where(sum(weighted) >= 0, 1.0, -1.0)
    num = torch.zeros_like(taus[0])
    den = torch.zeros_like(taus[0])
    for w, t, wt in zip(weights, taus, weighted):
        agree = (torch.sign(wt) == sign) & (t != 0)
        num += torch.where(agree, wt, 0.0)
        den += torch.where(agree, torch.full_like(t, w), 0.0)
    den = torch.where(den == 0, 1.0, den)
    return base + (num / den).reshape(base.shape)


def slerp_ref(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's SLERP of whole (flattened) tensors, in float64; linear where |cos Ω| > 0.9995."""
    a, b = v0.double().flatten(), v1.double().flatten()
    na, nb = a.norm(), b.norm()
    an = a / na if na > 1e-8 else a
    bn = b / nb if nb > 1e-8 else b
    dot = float((an * bn).sum())
    if abs(dot) > 0.9995:
        out = (1 - t) * a + t * b
    else:
        omega = math.acos(dot)
        s0, s1 = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
        out = s0 * a + s1 * b
    return out.reshape(v0.shape).float()


# -- 1. merge: task_arithmetic, ties, slerp ---------------------------------------------------------------
def ta_config(fam, **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
            "models": [{"model": str(fam["expert"]), "parameters": {"weight": 0.7}},
                       {"model": str(fam["aligned"]), "parameters": {"weight": 0.5}}], **extra}


def ties_config(fam) -> dict:
    return {"merge_method": "ties", "base_model": str(fam["base"]),
            "models": [{"model": str(fam["expert"]), "parameters": {"weight": 1.0, "density": 0.5}},
                       {"model": str(fam["aligned"]), "parameters": {"weight": 0.6, "density": 0.7}}]}


def slerp_config(fam) -> dict:
    return {"merge_method": "slerp", "base_model": str(fam["base"]),
            "models": [{"model": str(fam["base"])}, {"model": str(fam["expert"])}], "parameters": {"t": 0.3}}


def merge_and_load(case: str, families, config, out: Path) -> tuple[torch.dtype, dict, dict]:
    """Merge by `config` (a dict, or a YAML file as the CLI and mergekit take it) into `out`: (the case's dtype, its
    inputs in float32, the output as transformers loads it), the output's layout checked against the base's."""
    fam = families(case)
    check_output_layout(safemerge.merge(config, out, progress=False), fam["base"])
    return dtype_of(case), inputs_f32(fam), loaded_state(out)


@pytest.mark.parametrize("case", cases("task_arithmetic"))
def test_merge_task_arithmetic(case, families, tmp_path):
    import yaml

    cfg_file = tmp_path / "ta.yml"
    cfg_file.write_text(yaml.safe_dump(ta_config(families(case))))
    dtype, x, got = merge_and_load(case, families, cfg_file, tmp_path / "out")
    want = {k: (b + 0.7 * (x["expert"][k] - b) + 0.5 * (x["aligned"][k] - b)).to(dtype) for k, b in x["base"].items()}
    assert_state_close(got, want, dtype, what=f"{case} task_arithmetic")


@pytest.mark.parametrize("case", cases("ties"))
def test_merge_ties(case, families, tmp_path):
    dtype, x, got = merge_and_load(case, families, ties_config(families(case)), tmp_path / "out")
    want = {k: ties_ref(b, [x["expert"][k], x["aligned"][k]], [1.0, 0.6], [0.5, 0.7]).to(dtype)
            for k, b in x["base"].items()}
    if dtype == torch.bfloat16:  # a selection on rounded inputs: compare the share of elements that differ
        for k in want:
            bad = ~torch.isclose(got[k].float(), want[k].float(), rtol=1e-2, atol=1e-4)
            assert bad.float().mean() < 0.01, f"{case} ties {k}: {int(bad.sum())} of {bad.numel()} elements differ"
    else:
        assert_state_close(got, want, dtype, what=f"{case} ties")


@pytest.mark.parametrize("case", cases("slerp"))
def test_merge_slerp(case, families, tmp_path):
    dtype, x, got = merge_and_load(case, families, slerp_config(families(case)), tmp_path / "out")
    want = {k: slerp_ref(b, x["expert"][k], 0.3).to(dtype) for k, b in x["base"].items()}
    assert_state_close(got, want, dtype, what=f"{case} slerp")


# -- 2. MergeAlign ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", cases("mergealign"))
def test_mergealign(case, families, tmp_path):
    fam, dtype = families(case), dtype_of(case)
    out = safemerge.mergealign(base=fam["base"], domains=[fam["expert"]], aligned=fam["aligned"], out=tmp_path / "ma",
                               alpha=1.0, beta=1.0, progress=False)
    check_output_layout(out, fam["base"])
    x = inputs_f32(fam)
    want = {k: (b + (x["expert"][k] - b) + (x["aligned"][k] - b)).to(dtype) for k, b in x["base"].items()}
    assert_state_close(loaded_state(out), want, dtype, what=f"{case} mergealign")


# -- 3. evaluation ----------------------------------------------------------------------------------------
N_PROMPTS, MAX_NEW = 5, 6


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hf_greedy(folder: Path, prompts: list[str]) -> list[list[int]]:
    """transformers' own greedy generation, one prompt at a time (no padding), stopped at generation_config's EOS
    list: the reference the batched evaluation must reproduce."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model, _ = load(folder)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    out = []
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids  # the template writes the BOS
        assert ids[0, 0] == tok.bos_token_id and (ids[0] == tok.bos_token_id).sum() == 1
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        new = gen[0, ids.shape[1]:].tolist()
        cut = next((i for i, t in enumerate(new) if t in eos), None)
        out.append(new if cut is None else new[:cut])
    return out


@pytest.mark.parametrize("case", cases("evaluate", tuple(WINDOWED)))
def test_evaluate_safety_and_domain(case, families, tmp_path):
    fam = families(case)
    model = fam["expert"]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:N_PROMPTS])
    task = write_jsonl(tmp_path / "task.jsonl", QUESTIONS)
    store = tmp_path / "results.sqlite"
    runs = {}
    for bs in (4, 1):  # 4: two batches of different widths, left-padded, with no pad token
        res = safemerge.evaluate_safety(model, prompts=prompts, max_new_tokens=MAX_NEW, batch_size=bs, device="cpu",
                                        store=store, cache=False, out=tmp_path / f"resp-{bs}.jsonl")
        assert 0.0 <= res["safe_rate"] <= 1.0
        runs[bs] = [json.loads(line) for line in (tmp_path / f"resp-{bs}.jsonl").read_text().splitlines()]
    assert [r["response"] for r in runs[4]] == [r["response"] for r in runs[1]], "batched generation differs from one at a time"
    assert [r["new_tokens"] for r in runs[4]] == [r["new_tokens"] for r in runs[1]]

    if dtype_of(case) == torch.float32:  # against transformers itself (bf16 argmaxes may flip on rounding)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        ref = hf_greedy(model, [p["prompt"] for p in PROMPTS[:N_PROMPTS]])
        assert [r["new_tokens"] for r in runs[4]] == [len(t) for t in ref]
        assert [r["response"] for r in runs[4]] == [tok.decode(t, skip_special_tokens=True) for t in ref]

    accs = {}
    for bs in (3, 1):
        for fmt in ("plain", "chat"):
            d = safemerge.evaluate_domain(model, task=task, format=fmt, batch_size=bs, device="cpu", store=store, cache=False)
            assert d["n"] == len(QUESTIONS) and d["format"] == fmt
            assert 0.0 <= d["acc"] <= 1.0 and 0.0 <= d["acc_norm"] <= 1.0
            accs[bs, fmt] = (d["acc"], d["acc_norm"])
    assert accs[3, "plain"] == accs[1, "plain"] and accs[3, "chat"] == accs[1, "chat"]


# -- 4. the search's in-memory candidates -----------------------------------------------------------------
@pytest.mark.parametrize("case", cases("search"))
def test_search_candidates_equal_merge(case, families, tmp_path):
    from safemerge.search import CandidateModel
    from safemerge.search.scoring import ScorerSpec, SerialScorer

    fam = families(case)
    pool = ties_config(fam)
    cand = CandidateModel(pool)
    for name, cfg in (("ta", ta_config(fam)), ("ties", ties_config(fam))):
        out = safemerge.merge(cfg, tmp_path / name, progress=False)
        written = file_tensors(out)
        got = dict(cand.tensors(cfg))
        assert set(got) == set(written), sorted(set(got) ^ set(written))
        for k, v in written.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), f"{case} {name}: in-memory {k} differs from merge's"
        # the loaded model's forward pass equals the written model's (tied heads, fused layers and all)
        model = cand.load(cfg)
        ref, _ = load(out)
        ids = torch.tensor([[1, 5, 9, 40, 77, 3, 12]])
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
        state = cand.state()
        for k, v in written.items():
            assert torch.equal(state[k], v)

    pairs = [{"prompt": p["prompt"], "response": "I'm sorry, I can't help with that."} for p in PROMPTS[:4]]
    domain = [{"prompt": q["question"], "response": q["choices"][0]} for q in QUESTIONS[:4]]
    spec = ScorerSpec(config=pool, safety_data=str(write_jsonl(tmp_path / "s.jsonl", pairs)),
                      domain_data=str(write_jsonl(tmp_path / "d.jsonl", domain)), lambda_=0.5, batch_size=3, threads=1)
    scorer = SerialScorer(spec)
    try:
        score, _ = scorer.score_one(ta_config(fam))
        assert all(math.isfinite(v) and v > 0 for v in (score.safety, score.domain, score.objective)), score
        assert score.objective == pytest.approx(0.5 * score.safety + 0.5 * score.domain)
        # the same CE from the merged model written to disk, loaded by transformers
        ref, _ = load(tmp_path / "ta")
        assert scorer.objective(ref).objective == pytest.approx(score.objective, rel=1e-5)
    finally:
        scorer.close()


# -- 5. extract_lora --------------------------------------------------------------------------------------
IDS = torch.tensor([[1, 5, 9, 40, 77, 3, 12]])


@pytest.fixture(scope="module")
def adapters(families, tmp_path_factory):
    """case -> the expert's full-rank adapter (extracted once per case)."""
    made = {}

    def get(case: str):
        if case not in made:
            fam = families(case)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = safemerge.extract_lora(fam["expert"], fam["base"], tmp_path_factory.mktemp(case) / "lora",
                                             rank=1024, progress=False)
            made[case] = res, [str(w.message) for w in caught]
        return made[case]

    return get


def _tol(dtype):
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", cases("extract_lora"))
def test_extract_lora_full_rank_merges_back_to_the_expert(case, families, adapters):
    """peft loads the adapter onto the base; merged (merge_and_unload) it is the expert, and so is safemerge's own
    BASE+ADAPTER reading of it."""
    peft = pytest.importorskip("peft")
    fam, dtype = families(case), dtype_of(case)
    res, notes = adapters(case)
    # bf16 factors (the model's dtype) round B and A: ‖Δ − B·A‖/‖Δ‖ is then a few bf16 ulps, not 0
    assert res.total_error < (1e-2 if dtype == torch.bfloat16 else 1e-5), res.total_error
    assert json.loads((res.path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    if TIED[arch_of(case)]:
        assert any("tied" in n and "unmerged updates the input embeddings only" in n for n in notes), notes

    base, _ = load(fam["base"])
    expert = loaded_state(fam["expert"])
    merged = peft.PeftModel.from_pretrained(base, str(res.path)).eval().merge_and_unload()
    got = {k: v.detach() for k, v in merged.state_dict().items()}
    assert set(got) == set(expert)
    for k in expert:
        assert got[k].dtype == dtype
        torch.testing.assert_close(got[k].float(), expert[k].float(), **_tol(dtype), msg=lambda m: f"{case} merged {k}: {m}")
    exp_model, _ = load(fam["expert"])
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits.float(), exp_model(IDS).logits.float(),
                                   **(dict(rtol=5e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)))

    from safemerge.lora import open_model

    ours = open_model(f"{fam['base']}+{res.path}")
    raw = file_tensors(fam["expert"])
    assert set(ours.names()) == set(raw)
    for k, v in raw.items():
        torch.testing.assert_close(ours.get(k).float(), v.float(), **_tol(dtype), msg=lambda m: f"{case} BASE+ADAPTER {k}: {m}")


@pytest.mark.parametrize("case", cases("extract_lora_peft_unmerged"))
def test_extract_lora_full_rank_as_peft_runs_it_unmerged(case, families, adapters):
    """The adapter as peft runs it for inference (PeftModel, not merged) gives the expert's logits."""
    peft = pytest.importorskip("peft")
    fam, dtype = families(case), dtype_of(case)
    res, _ = adapters(case)
    base, _ = load(fam["base"])
    model = peft.PeftModel.from_pretrained(base, str(res.path)).eval()
    exp_model, _ = load(fam["expert"])
    with torch.no_grad():
        got, want = model(input_ids=IDS).logits.float(), exp_model(IDS).logits.float()
    tol = dict(rtol=5e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{case}: PeftModel (unmerged) logits: {m}")
