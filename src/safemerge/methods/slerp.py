"""Spherical linear interpolation of two models, tensor by tensor (Shoemake, 1985; as used by mergekit)."""

from __future__ import annotations

import math

import torch

from safemerge.methods import REQUIRED, register

DOT_THRESHOLD = 0.9995  # above this |cos θ| the tensors are (anti)parallel: interpolate linearly
EPS = 1e-8


@register("slerp", inputs="pair", global_params={"t": REQUIRED})
def slerp(a: torch.Tensor, b: torch.Tensor, *, t: float) -> torch.Tensor:
    """Slerp between float32 tensors `a` (t = 0, the base) and `b` (t = 1), each taken whole (flattened).

    cos Ω = <a/|a|, b/|b|>;  out = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b,
    falling back to (1−t)·a + t·b when |cos Ω| > 0.9995.
    """
    t = float(t)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    dot = torch.dot(a.reshape(-1), b.reshape(-1))
    # normalise only vectors with a norm above EPS (a zero vector keeps its zeros)
    dot = dot / (na if na > EPS else 1.0) / (nb if nb > EPS else 1.0)
    cos = float(dot)
    if abs(cos) > DOT_THRESHOLD:
        return torch.lerp(a, b, t)
    omega = math.acos(cos)
    s = math.sin(omega)
    out = a * (math.sin((1 - t) * omega) / s)
    out.add_(b, alpha=math.sin(t * omega) / s)
    return out
