"""Spherical linear interpolation of two models, tensor by tensor (Shoemake, 1985; as used by mergekit)."""

from __future__ import annotations

import math

import torch

from safemerge.methods import REQUIRED, native, register
from safemerge.methods.blocks import flat, output, spans

DOT_THRESHOLD = 0.9995  # above this |cos Ω| the tensors are (anti)parallel: interpolate linearly
EPS = 1e-8
ROW = 1 << 15  # the torch path's summation rows (at most torch's grain size: one thread per row)


@register("slerp", inputs="pair", global_params={"t": REQUIRED})
def slerp(a: torch.Tensor, b: torch.Tensor, *, t: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Slerp between `a` (t = 0, the base) and `b` (t = 1), each taken whole (flattened), in float32.

    cos Ω = <a/‖a‖, b/‖b‖>;  out = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b,
    falling back to (1−t)·a + t·b when |cos Ω| > 0.9995. A vector with ‖·‖ ≤ 1e-8 is not normalised.
    The norms and the dot product are float64 sums in a fixed order (deterministic); on the CPU a fused
    kernel (native.py) computes them in one pass and the combination a·c_a + b·c_b in another, the
    latter bit-identical to the torch code below.
    """
    t = float(t)
    fa, fb = flat(a), flat(b)
    result = output(a, out)
    o = flat(result)
    fused = native.usable(fa, fb, o)
    saa, sbb, sab = native.dots(fa, fb) if fused else _dots(fa, fb)
    na, nb = math.sqrt(saa), math.sqrt(sbb)
    cos = sab / (na if na > EPS else 1.0) / (nb if nb > EPS else 1.0)
    if not abs(cos) <= DOT_THRESHOLD:  # (anti)parallel, or NaN from non-finite inputs (merged with --allow-nonfinite)
        ca, cb = 1.0 - t, t
    else:
        omega = math.acos(max(-1.0, min(1.0, cos)))
        ca, cb = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    if fused:
        native.lerp(fa, fb, ca, cb, o)
        return result
    for s, e in spans(fa.numel(), fa):  # a·c_a + b·c_b, each product rounded (not torch's fused add-with-alpha,
        acc = fa[s:e].to(torch.float32, copy=True).mul_(ca)  # which is fused only in its SIMD kernels)
        o[s:e] = acc.add_(fb[s:e].to(torch.float32, copy=True).mul_(cb))
    return result


def _dots(fa: torch.Tensor, fb: torch.Tensor) -> tuple[float, float, float]:
    """(Σa², Σb², Σab) in float64, block by block, each block summed as rows of ROW elements: a row's sum
    runs on one thread in a fixed order, so the result does not depend on the thread count or on memory
    alignment (BLAS dot products, as `torch.dot` calls, depend on both)."""
    sums = [0.0, 0.0, 0.0]
    for s, e in spans(fa.numel(), fa):
        x, y = fa[s:e].to(torch.float64), fb[s:e].to(torch.float64)
        m = x.numel() // ROW * ROW
        for i, (u, v) in enumerate(((x, x), (y, y), (x, y))):
            p = u * v
            part = float(p[:m].view(-1, ROW).sum(dim=1).sum()) if m else 0.0
            sums[i] += part + (float(p[m:].sum()) if m < p.numel() else 0.0)
    return sums[0], sums[1], sums[2]
