"""Task arithmetic and its sparsified, sign-consensus variants: one procedure, several small steps.

    θ = θ_base + λ · Σ_i m_i ⊙ w_i·τ̃_i / D,      τ_i = θ_i − θ_base,   τ̃_i = sparsify(τ_i)

- task_arithmetic (Ilharco et al., 2023): no sparsifier, m_i = 1, D = Σ w_i when normalising.
- ties (Yadav et al., 2023): τ̃ keeps the `density` share of largest |τ|; the sign of Σ w_i·τ̃_i is
  elected per element; m_i marks the entries that agree with it; D = Σ w_i·m_i (the disjoint mean).
- dare_linear / dare_ties (Yu et al., 2024): τ̃ drops each element with probability 1 − density and
  rescales survivors by 1/density (or, with rescale_mode="l1", to keep ‖τ‖₁ as mergekit does).
- breadcrumbs / breadcrumbs_ties (Davari & Belilovsky, 2023): τ̃ drops the `gamma` share of largest
  |τ| (outliers) and then the smallest, keeping a `density` share.
MergeAlign (Sun et al., 2025) is task_arithmetic with weights α (domain) and β (alignment).

All tensors are float32. `deltas` are modified in place (the engine passes fresh tensors).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from safemerge.methods import REQUIRED, register


# -- sparsifiers ------------------------------------------------------------------------------------
def kth_smallest(values: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-th smallest (1-based) of non-negative float32 `values` (1-D), by a radix select.

    The bits of a non-negative float32 order like the float, so a histogram of their top 16 bits finds
    the bucket that holds the answer in one counting pass; `kthvalue` then runs on that bucket only.
    Several times faster than `kthvalue` on the whole tensor for large n, with the same result.
    """
    if values.numel() < (1 << 20) or values.dtype != torch.float32:
        return values.kthvalue(rank).values
    top = values.view(torch.int32) >> 16  # (n,) in [0, 2^15) for non-negative floats
    counts = torch.bincount(top, minlength=1 << 15).cumsum_(0)
    bucket = int(torch.searchsorted(counts, torch.tensor(rank), right=False))
    below = int(counts[bucket - 1]) if bucket else 0
    return values[top == bucket].kthvalue(rank - below).values


def topk_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest entries, found by selection (a radix select), never a full sort.

    Entries equal to the threshold are taken in index order until exactly k are kept, so the masks
    for k₁ < k₂ are nested.
    """
    flat = magnitude.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    thr = kth_smallest(flat, n - k + 1)
    keep = flat > thr
    short = k - int(keep.sum())
    if short > 0:
        keep[(flat == thr).nonzero().squeeze(1)[:short]] = True
    return keep.view_as(magnitude)


def trim_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the int(density·n) entries of largest magnitude, zero the rest (in place)."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    if k <= 0:
        raise ValueError(f"density {density} keeps no element of a tensor of {delta.numel()}; raise density")
    return delta.mul_(topk_mask(delta.abs(), k))


def trim_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the int(gamma·n) largest |τ| and then the smallest, keeping int(density·n)."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep_n, top_n = int(density * n), int(gamma * n)
    top_n = min(top_n, n - keep_n)
    mag = delta.abs()
    mask = topk_mask(mag, keep_n + top_n) & ~topk_mask(mag, top_n)
    return delta.mul_(mask)


def random_drop(
    delta: torch.Tensor,
    density: float,
    *,
    generator: torch.Generator | None,
    rescale: bool = True,
    rescale_mode: Literal["density", "l1"] = "density",
) -> torch.Tensor:
    """DARE: keep each element with probability `density`; rescale by 1/density or to keep ‖τ‖₁ (in place)."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    before = float(delta.abs().sum()) if rescale and rescale_mode == "l1" else 0.0
    delta.mul_(keep)
    if rescale:
        if rescale_mode == "density":
            delta.div_(density)
        else:
            after = float(delta.abs().sum())
            if before > 1e-7 and after > 1e-7:
                delta.mul_(before / after)
    return delta


