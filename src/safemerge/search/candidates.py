"""In-memory candidates: the pool read once, one model whose weights each candidate overwrites in place.

A search scores hundreds of merges of the same pool. Writing each to disk and loading it again costs
more than scoring it, so `CandidateModel` reads every input model once (in its stored dtype), holds one HF
model, and for each candidate config computes every tensor with `safemerge.engine.merge_tensor` (the
one place where a config becomes a method call, so the weights equal what `safemerge.merge` would
write for that config, cast to the same output dtype) and copies it into the model's parameter.

Memory: (number of input models) × (model size) for the pool, plus the model itself, plus for
TIES and breadcrumbs the sorted |τ_i| of each tensor of up to 2²⁴ entries (on a GPU more: `memo_tensor_cap`) and for
DARE its uniform draws (float32, on the device, up to `trim_memo_bytes` in all; the rest is computed afresh for each
candidate): a trim at a new density is then a binary search, a DARE mask a comparison (`TrimMemo`). By default
(`trim_memo_bytes=None`) the memo may keep 1 GiB on the CPU, and on a GPU an eighth of the memory free once the pool is
read, at least 1 GiB (`memo_budget`; worker processes and Ray actors, which may share a GPU, keep 1 GiB each:
`make_scorer`).
The task vectors τ_i = θ_i − θ_base are formed by `merge_tensor` from the held weights on each call
(one subtraction per tensor, cheap beside scoring); holding θ_i rather than τ_i is what lets every
method (task vectors, whole-weight and SLERP) go through the engine's own code path.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch

from safemerge import chat_templates
from safemerge._hf import quiet_transformers
from safemerge.checkpoint import Checkpoint, name_alike
from safemerge.config import DTYPES, MergeConfig, load_config
from safemerge.engine import check_device, merge_tensor, tokenizer_dirs
from safemerge.errors import CheckpointError, ConfigError
from safemerge.layout import num_layers, position, stream_order, tied_source
from safemerge.lora import open_model
from safemerge.methods.task_arithmetic import MEMO_TENSOR, TRIM_MEMO_BYTES, TrimMemo, remembering
from safemerge.vocab import vocab_plan


def memo_tensor_cap(device: torch.device, budget: int) -> int:
    """The largest tensor whose sorted |τ| the memo keeps: MEMO_TENSOR (2²⁴ entries) on the CPU; on a GPU as many as a
    sort of 16 bytes per entry within the budget allows (an 8B Llama's MLP matrices have 2²⁵·⁸ entries), at least
    MEMO_TENSOR."""
    return MEMO_TENSOR if device.type != "cuda" else max(MEMO_TENSOR, budget // 16)


def memo_budget(device: torch.device) -> int:
    """The TrimMemo's default budget: TRIM_MEMO_BYTES on the CPU; on a GPU an eighth of its free memory (asked once the
    pool is read, before the model is built and scored; free counts what torch's allocator holds unused, which this
    process can reuse), TRIM_MEMO_BYTES at least."""
    if device.type != "cuda":
        return TRIM_MEMO_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(TRIM_MEMO_BYTES, free // 8)


# config.json keys that must agree for two checkpoints to be one architecture
_ARCH_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "intermediate_size", "vocab_size", "n_embd", "n_layer", "n_head")


def check_architecture(models: Mapping[str, Checkpoint]) -> None:
    """Raise CheckpointError when the pool's config.json files describe different architectures."""
    items = list(models.items())
    for name, ckpt in items:
        if not ckpt.config:  # compared with the others' it would read as "vs None" in every field
            raise CheckpointError(f"{name}: has no config.json; the search builds its model from the pool's config, "
                                  "so every model needs the config.json it was saved with (save_pretrained writes it)")
    ref_name, ref = items[0]
    for name, ckpt in items[1:]:
        diff = [k for k in _ARCH_KEYS if k in ref.config or k in ckpt.config
                if ref.config.get(k) != ckpt.config.get(k)]
        if diff:
            detail = ", ".join(f"{k}: {ref.config.get(k)!r} vs {ckpt.config.get(k)!r}" for k in diff)
            raise CheckpointError(f"{name}: differs in architecture from {ref_name} ({detail}); "
                                  "a merge pool must share one architecture (fine-tunes of the same base)")


