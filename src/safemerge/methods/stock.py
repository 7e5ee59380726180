"""Model Stock (Jang et al., 2024): interpolate the average of fine-tuned weights towards the base."""

from __future__ import annotations

from typing import Sequence

import torch

from safemerge.methods import register


@register("model_stock", inputs="stock", global_params={"filter_wise": False})
def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, filter_wise: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """θ = t·mean(θ_i) + (1−t)·θ_base with t = N·cos / (1 + (N−1)·cos).

    cos is the mean pairwise cosine between the task vectors θ_i − θ_base (N ≥ 2 of them), over the
    whole tensor, or per row (output filter) when `filter_wise`.
    """
    if len(tensors) < 2:
        raise ValueError("model_stock needs at least two models besides the base")
    shape = base.shape
    base, tensors = base.to(torch.float32), [x.to(torch.float32) for x in tensors]
    rows = (lambda x: x.reshape(x.shape[0], -1)) if filter_wise and base.dim() > 1 else (lambda x: x.reshape(1, -1))
    b = rows(base)
    deltas = [rows(t) - b for t in tensors]
    cosines = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            num = (deltas[i] * deltas[j]).sum(dim=-1)
            den = (torch.linalg.vector_norm(deltas[i], dim=-1) * torch.linalg.vector_norm(deltas[j], dim=-1)).clamp(min=1e-6)
            cosines.append((num / den).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(tensors)
    den = 1 + (n - 1) * cos
    # task vectors that cancel (cos = −1/(N−1)) have no finite t: the base is kept there, as mergekit keeps it, not
    # an opposing update amplified without bound (near that point) or NaN (at it)
    t = torch.where(den.abs() < 1e-6, torch.zeros_like(cos), n * cos / den)
    avg = torch.stack([rows(x) for x in tensors]).mean(dim=0)
    merged = (t * avg + (1 - t) * b).reshape(shape)
    if out is None:
        return merged
    out.copy_(merged.reshape(out.shape))
    return out
