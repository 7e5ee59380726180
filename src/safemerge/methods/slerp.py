"""Spherical linear interpolation of two models, tensor by tensor (Shoemake, 1985; as used by mergekit)."""

from __future__ import annotations

import math

import torch

from safemerge.methods import REQUIRED, register
from safemerge.methods.blocks import flat, output, spans

DOT_THRESHOLD = 0.9995  # above this |cos Ω| the tensors are (anti)parallel: interpolate linearly
EPS = 1e-8


@register("slerp", inputs="pair", global_params={"t": REQUIRED})
def slerp(a: torch.Tensor, b: torch.Tensor, *, t: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Slerp between `a` (t = 0, the base) and `b` (t = 1), each taken whole (flattened), in float32.

    cos Ω = <a/‖a‖, b/‖b‖>;  out = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b,
    falling back to (1−t)·a + t·b when |cos Ω| > 0.9995. A vector with ‖·‖ ≤ 1e-8 is not normalised.
    """
    t = float(t)
    fa, fb = flat(a), flat(b)
    saa = sbb = sab = 0.0  # float64 accumulators of the block sums
    for s, e in spans(fa.numel(), fa):
        x, y = fa[s:e].to(torch.float32), fb[s:e].to(torch.float32)
        saa += float(torch.dot(x, x))
        sbb += float(torch.dot(y, y))
        sab += float(torch.dot(x, y))
    na, nb = math.sqrt(saa), math.sqrt(sbb)
    cos = sab / (na if na > EPS else 1.0) / (nb if nb > EPS else 1.0)
    if abs(cos) > DOT_THRESHOLD:
        ca, cb = 1.0 - t, t
    else:
        omega = math.acos(max(-1.0, min(1.0, cos)))
        ca, cb = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    result = output(a, out)
    o = flat(result)
    for s, e in spans(fa.numel(), fa):
        acc = fa[s:e].to(torch.float32, copy=True).mul_(ca)
        o[s:e] = acc.add_(fb[s:e].to(torch.float32), alpha=cb)
    return result
