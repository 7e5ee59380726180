"""Spherical linear interpolation of two models, tensor by tensor (Shoemake, 1985; as used by mergekit)."""

from __future__ import annotations

import math

import torch

from safemerge.methods import REQUIRED, native, register
from safemerge.methods.blocks import BLOCK, flat, output, spans

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
        for i, (u, v) in enumerate(((x, x), (y, y), (x, y))):
            sums[i] += _sum64(u * v)
    return sums[0], sums[1], sums[2]


def _sum64(p: torch.Tensor) -> float:
    """The sum of a flat float64 tensor in a fixed order: rows of ROW elements, each on one thread."""
    m = p.numel() // ROW * ROW
    part = float(p[:m].view(-1, ROW).sum(dim=1).sum()) if m else 0.0
    return part + (float(p[m:].sum()) if m < p.numel() else 0.0)


def _gram(blocks, k: int) -> torch.Tensor:
    """G_ij = <x_i, x_j> (float64, on the CPU) of k vectors over an iterable of blocks, each a list of their k
    float32 pieces; every sum in a fixed order (_sum64), so G does not depend on threads or alignment."""
    g = torch.zeros(k, k, dtype=torch.float64)
    for xs in blocks:
        wide = [x.to(torch.float64) for x in xs]
        for i in range(k):
            for j in range(i, k):
                g[i, j] += _sum64(wide[i] * wide[j])
                g[j, i] = g[i, j]
    return g


def _combine(o: torch.Tensor, blocks, coefs: list[float]) -> None:
    """o = (base +) Σ c_i·x_i, block by block in float32; `blocks` yields (start, end, base block or None, pieces)."""
    for s, e, bb, xs in blocks:
        acc = xs[0] * coefs[0]
        for x, c in zip(xs[1:], coefs[1:]):
            acc.add_(x * c)
        o[s:e] = acc if bb is None else acc.add_(bb)


def _blocks(xs: list[torch.Tensor], base: torch.Tensor | None):
    """(start, end, base block or None, [x_i − base or x_i]) in float32, block by block; never in place."""
    for s, e in spans(xs[0].numel(), xs[0]):
        bb = base[s:e].to(torch.float32) if base is not None else None
        yield s, e, bb, [x[s:e].to(torch.float32) if bb is None else torch.sub(x[s:e], bb) for x in xs]


@register("multislerp", inputs="base_optional", global_params={"normalize_weights": True, "eps": 1e-8},
          model_params={"weight": REQUIRED})
