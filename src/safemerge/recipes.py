"""Recipes: named merges built from an ordinary config.

MergeAlign (Sun et al., 2025, "MergeAlign: ... safety alignment of domain experts by merging"):
θ̂ = θ + Σ_d α·τ_d + β·τ_a, with τ_d = θ_d − θ (domain experts) and τ_a = θ_a − θ (the general
instruct model), all sharing the pre-trained base θ. It is task arithmetic with named roles; α = β = 1
works best in the paper.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from safemerge._args import as_list, check_arguments
from safemerge.config import MergeConfig, load_config, same_model, split_reference
from safemerge.engine import DEFAULT_SHARD, _has_tokenizer, merge
from safemerge.errors import ConfigError

if TYPE_CHECKING:
    import torch

PathLike = str | os.PathLike


def mergealign_config(*, base: PathLike, domains: Sequence[PathLike], aligned: PathLike, alpha: float = 1.0,
                      beta: float = 1.0, dtype: str | None = None, tokenizer_source: PathLike | None = None) -> MergeConfig:
    """The mergekit-compatible task_arithmetic config that MergeAlign is."""
    if not domains:
        raise ConfigError("MergeAlign needs at least one domain expert (--domain)")
    for flag, value in (("--alpha", alpha), ("--beta", beta)):
        try:
            ok = math.isfinite(float(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"MergeAlign {flag} {value!r}: give a finite number (the paper's default is 1)")
    _check_roles(base, domains, aligned)
    models = [{"model": str(d), "parameters": {"weight": float(alpha)}} for d in domains]
    models.append({"model": str(aligned), "parameters": {"weight": float(beta)}})
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "models": models,
           "tokenizer_source": str(tokenizer_source or _tokenizer_folder(aligned)), "name": "mergealign"}
    if dtype and dtype != "auto":  # auto: the base model's, as evaluation's --dtype auto
        cfg["dtype"] = dtype
    return load_config(cfg)


def _tokenizer_folder(ref: PathLike) -> str:
    """The aligned model's tokenizer: its folder, or for an aligned model shipped as `BASE+ADAPTER` the adapter's
    folder where it holds tokenizer files, else BASE's (a tokenizer_source must be a folder)."""
    model, adapter = split_reference(str(ref))
    return adapter if adapter is not None and _has_tokenizer(Path(adapter)) else model


def _check_roles(base: PathLike, domains: Sequence[PathLike], aligned: PathLike) -> None:
    """Each role a different model: the base given again as the aligned model (or an expert) makes its task vector
    zero, and the merge silently no safer (or no more expert) than without it."""
    seen: list[tuple[str, str]] = []  # (flag and reference as given, reference)
    for flag, ref in [("--base", base)] + [("--domain", d) for d in domains] + [("--aligned", aligned)]:
        earlier = next((given for given, r in seen if same_model(str(r), str(ref))), None)
        if earlier is not None:
            why = ("a task vector is a model's difference from --base, so the base given again adds nothing"
                   if earlier.startswith("--base") else "a model given twice adds its task vector twice; "
                   "--alpha and --beta set the weights")
            raise ConfigError(f"MergeAlign {flag} {ref}: the same model as {earlier}; give each role its own model ({why})")
        seen.append((f"{flag} {ref}", ref))


def mergealign(*, base: PathLike, domains: Sequence[PathLike], aligned: PathLike, out: PathLike, alpha: float = 1.0,
               beta: float = 1.0, dtype: str | None = None, tokenizer_source: PathLike | None = None,
               overwrite: bool = False, device: str | torch.device = "cpu", allow_pickle: bool = False, allow_nonfinite: bool = False,
               max_shard_size: int | str = DEFAULT_SHARD, workers: int | None = None, progress: bool = True) -> Path:
    """Write θ + Σ α·(θ_d − θ) + β·(θ_a − θ) to `out`, with the aligned model's tokenizer and chat template
    (unless `tokenizer_source` names another) and the equivalent YAML as `mergekit_config.yml`."""
    check_arguments(mergealign, locals())
    domains = as_list(domains)
    cfg = mergealign_config(base=base, domains=domains, aligned=aligned, alpha=alpha, beta=beta, dtype=dtype,
                            tokenizer_source=tokenizer_source)
    extra = (f"## MergeAlign\n\nθ̂ = θ + α·Σ τ_d + β·τ_a with α = {alpha}, β = {beta}; base `{base}`, "
             f"domain experts {', '.join(f'`{d}`' for d in domains)}, aligned model `{aligned}`.")
    return merge(cfg, out, overwrite=overwrite, device=device, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite,
                 max_shard_size=max_shard_size, workers=workers, progress=progress, title="MergeAlign", card_extra=extra)