# -- combination ------------------------------------------------------------------------------------
def combine(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """θ_base + λ · Σ m_i ⊙ w_i·τ_i / D (see the module docstring); `deltas` are scaled in place."""
    for d, w in zip(deltas, weights):
        d.mul_(float(w))
    mixed = torch.zeros_like(base)
    for d in deltas:
        mixed.add_(d)
    if consensus:
        positive = mixed >= 0  # elected sign: + where Σ w_i·τ̃_i ≥ 0
        mixed.zero_()
        divisor = torch.zeros_like(base)
        for d, w in zip(deltas, weights):
            agree = torch.where(positive, d > 0, d < 0)  # zeros (trimmed) never agree
            mixed.add_(d * agree)
            divisor.add_(agree, alpha=float(w))
        divisor[divisor == 0] = 1
    else:
        total = float(sum(weights))
        divisor = total if abs(total) >= 1e-8 else 1.0
    if normalize:
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(float(lambda_))
    return mixed.add_(base)


# -- the registered methods -------------------------------------------------------------------------
_COMMON = {"lambda": 1.0, "int8_mask": False}


@register("task_arithmetic", inputs="deltas", global_params={**_COMMON, "normalize": False},
          model_params={"weight": REQUIRED}, elementwise=True)
def task_arithmetic(base, deltas, *, weights, lambda_=1.0, normalize=False, **_):
    """θ_base + λ·Σ w_i·τ_i (÷ Σ w_i when normalize)."""
    return combine(base, deltas, weights=weights, consensus=False, normalize=normalize, lambda_=lambda_)


@register("ties", inputs="deltas", global_params={**_COMMON, "normalize": True},
          model_params={"weight": REQUIRED, "density": 1.0})
def ties(base, deltas, *, weights, density, lambda_=1.0, normalize=True, **_):
    """TIES: trim to `density` by magnitude, elect signs, disjoint mean (normalize on by default)."""
    for d, rho in zip(deltas, density):
        trim_magnitude(d, rho)
    return combine(base, deltas, weights=weights, consensus=True, normalize=normalize, lambda_=lambda_)


_DARE = {**_COMMON, "normalize": False, "rescale": True, "rescale_mode": "density"}


def _dare(base, deltas, *, weights, density, generator, rescale, rescale_mode, consensus, normalize, lambda_):
    for d, rho in zip(deltas, density):
        random_drop(d, rho, generator=generator, rescale=rescale, rescale_mode=rescale_mode)
    return combine(base, deltas, weights=weights, consensus=consensus, normalize=normalize, lambda_=lambda_)


@register("dare_linear", inputs="deltas", global_params=_DARE, model_params={"weight": REQUIRED, "density": 1.0}, random=True)
def dare_linear(base, deltas, *, weights, density, generator=None, lambda_=1.0, normalize=False,
                rescale=True, rescale_mode="density", **_):
    """DARE then task arithmetic."""
    return _dare(base, deltas, weights=weights, density=density, generator=generator, rescale=rescale,
                 rescale_mode=rescale_mode, consensus=False, normalize=normalize, lambda_=lambda_)


@register("dare_ties", inputs="deltas", global_params=_DARE, model_params={"weight": REQUIRED, "density": 1.0}, random=True)
def dare_ties(base, deltas, *, weights, density, generator=None, lambda_=1.0, normalize=False,
              rescale=True, rescale_mode="density", **_):
    """DARE then TIES's sign election and disjoint mean."""
    return _dare(base, deltas, weights=weights, density=density, generator=generator, rescale=rescale,
                 rescale_mode=rescale_mode, consensus=True, normalize=normalize, lambda_=lambda_)


_CRUMBS = {"weight": REQUIRED, "density": 1.0, "gamma": 0.01}


@register("breadcrumbs", inputs="deltas", global_params={**_COMMON, "normalize": False}, model_params=_CRUMBS)
def breadcrumbs(base, deltas, *, weights, density, gamma, lambda_=1.0, normalize=False, **_):
    """Model Breadcrumbs: drop outliers and small entries, then task arithmetic."""
    for d, rho, g in zip(deltas, density, gamma):
        trim_outliers(d, rho, g)
    return combine(base, deltas, weights=weights, consensus=False, normalize=normalize, lambda_=lambda_)


@register("breadcrumbs_ties", inputs="deltas", global_params={**_COMMON, "normalize": False}, model_params=_CRUMBS)
def breadcrumbs_ties(base, deltas, *, weights, density, gamma, lambda_=1.0, normalize=False, **_):
    """Model Breadcrumbs with TIES's sign election and disjoint mean."""
    for d, rho, g in zip(deltas, density, gamma):
        trim_outliers(d, rho, g)
    return combine(base, deltas, weights=weights, consensus=True, normalize=normalize, lambda_=lambda_)