class CandidateModel:
    """One preallocated HF causal LM that takes the weights of any merge config of a fixed pool.

    The pool (base, models, method) is fixed by `config`; candidates may change the numbers in its
    parameters (weights, densities, t) and the method, but not the models.
    """

    def __init__(self, config: MergeConfig | Mapping | str, *, device: str = "cpu", allow_pickle: bool = False,
                 trim_memo_bytes: int | None = None):
        self.config = load_config(config).require_whole_models("an in-memory candidate")
        self.device = torch.device(check_device(device))
        self.models = {m: open_model(m, allow_pickle=allow_pickle) for m in self.config.input_models()}
        name_alike(self.models.values())
        check_architecture(self.models)
        self.reference = self.models[self.config.base_model or self.config.models[0].model]
        self.names = stream_order(n for n in self.reference.names() if self.reference.dtype(n).is_floating_point)
        if vocab_plan(self.config.vocab_source, self.config.vocab_padding, models=self.models,
                      base_model=self.config.base_model, routes={n: {m: n for m in self.models} for n in self.names},
                      tokens=self.config.vocab_tokens):
            raise ConfigError("the search needs models that share one vocabulary, merged row by row: here the pool's "
                              "vocabularies differ, or tokenizer padding or `tokenizer.tokens` rows are asked for. "
                              "Leave out padding and `tokens`; merge each model to the base's vocabulary first "
                              "(safemerge merge with `tokenizer_source: base`) and search over those")
        self.n_layers = num_layers(self.names, self.reference.config)
        # model -> name -> tensor in its stored dtype: the engine's inputs exactly (merge_tensor computes in
        # float32 block by block), at half the memory of float32 copies for bf16/fp16 checkpoints
        self.weights = {m: self._read(m, ckpt) for m, ckpt in self.models.items()}
        self.dtype = DTYPES.get(self.config.out_dtype or self.config.dtype or "") or self.reference.dtype(self.names[0])
        # what the trims and DARE drops of this pool compute again for every candidate: kept once (same results)
        budget = memo_budget(self.device) if trim_memo_bytes is None else trim_memo_bytes
        self._memo = TrimMemo((t for w in self.weights.values() for t in w.values()), budget=budget,
                              tensor_cap=memo_tensor_cap(self.device, budget))
        self.model, self.tokenizer = self._load_model()
        self._targets = self._bind_targets()
        self.current: MergeConfig | None = None

    # -- public ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def load(self, config: MergeConfig | Mapping) -> torch.nn.Module:
        """Write the merge of `config` into the model, tensor by tensor (no disk I/O); returns the model."""
        cfg = load_config(config)
        self._check_same_pool(cfg)
        for name, t in self.tensors(cfg):
            self._targets[name].copy_(t)
        self.current = cfg
        return self.model

    @torch.no_grad()
    def tensors(self, config: MergeConfig | Mapping) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, merged tensor in the engine's output dtype for it) for every floating tensor, as the engine computes
        them: the config's `out_dtype` or `dtype`, else the base's dtype for that tensor (a bf16 checkpoint may keep its
        norms in float32). `load` copies them into the model, whose parameters share one dtype, as a checkpoint loaded
        with `from_pretrained` has them."""
        cfg = load_config(config)
        fixed = DTYPES.get(cfg.out_dtype or cfg.dtype or "")
        for name in self.names:
            inputs = {m: w[name] for m, w in self.weights.items()}  # merge_tensor never modifies its inputs
            with remembering(self._memo):
                merged = merge_tensor(cfg, name=name, t=position(name, self.n_layers), tensors=inputs)
            yield name, merged.to(fixed or self.reference.dtype(name))

    def state(self) -> dict[str, torch.Tensor]:
        """The model's current weights under the checkpoint's tensor names (CPU copies)."""
        return {n: t.detach().cpu().clone() for n, t in self._targets.items()}

    # -- internals ------------------------------------------------------------------------------------
    def _read(self, model: str, ckpt: Checkpoint) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.names:
            src = name if name in ckpt else tied_source(name, ckpt.names())
            if src is None:
                raise CheckpointError(f"{model}: tensor {name!r} is missing (it is in {self.reference.path}); "
                                      "the models must share one architecture")
            if ckpt.shape(src) != self.reference.shape(name):
                raise CheckpointError(f"{model}: tensor {name!r} has shape {list(ckpt.shape(src))} but "
                                      f"{self.reference.path} has {list(self.reference.shape(name))}")
            x = ckpt.get(src).to(device=self.device)
            if not torch.isfinite(x).all():
                raise CheckpointError(f"{model}: tensor {name!r} contains NaN or Inf; fix the checkpoint before searching")
            out[name] = x
        return out

    def _load_model(self) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        ref = self.reference.path
        if not (ref / "config.json").is_file():
            raise CheckpointError(f"{ref}: the search needs an HF model directory (config.json) to build the model")
        tok_path = next(iter(tokenizer_dirs(self.config)), ref)  # the pool shares one vocabulary (checked)
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=False)
                model = AutoModelForCausalLM.from_pretrained(ref, dtype=self.dtype, trust_remote_code=False,
                                                             use_safetensors=True)
        except Exception as e:  # transformers raises many kinds; say which model and why
            raise CheckpointError(f"{ref}: cannot load the model or tokenizer {tok_path} ({type(e).__name__}: {e})") from None
        # the template the merge writes into its output (chat_templates.resolve, as the engine: a built-in name such
        # as `chatml` is its text, `auto` the pool's most common one), so candidates are scored as the output will chat
        template = chat_templates.resolve(self.config.chat_template, [c.path for c in self.models.values()])
        if template:
            tokenizer.chat_template = template
        return model.to(self.device).eval(), tokenizer

    def _bind_targets(self) -> dict[str, torch.Tensor]:
        state = self.model.state_dict(keep_vars=True)
        missing = [n for n in self.names if n not in state]
        if missing:
            raise CheckpointError(f"{self.reference.path}: tensors {missing[:3]} have no parameter in "
                                  f"{type(self.model).__name__}; the in-memory search supports checkpoints whose tensor "
                                  "names match the model's state_dict")
        shared: dict[int, str] = {}
        for n in self.names:  # a tied model whose checkpoint also stores lm_head.weight: the engine writes both tensors
            first = shared.setdefault(state[n].data_ptr(), n)  # (DARE draws other masks for each), and transformers
            if first != n:  # unties a checkpoint whose two differ; so does the candidate, or the last write would win
                self._untie(n, state[n])
                state = self.model.state_dict(keep_vars=True)
        covered = {n for n in self.names}
        storages = {state[n].data_ptr() for n in covered}
        uncovered = [k for k, v in state.items() if v.is_floating_point() and k not in covered and v.data_ptr() not in storages]
        if uncovered:
            raise CheckpointError(f"{self.reference.path}: model tensors {uncovered[:3]} are not in the checkpoint")
        return {n: state[n].data for n in self.names}

    def _untie(self, name: str, param: torch.Tensor) -> None:
        """Give parameter `name` storage of its own (and tell the model's config its embeddings are not tied)."""
        owner, _, attr = name.rpartition(".")
        module = self.model.get_submodule(owner)
        setattr(module, attr, torch.nn.Parameter(param.detach().clone(), requires_grad=False))
        for cfg in (self.model.config, getattr(self.model.config, "get_text_config", lambda: None)()):
            if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
                cfg.tie_word_embeddings = False

    def _check_same_pool(self, cfg: MergeConfig) -> None:
        if set(cfg.input_models()) != set(self.weights) or cfg.base_model != self.config.base_model:
            raise ConfigError(f"candidate reads {cfg.input_models()}, but this CandidateModel holds {list(self.weights)}; "
                              "build a CandidateModel for that pool")


