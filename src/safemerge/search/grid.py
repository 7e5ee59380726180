"""Grid search over weight × density (the baseline of Hammoud et al., 2024).

One shared value per parameter kind: every searched model gets the same weight and the same density
(a per-model grid would have p^(2n) points). The axes, for p points each:

    weight  ∈ {1/p, 2/p, …, 1}            (0 would drop the model)
    density ∈ linspace(0.1, 1, p)          (when the method declares density)
    t       ∈ linspace(0, 1, p)            (SLERP)

and one point per axis (p = 1) is the top of each range: weight 1, density 1, t 1. So TIES or DARE-TIES over any
pool is a p × p grid, task arithmetic a line of p points. When the method
normalises by the summed weights (`normalize: true`, TIES's default; NuSLERP), one weight shared by every model
cancels out, so the weight axis is left at 1 instead of scoring p identical merges per density.
"""

from __future__ import annotations

import itertools

from safemerge.errors import ConfigError
from safemerge.search.evaluations import Candidate, Evaluations
from safemerge.search.objective import Score
from safemerge.search.space import SearchSpace

DEFAULT_POINTS = 5


def axis(param: str, low: float, high: float, points: int) -> list[float]:
    """The grid values of one parameter kind (see the module docstring)."""
    if points == 1:
        return [high]
    if param == "weight" and low == 0:
        return [high * (i + 1) / points for i in range(points)]
    return [low + (high - low) * i / (points - 1) for i in range(points)]


def grid_points(space: SearchSpace, points: int) -> list[dict[str, float]]:
    """Every grid point as a labelled point of the space, in row-major order (weight, density, t)."""
    kinds = [k for k in ("weight", "density", "t") if any(d.param == k for d in space.dims)]
    axes = []
    for kind in kinds:
        dims = [d for d in space.dims if d.param == kind]  # one shared value: it must lie in every model's range
        low, high = max(d.low for d in dims), min(d.high for d in dims)
        cancels = kind == "weight" and _normalizes(space)
        axes.append([1.0] if cancels else axis(kind, low, high, points))
    out = []
    for values in itertools.product(*axes):
        shared = dict(zip(kinds, values))
        out.append({d.label: shared[d.param] for d in space.dims})
    return out


def _normalizes(space: SearchSpace) -> bool:
    """Whether the method divides by the summed weights: a bool `normalize` (`normalize_weights` in Multi-SLERP), as
    the config or the default sets it, or a method declared scale-free (NuSLERP: its t is w_2 / (w_1 + w_2))."""
    if space.spec.scale_free:
        return True
    key = next((k for k in ("normalize", "normalize_weights") if k in space.spec.global_params), None)
    return key is not None and space.config.parameters.get(key, space.spec.global_params[key]) is True


def grid(space: SearchSpace, evaluate: Evaluations, *, points: int = DEFAULT_POINTS) -> tuple[int, Candidate, Score]:
    """Score every grid point (in one batch, so workers share them) and return the best."""
    if points < 1:
        raise ConfigError(f"--steps {points}: the grid needs at least one point per axis")
    evaluate([Candidate(p, space.to_config(p)) for p in grid_points(space, points)])
    return evaluate.best()
