"""Linear (weighted average) merging: θ = Σ w_i·θ_i / Σ w_i (Wortsman et al., 2022, "model soups")."""

from __future__ import annotations

from typing import Sequence

import torch

from safemerge.methods import REQUIRED, register


@register("linear", inputs="models", global_params={"normalize": True}, model_params={"weight": REQUIRED}, elementwise=True)
def linear(tensors: Sequence[torch.Tensor], *, weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """Weighted sum of same-shape float32 tensors; divided by Σ w_i when `normalize` (and Σ w_i ≠ 0)."""
    out = torch.zeros_like(tensors[0])
    for w, t in zip(weights, tensors):
        out.add_(t, alpha=float(w))
    total = float(sum(weights))
    if normalize and abs(total) > 1e-8:
        out.div_(total)
    return out
