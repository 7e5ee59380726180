"""RAM, Reinforced Agent Merging (arXiv 2601.13572), with the semantics of mergekit 0.1.5's `ram` and `ramplus_tl`.

An entry of a task vector τ_i = θ_i − θ_base counts as a contribution where |τ_i| > ε. Where one model alone
contributes, its entry is kept whole; where several do, their mean is taken (no entry of an unchanged model dilutes
it, unlike a plain average):

    θ = θ_base + Σ_i m_i·τ_i·(s_i if c = 1 else 1/c),   m_i = [|τ_i| > ε],  c = Σ_i m_i

`ram` has s_i = 1. `ramplus_tl` (RAM+, tensor-local) boosts each model's unique entries by
s_i = 1 + r·clamp(ρ_i, 0, α), with ρ_i = (model i's shared entries) / (its unique entries) counted over the whole
tensor (÷ max(unique, ε) as mergekit divides), so a model whose changes mostly overlap others' gets its few unique
ones weighted up. Computed in float32 block by block, as the task-arithmetic family is (blocks.py).
"""

from __future__ import annotations

from typing import Sequence

import torch

from safemerge.methods import register
from safemerge.methods.blocks import TaskVector, flat, output, spans, task_vectors


def _masked(base: torch.Tensor, tvs: list[TaskVector], epsilon: float):
    """Per block: (start, end, base block, [τ_i], [their masks |τ_i| > ε], contribution count c)."""
    b = flat(base)
    for s, e in spans(b.numel(), b):
        bb = b[s:e].to(torch.float32)
        ds = [tv.block(bb, s, e) for tv in tvs]
        masks = [d.abs() > epsilon for d in ds]
        count = torch.zeros_like(bb)
        for m in masks:
            count.add_(m)
        yield s, e, bb, ds, masks, count


def _ram(base, deltas, *, epsilon: float, boost=None, out=None) -> torch.Tensor:
    tvs = task_vectors(deltas)
    result = output(base, out)
    o = flat(result)
    scales = None
    if boost is not None and tvs:  # a first pass counts each model's lone and shared contributions
        r, alpha = boost
        lone, shared = [0] * len(tvs), [0] * len(tvs)
        for *_, masks, count in _masked(base, tvs, epsilon):
            alone = count == 1
            for i, m in enumerate(masks):
                u = int(torch.count_nonzero(m & alone))
                lone[i] += u
                shared[i] += int(torch.count_nonzero(m)) - u
        scales = [1 + r * min(max(sh / max(u, epsilon), 0.0), alpha) for u, sh in zip(lone, shared)]
    for s, e, bb, ds, masks, count in _masked(base, tvs, epsilon):
        if not ds:
            o[s:e] = bb
            continue
        for d, m in zip(ds, masks):  # only the changes that count (the first pass needs the masks alone)
            d.mul_(m)
        total = ds[0].clone()  # Σ m_i·τ_i; a lone change is the whole sum where c = 1, so Σ / max(c, 1) is RAM
        for d in ds[1:]:
            total.add_(d)
        mean = total.div_(count.clamp_min(1))
        if scales is not None:  # RAM+: where c = 1, the one change scaled by its model's boost
            boosted = torch.zeros_like(bb)
            for d, scale in zip(ds, scales):
                boosted.add_(d, alpha=scale)
            mean = torch.where(count == 1, boosted, mean)
        o[s:e] = mean.add_(bb)
    return result


@register("ram", inputs="deltas", global_params={"epsilon": 1e-5}, elementwise=True)
def ram(base, deltas: Sequence, *, epsilon: float = 1e-5, out=None, **_) -> torch.Tensor:
    """RAM: each entry changed (|τ_i| > epsilon) by one model alone keeps that change; entries changed by several
    get the mean of their changes."""
    return _ram(base, deltas, epsilon=float(epsilon), out=out)


@register("ramplus_tl", inputs="deltas", global_params={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5})
def ramplus_tl(base, deltas: Sequence, *, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5, out=None,
               **_) -> torch.Tensor:
    """RAM+ (tensor-local): as RAM, with each model's unique changes scaled by 1 + r·clamp(shared/unique, 0, alpha),
    its counts of shared and unique changed entries taken over the whole tensor."""
    return _ram(base, deltas, epsilon=float(epsilon), boost=(float(r), float(alpha)), out=out)
