"""Linear (weighted average) merging: θ = Σ w_i·θ_i / Σ w_i (Wortsman et al., 2022, "model soups"), and
passthrough: one model's tensor as it is (optionally scaled), for stacking layers with `slices`; and NearSwap."""

from __future__ import annotations

from typing import Sequence

import torch

from safemerge.methods import REQUIRED, register
from safemerge.methods.blocks import flat, output, spans


@register("linear", inputs="models", global_params={"normalize": True}, model_params={"weight": REQUIRED}, elementwise=True)
def linear(tensors: Sequence[torch.Tensor], *, weights: Sequence[float], normalize: bool = True,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum of same-shape tensors (any float dtype, computed in float32, block by block);
    divided by Σ w_i when `normalize` (and Σ w_i ≠ 0)."""
    total = float(sum(weights))
    scale = 1.0 / total if normalize and abs(total) > 1e-8 else 1.0
    coefs = [float(w) * scale for w in weights]
    result = output(tensors[0], out)
    xs, o = [flat(t) for t in tensors], flat(result)
    for s, e in spans(o.numel(), o):
        acc = xs[0][s:e].to(torch.float32, copy=True).mul_(coefs[0])
        for x, c in zip(xs[1:], coefs[1:]):
            acc.add_(x[s:e].to(torch.float32), alpha=c)
        o[s:e] = acc
    return result


@register("passthrough", inputs="models", model_params={"scale": 1.0}, elementwise=True, max_models=1)
def passthrough(tensors: Sequence[torch.Tensor], *, scale: Sequence[float] = (1.0,),
                out: torch.Tensor | None = None) -> torch.Tensor:
    """The one input tensor, times its `scale` (mergekit's passthrough: frankenmerges stack layers of several
    models with one single-source slice each; `scale: 0` on o_proj/down_proj is a common way to mute a layer)."""
    if len(tensors) != 1:
        raise ValueError(f"passthrough takes one model per tensor; got {len(tensors)}")
    return linear(tensors, weights=[scale[0]], normalize=False, out=out)


@register("nearswap", inputs="pair", global_params={"t": REQUIRED}, elementwise=True)
def nearswap(a: torch.Tensor, b: torch.Tensor, *, t: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """mergekit's NearSwap: take the other model's value where it is near the base's. Per element,
    w = clamp(t / max(|a − b|, 1e-6), 0, 1) and out = w·b + (1 − w)·a (a is the base): elements closer than t
    become b's, farther ones move toward b by t/|a − b|."""
    t = float(t)
    result = output(a, out)
    xa, xb, o = flat(a), flat(b), flat(result)
    for s, e in spans(o.numel(), o):
        x, y = xa[s:e].to(torch.float32), xb[s:e].to(torch.float32)
        w = torch.sub(x, y).abs_().clamp_min_(1e-6).reciprocal_().mul_(t).clamp_(0.0, 1.0)
        o[s:e] = y.mul(w).add_(x.mul(w.neg().add_(1.0)))
    return result
