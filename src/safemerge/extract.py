"""LoRA extraction: a fine-tune's change from its base as a PEFT LoRA adapter (mergekit-extract-lora's job).

For each linear (or GPT-2 Conv1D) layer the change Δ = W_model − W_base is factored by a truncated SVD,
Δ ≈ U_r·S_r·V_rᵀ, and stored as peft stores a LoRA update: B = U_r·√S_r, A = √S_r·V_rᵀ, with α = r so that
peft's scale α/r is 1. Embeddings (and the output layer) are saved whole in `modules_to_save`, as
mergekit does, unless `embed_lora` factors them too; any other changed module (norms, a layer whose bias
changed) is saved whole; unchanged modules are left out. Ranks that differ from `r` (a layer smaller than the
rank, or `sv_epsilon`) go into `rank_pattern` / `alpha_pattern`, keyed by the module's escaped full name.

The adapter loads with `PeftModel.from_pretrained(base, OUT)`, and safemerge reads it as `BASE+OUT` in any
merge config: MergeAlign's alignment vector can be published as a small adapter and merged in from there.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from safemerge._args import as_list, check_arguments
from safemerge._progress import progress_bar
from safemerge.checkpoint import atomic_output, nonfinite
from safemerge.config import DTYPES
from safemerge.engine import check_apart, check_device, input_dirs, tensor_seed
from safemerge.errors import CheckpointError, ConfigError
from safemerge.lora import PREFIX, open_model
from safemerge.writer import ShardedWriter

SVD_WAYS = ("exact", "randomized")
OVERSAMPLE, POWER_ITERATIONS = 10, 4  # the randomized SVD's extra columns and power iterations (Halko et al. 2011)


@dataclass
class Extraction:
    """What `extract_lora` wrote: the adapter folder, each factored module's rank and relative error
    ‖Δ − B·A‖_F / ‖Δ‖_F (with B and A as stored), the modules saved whole, and how many were unchanged."""

    path: Path
    ranks: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    whole: list[str] = field(default_factory=list)
    unchanged: int = 0
    excluded: list[str] = field(default_factory=list)
    total_error: float = 0.0  # over every factored module: sqrt(Σ‖Δ − B·A‖²) / sqrt(Σ‖Δ‖²)

    def summary(self) -> dict:
        return {"output": str(self.path), "factored": len(self.ranks), "max_rank": max(self.ranks.values(), default=0),
                "saved_whole": self.whole, "unchanged": self.unchanged, "excluded_changed": self.excluded,
                "relative_error": round(self.total_error, 6)}


@dataclass
class _Module:
    name: str  # runtime module name, as peft names it
    kind: str  # linear | conv1d | embedding | output | other | loose | tied (stored copies of tied parameters)
    tensors: dict[str, str]  # parameter ("weight", "bias", ...) -> checkpoint tensor name
    tieable: bool = False  # the model's input embeddings or output head, which tie_word_embeddings ties (not wpe)


def extract_lora(
    model: str | os.PathLike,
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    rank: int = 128,
    sv_epsilon: float = 0.0,
    embed_lora: bool = False,
    save_modules: tuple[str, ...] | list[str] = (),
    include: tuple[str, ...] | list[str] = (),
    exclude: tuple[str, ...] | list[str] = (),
    svd: str = "exact",
    dtype: str | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> Extraction:
    """Write MODEL's change from BASE as a PEFT LoRA adapter folder at `out` (see the module's docstring).

    `rank` is the largest rank per module; `sv_epsilon` drops singular values at or below it. `include` /
    `exclude` are regular expressions searched in module names (excluded modules keep the base's weights);
    `save_modules` names modules (full names or last parts) to save whole. `svd="randomized"` uses a seeded
    randomized SVD (faster on large matrices, slightly larger error); `dtype` is the factors' dtype (default:
    the model's). Written atomically; nothing is left at `out` on failure.
    """
    check_arguments(extract_lora, locals())
    save_modules, include, exclude = as_list(save_modules), as_list(include), as_list(exclude)
    if rank < 1:  # (a whole number: checked above)
        raise ConfigError(f"rank {rank!r}: the LoRA rank must be a positive whole number")
    rank = int(rank)  # a numpy integer too
    if not (sv_epsilon >= 0 and math.isfinite(sv_epsilon)):
        raise ConfigError(f"sv_epsilon {sv_epsilon!r}: must be a finite number ≥ 0")
    if svd not in SVD_WAYS:
        raise ConfigError(f"svd {svd!r}: choose one of {', '.join(SVD_WAYS)}")
    factor_dtype = _dtype(dtype)
    patterns = {}
    for r in [*include, *exclude]:
        try:
            patterns[r] = re.compile(r)
        except re.error as e:
            raise ConfigError(f"--include/--exclude {r!r}: not a regular expression ({e})") from None
    device = check_device(device)
    fine, ref = open_model(str(model), allow_pickle=allow_pickle), open_model(str(base), allow_pickle=allow_pickle)
    if ref.adapter is not None:  # neither peft nor a `BASE+ADAPTER` reference could apply the result to it
        raise ConfigError(f"--base {base}: a model with a LoRA adapter; an adapter extracted against it applies to that "
                          "model only as a plain checkpoint: write it out first (a linear merge of it with weight 1, or "
                          "`safemerge align`'s output) and give that folder")
    check_apart(out, input_dirs([fine, ref]), what="the adapter folder")
    _check_same(fine, ref)
    modules = _modules(fine)
    for want in save_modules:
        if not any(m.name == want or m.name.endswith("." + want) for m in modules):
            raise ConfigError(f"--save-module {want!r}: {fine.path} has no module of that name")
    for x in include:  # else: "the same weights outside the excluded modules", of models that differ
        if not any(patterns[x].search(m.name) for m in modules):
            raise ConfigError(f"--include {x!r}: matches no module of {fine.path} (its modules are named like "
                              f"{modules[-1].name!r})")

    result = Extraction(path=Path(out))
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = {}  # module -> (A, B, embedding-style keys)
    whole: list[_Module] = []
    sq_err = sq_norm = 0.0
    # tied as config.json says (GPT-NeoX's untied head is `embed_out`, not lm_head); else: no output layer of its own
    said = fine.config.get("tie_word_embeddings")
    tied = (said if isinstance(said, bool) else not any(m.kind == "output" for m in modules)) \
        and any(m.kind == "embedding" and m.tieable for m in modules)
    with progress_bar(len(modules), "extracting LoRA: modules", enabled=progress) as advance:
        for m in modules:
            advance(1)
            values = {p: (fine.get(n), ref.get(n)) for p, n in m.tensors.items()}  # each tensor read once
            changed = {p: m.tensors[p] for p, (x, y) in values.items() if not torch.equal(x, y)}
            if not changed:
                result.unchanged += 1
                continue
            if m.kind == "tied":  # loaded as the embeddings, which the adapter carries: nothing of its own to carry
                continue
            if m.kind == "loose":
                raise CheckpointError(f"tensor {next(iter(changed.values()))!r} differs from the base but is not a "
                                      f"parameter of the {fine.config.get('architectures')} transformers builds from "
                                      f"{fine.path}/config.json, so no adapter can carry it")
            if any(r.search(m.name) for r in (patterns[x] for x in exclude)) or (
                    include and not any(patterns[x].search(m.name) for x in include)):
                result.excluded.append(m.name)
                continue
            whole_save = (any(m.name == s or m.name.endswith("." + s) for s in save_modules)
                          or m.kind not in ("linear", "conv1d", "embedding", "output")
                          or set(changed) != {"weight"} or len(fine.shape(m.tensors["weight"])) != 2
                          or (m.kind in ("embedding", "output") and not embed_lora and not (tied and m.tieable)))
            if whole_save:
                whole.append(m)
                continue
            if m.kind in ("embedding", "output") and not embed_lora:
                warnings.warn(f"{m.name}: the model's lm_head is tied to its embeddings, which peft unties when it "
                              "saves them whole; factoring them as LoRA instead (as --embed-lora does). The adapter "
                              "equals the fine-tune once merged (BASE+ADAPTER in safemerge, or peft's merge_and_unload); "
                              "peft running it unmerged updates the input embeddings only, not the tied lm_head",
                              stacklevel=2)
            delta = _delta(*values.pop("weight"), m.tensors["weight"], device)
            if m.kind in ("embedding", "conv1d"):  # peft: (B·A)ᵀ for embeddings and Conv1D (weights stored (in, out))
                delta = delta.T
            u, s, vh, kept = _truncated_svd(delta, rank, sv_epsilon, svd, tensor_seed(seed, m.name))
            norm2 = float(delta.pow(2).sum())
            if kept == 0:  # every singular value at or below sv_epsilon: the change is dropped, and counted as error
                result.excluded.append(m.name)
                sq_err, sq_norm = sq_err + norm2, sq_norm + norm2
                continue
            root = s[:kept].sqrt()
            b = (u[:, :kept] * root).to(factor_dtype or fine.dtype(m.tensors["weight"]))
            a = (root[:, None] * vh[:kept]).to(b.dtype)
            err2 = float((delta - b.to(delta.dtype) @ a.to(delta.dtype)).pow(2).sum())
            sq_err, sq_norm = sq_err + err2, sq_norm + norm2
            result.ranks[m.name] = kept
            result.errors[m.name] = math.sqrt(err2 / norm2) if norm2 else 0.0
            factors[m.name] = (a.cpu(), b.cpu(), m.kind == "embedding")
            del delta, u, s, vh, values
    if not factors and not whole:
        what = " outside the excluded modules" if result.excluded else ""
        raise CheckpointError(f"{fine.path} and {ref.path} have the same weights{what}: there is no change to extract")
    result.total_error = math.sqrt(sq_err / sq_norm) if sq_norm else 0.0
    result.whole = [m.name for m in whole]

    entries: list[tuple[str, torch.Tensor | str]] = []  # adapter key -> factor, or the model's tensor to copy
    for name, (a, b, emb) in factors.items():
        kind = "lora_embedding_{}" if emb else "lora_{}.weight"
        entries += [(f"{PREFIX}{name}.{kind.format('A')}", a), (f"{PREFIX}{name}.{kind.format('B')}", b)]
    for m in whole:
        entries += [(f"{PREFIX}{m.name}.{p}", n) for p, n in m.tensors.items()]
    specs = [(k, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (k, tuple(fine.shape(v)), fine.dtype(v))
             for k, v in entries]
    top = max(result.ranks.values(), default=rank)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if _causal(fine) else None,
        **_base_fields(base), "r": top, "lora_alpha": top,
        "target_modules": list(factors) or None, "modules_to_save": result.whole or None,
        "rank_pattern": {re.escape(n): k for n, k in result.ranks.items() if k != top},
        "alpha_pattern": {re.escape(n): k for n, k in result.ranks.items() if k != top},
        "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
        "fan_in_fan_out": any(m.kind == "conv1d" for m in modules if m.name in factors),
    }
    with atomic_output(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, specs, max_shard_bytes=sys.maxsize, single_name="adapter_model.safetensors")
        try:
            for key, value in entries:
                writer.write(key, value if isinstance(value, torch.Tensor) else fine.get(value))
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        _card(tmp, model=str(model), base=str(base), result=result, rank=rank, svd=svd)
    result.path = Path(out).expanduser().absolute()
    return result


def _dtype(name: str | None) -> torch.dtype | None:
    if name == "auto":  # the model's, as evaluation's --dtype auto
        return None
    if name is not None and (name not in DTYPES or DTYPES[name] is torch.float64):
        raise ConfigError(f"dtype {name!r}: the factors' dtype is one of bfloat16, float16, float32")
    return DTYPES.get(name)


def _check_same(fine, ref) -> None:
    """The same tensors with the same shapes: an adapter can only change values."""
    mine, theirs = set(fine.names()), set(ref.names())
    for extra, where, other in ((mine - theirs, fine, ref), (theirs - mine, ref, fine)):
        if extra:
            shown = ", ".join(map(repr, sorted(extra)[:3])) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
            raise CheckpointError(f"{where.path} has {shown}, which {other.path} does not: is {ref.path} the base "
                                  f"{fine.path} was fine-tuned from?")
    for n in sorted(mine):
        a, b = tuple(fine.shape(n)), tuple(ref.shape(n))
        if a != b:
            vocab = ("embed" in n or "lm_head" in n or "wte" in n) and a[1:] == b[1:]  # rows differ, the width is one
            hint = (" (the fine-tune resized its vocabulary: a LoRA adapter cannot add rows; resize the base's "
                    "embeddings to the same tokenizer first)") if vocab else " (models of other sizes: is it the base?)"
            raise CheckpointError(f"tensor {n!r}: {list(a)} in {fine.path} but {list(b)} in {ref.path}{hint}")


def _modules(ckpt) -> list[_Module]:
    """The checkpoint's tensors grouped by the module that holds them, with the module's kind, found by building
    the architecture transformers defines for its config on the meta device (no weights, no remote code)."""
    import transformers
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from safemerge._hf import quiet_transformers

    arch = (ckpt.config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None:
        raise CheckpointError(f"{ckpt.path}: config.json names architecture {arch!r}, which transformers "
                              f"{transformers.__version__} does not define (safemerge runs no remote code)")
    try:
        with quiet_transformers(), torch.device("meta"):
            net = cls(transformers.AutoConfig.from_pretrained(ckpt.path))
    except Exception as e:  # noqa: BLE001 - any failure to build it is the config's
        raise CheckpointError(f"{ckpt.path}: transformers cannot build {arch} from its config.json ({e})") from None
    inp, outp = net.get_input_embeddings(), net.get_output_embeddings()
    params = {n for n, _ in net.named_parameters()}
    shared = {n for n, _ in net.named_parameters(remove_duplicate=False)} - params  # a tied lm_head: the embeddings'
    modules = dict(net.named_modules())
    found: dict[str, _Module] = {}
    loose = []
    known = params | shared
    for name in ckpt.names():
        runtime = name if name in known else f"{net.base_model_prefix}.{name}"
        if runtime in shared:  # a copy of a tied parameter that the checkpoint also stores: transformers reads the
            found.setdefault("", _Module("", "tied", {})).tensors[runtime] = name  # embeddings, the adapter carries them
            continue
        if runtime not in params:
            loose.append(name)
            continue
        owner, _, param = runtime.rpartition(".")
        mod = modules[owner]
        kind = ("embedding" if mod is inp else "output" if mod is outp else "embedding" if isinstance(mod, nn.Embedding)
                else "conv1d" if isinstance(mod, Conv1D) else "linear" if isinstance(mod, nn.Linear) else "other")
        found.setdefault(owner, _Module(owner, kind, {}, mod is inp or mod is outp)).tensors[param] = name
    if loose:
        found["?"] = _Module("", "loose", {n: n for n in loose})  # checked for changes like the others
    return list(found.values())


def _delta(mine: torch.Tensor, theirs: torch.Tensor, name: str, device: str) -> torch.Tensor:
    delta = mine.to(device=device, dtype=torch.float32) - theirs.to(device=device, dtype=torch.float32)
    if nonfinite(delta):
        raise CheckpointError(f"tensor {name!r}: the difference between the two models has NaN or Inf values")
    return delta


def _truncated_svd(m: torch.Tensor, rank: int, eps: float, how: str, seed: int):
    """(U, S, Vᵀ, kept): the leading singular triplets of m (exact, or by a seeded randomized SVD), and how many of
    them the adapter keeps: at most `rank`, and only singular values above `eps`."""
    k = min(rank, *m.shape)
    if how == "exact" and m.shape[0] < m.shape[1]:  # LAPACK is ~3× faster on the tall orientation (2048 × 5632: 9.2
        vt, s, ut = torch.linalg.svd(m.T.contiguous(), full_matrices=False)  # s against 3.3 s): mᵀ = V·S·Uᵀ
        u, vh = ut.T, vt.T
    elif how == "exact":
        u, s, vh = torch.linalg.svd(m.contiguous(), full_matrices=False)
    else:
        q = min(k + OVERSAMPLE, *m.shape)
        g = torch.Generator(device=m.device).manual_seed(seed)
        basis = torch.linalg.qr(m @ torch.randn(m.shape[1], q, generator=g, device=m.device, dtype=m.dtype)).Q
        for _ in range(POWER_ITERATIONS):
            basis = torch.linalg.qr(m @ torch.linalg.qr(m.T @ basis).Q).Q
        ub, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)
        u = basis @ ub
    return u, s, vh, min(k, int((s > eps).sum()))


def _causal(ckpt) -> bool:
    return str((ckpt.config.get("architectures") or [""])[0]).endswith("ForCausalLM")


def _base_fields(base: str | os.PathLike) -> dict:
    """adapter_config.json's base: a hub id `org/name@rev` as peft records one (the id, and `revision`)."""
    from safemerge._hf import hub_reference

    hub = hub_reference(str(base))
    if hub is not None and hub[1] is not None:
        return {"base_model_name_or_path": hub[0], "revision": hub[1]}
    return {"base_model_name_or_path": str(base)}


def _card(out: Path, *, model: str, base: str, result: Extraction, rank: int, svd: str) -> None:
    from safemerge._hf import hub_repo

    front: dict = {"library_name": "peft", "tags": ["safemerge", "lora", "extracted-lora"]}
    if repo := hub_repo(str(base)):  # the hub reads base_model as a hub id: a local path stays in the text below
        front = {"base_model": repo, **front}
    ranks = sorted(set(result.ranks.values()))
    text = (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# LoRA extracted from `{model}`\n\n"
            f"The change of `{model}` from `{base}`, extracted with [safemerge](https://github.com/safemerge/safemerge) "
            f"(`safemerge extract-lora`, rank ≤ {rank}, {svd} SVD).\n\n"
            f"- {len(result.ranks)} modules as LoRA (ranks {', '.join(map(str, ranks)) or '-'}); relative error of the "
            f"stored update ‖Δ − B·A‖ / ‖Δ‖ over them: {result.total_error:.4f}\n"
            f"- saved whole: {', '.join(result.whole) or 'none'}\n- unchanged, left out: {result.unchanged} modules\n")
    if result.excluded:
        text += f"- changed but left out (excluded, or no singular value above sv_epsilon): {', '.join(result.excluded)}\n"
    text += f"\nLoad it with `PeftModel.from_pretrained(base, path)`, or merge it in with safemerge as `{base}+<this folder>`.\n"
    (out / "README.md").write_text(text)
