"""Model similarity, streamed tensor by tensor (and row chunk by row chunk) through `Checkpoint`.

For checkpoints θ_1..θ_N (and optionally a base θ_0, task vectors τ_i = θ_i − θ_0), over a group G of
tensors (all of them, or one layer):

    l2(i, j)     = sqrt( Σ_{t ∈ G} ‖θ_i[t] − θ_j[t]‖² )
    norm(i)      = sqrt( Σ_{t ∈ G} ‖τ_i[t]‖² )                       = l2(i, base)
    cosine(i, j) = Σ_{t ∈ G} ⟨τ_i[t], τ_j[t]⟩ / (norm(i) · norm(j))   (None when a norm is 0)

All sums are float64. Differences are taken directly (never ‖a‖² + ‖b‖² − 2⟨a,b⟩, which loses every
digit for models as close as merges are). Groups: "all", one per layer index ("0", "1", ...), and
"embed", "lm_head", "other" for tensors outside the layer stack. Peak memory is one row chunk
(`chunk_elems` elements, default 16M) per model, whatever the model size. Non-float tensors are skipped.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from itertools import combinations
from typing import Sequence

import torch

from safemerge._args import as_list, check_arguments
from safemerge.checkpoint import name_alike, nonfinite
from safemerge.errors import CheckpointError, SafemergeError
from safemerge._progress import progress_bar
from safemerge.layout import layer_index, stream_order, tied_source


def group_of(name: str) -> str:
    i = layer_index(name)
    if i is not None:
        return str(i)
    if "lm_head" in name:
        return "lm_head"
    if any(k in name for k in ("embed", "wte", "wpe")):
        return "embed"
    return "other"


def similarity(
    models: Sequence[str | os.PathLike],
    *,
    base: str | os.PathLike | None = None,
    chunk_elems: int = 1 << 24,
    progress: bool = False,
) -> dict:
    """Pairwise L2 distances (and, with `base`, task-vector norms and cosines), overall and per layer.

    Returns {"models", "base", "pairs": [{"a", "b", "l2", "cosine"?, "per_layer": {group: {...}}}],
    "task_vectors": {model: {"norm", "per_layer"}}?}.
    """
    check_arguments(similarity, locals())
    models = as_list(models)
    from safemerge.lora import open_model

    if len(models) < (1 if base is not None else 2):
        raise SafemergeError("similarity needs two models, or one model and --base")
    cks = [open_model(str(m)) for m in models]  # a `model+adapter` reference reads the model with its adapter merged in
    base_ck = open_model(str(base)) if base is not None else None
    names = _common_names(cks + ([base_ck] if base_ck else []))
    n = len(cks)
    sq = defaultdict(lambda: torch.zeros(n, n, dtype=torch.float64))  # group -> Σ‖θ_i − θ_j‖²
    dot = defaultdict(lambda: torch.zeros(n, n, dtype=torch.float64))  # group -> Σ⟨τ_i, τ_j⟩ (diag: ‖τ_i‖²)
    with progress_bar(len(names), "comparing tensors", enabled=progress) as advance:
        for name in names:
            counts = _counted(name, cks, base_ck)
            for chunks in _chunks(cks, base_ck, name, chunk_elems):
                xs, b = chunks[:n], (chunks[n] if base_ck else None)
                s = torch.zeros(n, n, dtype=torch.float64)
                for i, j in combinations(range(n), 2):
                    s[i, j] = s[j, i] = torch.sum((xs[i] - xs[j]) ** 2)
                if counts is not None:
                    s *= counts
                for g in ("all", group_of(name)):
                    sq[g] += s
                if b is not None:
                    taus = torch.stack([x - b for x in xs])  # (N, chunk)
                    d = taus @ taus.T
                    if counts is not None:
                        d *= counts
                    for g in ("all", group_of(name)):
                        dot[g] += d
            advance(1)
    return _report([c.reference for c in cks], base_ck.reference if base_ck else None, sq, dot if base_ck else None)


def check_comparable(models: Sequence[str | os.PathLike]) -> None:
    """That `models` can be compared tensor by tensor (one set of tensors, of one shape each), from their headers
    alone: what `similarity` would refuse, before anything else is done."""
    from safemerge.lora import open_model

    _common_names([open_model(str(m)) for m in models])


def _counted(name: str, cks: list, base) -> torch.Tensor | None:
    """(N, N) 1/0: which pairs count tensor `name` (None: every pair, as for all but one tensor). All, but for an
    lm_head that some models tie to their embeddings (read there as the embedding): a pair of two tied models has no head of its own, and its embedding is already
    counted, so it counts only where one of the two (or, for task vectors, the base) holds its own head. The pairs'
    distances do not depend on which other models are compared with them."""
    own = [name in ck for ck in cks]
    n = len(cks)
    if all(own):
        return None
    based = base is not None and name in base
    return torch.tensor([[float(own[i] or own[j] or based) for j in range(n)] for i in range(n)], dtype=torch.float64)


def _report(paths: list[str], base: str | None, sq: dict, dot: dict | None) -> dict:
    groups = ["all"] + sorted((g for g in sq if g != "all"), key=_group_key)
    pairs = []
    for i, j in combinations(range(len(paths)), 2):
        row = {"a": paths[i], "b": paths[j], "l2": math.sqrt(sq["all"][i, j]), "per_layer": {}}
        if dot is not None:
            row["cosine"] = _cos(dot["all"], i, j)
        for g in groups[1:]:
            row["per_layer"][g] = {"l2": math.sqrt(sq[g][i, j])}
            if dot is not None:
                row["per_layer"][g]["cosine"] = _cos(dot[g], i, j)
        pairs.append(row)
    out: dict = {"models": paths, "base": base, "pairs": pairs}
    if dot is not None:
        out["task_vectors"] = {
            p: {"norm": math.sqrt(dot["all"][i, i]), "per_layer": {g: math.sqrt(dot[g][i, i]) for g in groups[1:]}}
            for i, p in enumerate(paths)
        }
    return out


def _cos(d: torch.Tensor, i: int, j: int) -> float | None:
    den = math.sqrt(d[i, i]) * math.sqrt(d[j, j])
    return float(d[i, j] / den) if den > 0 else None


def _group_key(g: str) -> tuple:
    return (0, int(g), "") if g.isdigit() else ({"embed": -1, "lm_head": 1, "other": 2}[g], 0, g)


def _common_names(cks: list) -> list[str]:
    """Float tensor names shared by all checkpoints (a tied lm_head may be absent); others are errors."""
    name_alike(cks)
    ref = cks[0]
    ref_names = set(ref.names())
    names = [n for n in ref.names() if ref.dtype(n).is_floating_point]
    for ck in cks[1:]:  # an lm_head that the first model ties to its embeddings is compared too
        names += [x for x in ck.names() if x.endswith("lm_head.weight") and x not in names and x not in ref_names
                  and ck.dtype(x).is_floating_point and tied_source(x, ref_names)]

    def shape(ck, nm: str, have: set[str]):
        return ck.shape(nm if nm in have else tied_source(nm, have))

    for ck in cks:
        have = set(ck.names())
        for nm in names:
            if nm not in have and not tied_source(nm, have):
                raise CheckpointError(f"{ck.reference}: has no tensor {nm!r}, which {ref.reference} has; compare models of one architecture")
            mine, theirs = shape(ck, nm, have), shape(ref, nm, ref_names)
            if mine != theirs:
                raise CheckpointError(f"{ck.reference}: tensor {nm!r} has shape {list(mine)}, {ref.reference} has {list(theirs)}")
        extra = [x for x in sorted(have) if x not in ref_names and ck.dtype(x).is_floating_point and not x.endswith("lm_head.weight")]
        if extra:
            raise CheckpointError(f"{ck.reference}: has tensor {extra[0]!r}, which {ref.reference} lacks; compare models of one architecture")
    return stream_order(names)


def _chunks(cks: list, base, name: str, chunk_elems: int):
    """Yield, per row chunk of tensor `name`, the float64 flattened chunk of every model (then the base)."""
    all_cks = cks + ([base] if base is not None else [])
    first = cks[0]
    shape = first.shape(name if name in first else tied_source(name, first.names()))
    rows = shape[0] if shape else 1
    per_row = max(1, math.prod(shape[1:]) if len(shape) > 1 else 1)
    step = max(1, chunk_elems // per_row)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        out = []
        for ck in all_cks:
            src = name if name in ck else tied_source(name, ck.names())
            t = ck.get_rows(src, start, stop) if shape else ck.get(src)
            if nonfinite(t):
                raise CheckpointError(f"{ck.reference}: tensor {src!r} holds NaN or Inf, so its distances would be NaN; "
                                      "fix or re-make the checkpoint")
            out.append(t.to(torch.float64).reshape(-1))
        yield out
