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


@register("nuslerp", inputs="two", global_params={"nuslerp_flatten": True, "nuslerp_row_wise": False},
          model_params={"weight": REQUIRED})
def nuslerp(base: torch.Tensor | None, tensors, *, weights, nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """mergekit's NuSLERP: slerp between two models at t = w_2 / (w_1 + w_2) (0.5 when the weights sum to 0).

    With a base model the two task vectors are interpolated and added to the base; without one, the weights
    themselves. `nuslerp_flatten` (default) takes each tensor as one vector; otherwise every row (vectors
    along the last dimension), or with `nuslerp_row_wise` every column (along the first), is interpolated
    on its own. Per vector: cos Ω = <a/‖a‖, b/‖b‖> with norms clamped to ≥ 1e-7, Ω = acos cos Ω, and
    out = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, or (1−t)·a + t·b where 1 − cos²Ω ≤ 1e-16.
    Norms and dot products are float64 sums in a fixed order; the combination is float32.
    """
    w0, w1 = (float(w) for w in weights)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    a, b = (x.to(torch.float32) for x in tensors)
    if base is not None:
        base32 = base.to(torch.float32)
        a, b = a - base32, b - base32
    shape = a.shape
    if nuslerp_flatten or a.dim() < 2:
        va, vb = a.reshape(1, -1), b.reshape(1, -1)
    elif nuslerp_row_wise:
        va, vb = (x.transpose(0, -1).reshape(-1, shape[0]) for x in (a, b))
    else:
        va, vb = a.reshape(-1, shape[-1]), b.reshape(-1, shape[-1])
    if va.shape[0] == 1:
        fa, fb = flat(va), flat(vb)
        sums = native.dots(fa, fb) if native.usable(fa, fb) else _dots(fa, fb)
        saa, sbb, sab = (torch.tensor([v], dtype=torch.float64, device=a.device) for v in sums)
    else:
        saa, sbb, sab = _row_dots(va, vb)
    na, nb = saa.sqrt().clamp_min(1e-7), sbb.sqrt().clamp_min(1e-7)
    cos = (sab / na / nb).clamp(-1.0, 1.0)
    colinear = (1 - cos.square()) <= EPS**2
    omega = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.sin(omega)
    ca = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * omega) / sin)
    cb = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * omega) / sin)
    mixed = va * ca.to(torch.float32).unsqueeze(1) + vb * cb.to(torch.float32).unsqueeze(1)
    if not (nuslerp_flatten or a.dim() < 2) and nuslerp_row_wise:
        mixed = mixed.reshape(a.transpose(0, -1).shape).transpose(0, -1)
    mixed = mixed.reshape(shape)
    if base is not None:
        mixed = base32 + mixed
    if out is None:
        return mixed
    output(mixed, out).copy_(mixed.reshape(out.shape))
    return out


def _row_dots(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σx², Σy², Σxy) of each row, in float64, a group of rows at a time (each row summed by one thread)."""
    rows, cols = x.shape
    step = max(1, ROW // max(cols, 1))
    parts: list[list[torch.Tensor]] = [[], [], []]
    for r in range(0, rows, step):
        u, v = x[r:r + step].to(torch.float64), y[r:r + step].to(torch.float64)
        for i, (p, q) in enumerate(((u, u), (v, v), (u, v))):
            parts[i].append((p * q).sum(dim=1))
    return tuple(torch.cat(p) for p in parts)