def multislerp(base: torch.Tensor | None, tensors, *, weights, normalize_weights: bool = True, eps: float = 1e-8,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """mergekit's Multi-SLERP: a weighted mean on the hypersphere of the models' (or, with a base, their task
    vectors') directions, at the weighted mean norm.

    With x_i the flattened tensors (θ_i − θ_base with a base), w the weights (÷ Σw when `normalize_weights`),
    u_i = x_i / (‖x_i‖ + eps) and S = Σ w_i·u_i: out = (θ_base +) S/‖S‖ · Σ w_i·‖x_i‖. mergekit maps the points
    to the tangent space at S/‖S‖, averages there and maps back; the averaged tangent vector,
    Σ w_i·(u_i − <u_i, m>·m) with m = S/‖S‖, is S − ‖S‖·m = 0, so the map back returns m and the closed form above
    is the same result (up to float32 rounding). Where ‖S‖ < eps: with two models (θ_base +) w_1·x_1 + w_2·x_2,
    else an error. One model: its tensor as it is. The Gram matrix <x_i, x_j> is one float64 pass, the output
    another: nothing of the tensor's size beyond a block is allocated.
    """
    result = output(tensors[0], out)
    o, xs = flat(result), [flat(t) for t in tensors]
    fbase = flat(base) if base is not None else None
    if len(xs) == 1:
        _combine(o, _blocks(xs, None), [1.0])
        return result
    w = [float(v) for v in weights]
    if normalize_weights:
        total = sum(w)
        if total == 0:
            raise ValueError(f"the weights {w} sum to 0 and normalize_weights is on")
        w = [v / total for v in w]
    g = _gram((pieces for _, _, _, pieces in _blocks(xs, fbase)), len(xs))
    norms = g.diagonal().sqrt()
    inv = 1.0 / (norms + eps)
    wv = torch.tensor(w, dtype=torch.float64)
    a = wv * inv  # S = Σ a_i x_i
    length = max(float(a @ g @ a), 0.0) ** 0.5
    if length < eps:
        if len(xs) != 2:
            raise ValueError("the weighted sum of the models' directions is zero (antipodal models whose weights "
                             "balance out); change the weights")
        coefs = w
    else:
        coefs = (a * float(wv @ norms) / length).tolist()
    _combine(o, _blocks(xs, fbase), coefs)
    return result


@register("karcher", inputs="models", global_params={"max_iter": 10, "tol": 1e-5})
def karcher(tensors, *, max_iter: float = 10, tol: float = 1e-5, out: torch.Tensor | None = None) -> torch.Tensor:
    """mergekit's Karcher mean: the Riemannian (Fréchet) mean of the models' directions on the unit hypersphere,
    equal weights, at the mean of their norms; the base, when given, is one of the points.

    From the mean of the unit vectors u_i (those with ‖θ_i‖ > tol), up to `max_iter` steps of
    m ← exp_m(Σ α_i·θ_i/sin θ_i·(u_i − cos θ_i·m)), θ_i = acos <m, u_i> (points within tol of m skipped), stopping
    once the step is below tol; out = m · Σ ‖θ_i‖/N. m stays a combination Σ c_i·u_i, so the iteration runs on
    the coefficients c and the Gram matrix of the u_i (one float64 pass over the tensors) and the output is
    one more pass, where mergekit iterates on whole tensors.
    """
    result = output(tensors[0], out)
    o, xs = flat(result), [flat(t) for t in tensors]
    k = len(xs)
    if k == 1:
        _combine(o, _blocks(xs, None), [1.0])
        return result
    g = _gram((pieces for _, _, _, pieces in _blocks(xs, None)), k)
    norms = g.diagonal().sqrt()
    valid = [i for i in range(k) if float(norms[i]) > tol]
    if not valid:
        o.zero_()
        return result
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    gu = g / safe[:, None] / safe[None, :]  # the Gram matrix of the unit vectors (a zero tensor's unit is 0)
    alpha = torch.zeros(k, dtype=torch.float64)
    alpha[valid] = 1.0 / len(valid)

    def size(c: torch.Tensor) -> float:
        return max(float(c @ gu @ c), 0.0) ** 0.5

    c = alpha.clone()
    n0 = size(c)
    if n0 < tol:
        c = torch.zeros(k, dtype=torch.float64)
        c[valid[0]] = 1.0
    else:
        c = c / n0
    for _ in range(int(max_iter)):
        dots = (gu @ c).clamp(-1.0, 1.0)
        f = torch.zeros(k, dtype=torch.float64)  # Σ_i f_i·(u_i − cos θ_i·m): f_i = α_i·θ_i/sin θ_i, 0 for skipped points
        for i in valid:
            theta = math.acos(float(dots[i]))
            if theta >= tol:
                f[i] = alpha[i] * theta / math.sin(theta)
        step = f - float(f @ dots) * c
        length = size(step)
        if length < tol:
            break
        c = math.cos(length) * c + math.sin(length) * step / length
        n = size(c)
        if n > tol:
            c = c / n
    scale = float(norms.sum()) / k
    _combine(o, _blocks(xs, None), (scale * c / safe).tolist())
    return result


@register("nuslerp", inputs="base_optional", global_params={"nuslerp_flatten": True, "nuslerp_row_wise": False},
          model_params={"weight": REQUIRED}, scale_free=True, others=2)  # t = w_2 / (w_1 + w_2)
def nuslerp(base: torch.Tensor | None, tensors, *, weights, nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """mergekit's NuSLERP: slerp between two models at t = w_2 / (w_1 + w_2) (0.5 when the weights sum to 0).

    With a base model the two task vectors are interpolated and added to the base; without one, the weights
    themselves. `nuslerp_flatten` (default) takes each tensor as one vector; otherwise every row (vectors
    along the last dimension), or with `nuslerp_row_wise` every column (along the first), is interpolated
    on its own. Per vector: cos Ω = <a/‖a‖, b/‖b‖> with norms clamped to ≥ 1e-7, Ω = acos cos Ω, and
    out = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, or (1−t)·a + t·b where 1 − cos²Ω ≤ 1e-16.
    Norms and dot products are float64 sums in a fixed order; the combination is float32. Everything runs a
    group of whole rows (about one block) at a time: nothing of the tensor's size is allocated.
    """
    w0, w1 = (float(w) for w in weights)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    fa, fb = flat(tensors[0]), flat(tensors[1])
    fbase = flat(base) if base is not None else None
    result = output(tensors[0], out)
    o = flat(result)
    n, shape = fa.numel(), tensors[0].shape
    if nuslerp_flatten or len(shape) < 2:
        mode, cols = "whole", 1
    elif nuslerp_row_wise:
        mode, cols = "cols", n // shape[0] if shape[0] else 0  # vectors along dim 0: the columns of a (shape[0], rest) view
    else:
        mode, cols = "rows", shape[-1]  # vectors along the last dim: the rows of a (rest, shape[-1]) view

    def groups():
        """(start, end, base block or None, a's block, b's block) in float32, whole rows of the view at a time."""
        step = BLOCK if mode == "whole" else max(1, BLOCK // max(cols, 1)) * cols
        for s in range(0, n, max(step, 1)):
            e = min(n, s + step)
            bb = fbase[s:e].to(torch.float32) if fbase is not None else None
            # τ's block in one mixed-dtype pass (a half-precision block is widened inside the kernel); never in place
            da, db = (x[s:e].to(torch.float32) if bb is None else torch.sub(x[s:e], bb) for x in (fa, fb))
            yield s, e, bb, da, db

    shaped = (lambda x: x.view(-1, cols)) if mode != "whole" else (lambda x: x)  # one vector per row of the view
    if mode == "whole":
        sums = [0.0, 0.0, 0.0]
        for _, _, _, da, db in groups():
            part = native.dots(da, db) if native.usable(da, db) else _dots(da, db)
            sums = [x + y for x, y in zip(sums, part)]
        coefs = _coefficients(*(torch.tensor(v, dtype=torch.float64) for v in sums), t)  # 0-dim: broadcast on any device
    elif mode == "cols":
        sums = [torch.zeros(cols, dtype=torch.float64, device=fa.device) for _ in range(3)]
        for _, _, _, da, db in groups():
            for acc, part in zip(sums, _vector_dots(shaped(da), shaped(db), dim=0)):
                acc.add_(part)
        coefs = _coefficients(*sums, t)
    for s, e, bb, da, db in groups():
        if mode == "rows":
            ca, cb = _coefficients(*_vector_dots(shaped(da), shaped(db), dim=1), t)
            ca, cb = ca.unsqueeze(1), cb.unsqueeze(1)
        else:
            ca, cb = coefs
        mixed = shaped(da) * ca.to(torch.float32) + shaped(db) * cb.to(torch.float32)
        o[s:e] = (mixed.view(-1) if bb is None else bb + mixed.view(-1))
    return result


def _coefficients(saa: torch.Tensor, sbb: torch.Tensor, sab: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NuSLERP's (c_a, c_b) per vector, in float64, from Σa², Σb², Σab."""
    na, nb = saa.sqrt().clamp_min(1e-7), sbb.sqrt().clamp_min(1e-7)
    cos = (sab / na / nb).clamp(-1.0, 1.0)
    colinear = (1 - cos.square()) <= EPS**2
    omega = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.sin(omega)
    ca = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * omega) / sin)
    cb = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * omega) / sin)
    return ca, cb


def _vector_dots(x: torch.Tensor, y: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σx², Σy², Σxy) along `dim` of two 2-D blocks (dim 1: per row, dim 0: per column), in float64, each sum
    taken in a fixed order."""
    u, v = x.to(torch.float64), y.to(torch.float64)
    return (u * u).sum(dim=dim), (v * v).sum(dim=dim), (u * v).sum(dim=dim)
