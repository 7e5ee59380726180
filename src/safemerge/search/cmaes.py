"""CMA-ES over a merge config's weights and densities (or t): the evolutionary merge of EvoMM.

Covariance Matrix Adaptation Evolution Strategy (Hansen & Ostermeier, 2001) through the `cma`
package, as mergekit-evolve and the safety-aware search of Hammoud et al. (2024) use it: each step
(generation) samples a population of points in the box of `SearchSpace`, scores each point's merge,
and updates the mean, step size and covariance from the ranking.

    population λ_pop = 4 + ⌊3 ln n⌋ (cma's default) for n searched numbers
    start        the config's own values clipped into the box, scored first (candidate 0), so the best candidate
                 is never worse than that start (the config itself where its values lie in the box);
                 sigma0 = 0.25 (a quarter of the unit range)
    bounds       the space's box, handled by cma's BoundTransform (points are always inside it)

All randomness comes from one `numpy.random.Generator` seeded with `seed` and handed to cma as its
`randn`, so a run is a deterministic function of (seed, scores): that is what makes replay-resume and
serial/parallel agreement exact.
"""

from __future__ import annotations

import math
import warnings

from safemerge.errors import ConfigError
from safemerge.search.evaluations import Candidate, Evaluations
from safemerge.search.objective import Score
from safemerge.search.space import SearchSpace

DEFAULT_STEPS = 100  # the paper's budget
DEFAULT_SIGMA0 = 0.25
PENALTY = 1e6  # what cma is told for a candidate whose loss is not finite


def default_popsize(n: int) -> int:
    return 4 + int(3 * math.log(n))


def cmaes(space: SearchSpace, evaluate: Evaluations, *,
          steps: int = DEFAULT_STEPS, seed: int = 0, popsize: int | None = None,
          sigma0: float = DEFAULT_SIGMA0) -> tuple[int, Candidate, Score]:
    """Score the start, run `steps` generations (fewer if cma's own stopping criteria fire) and return the best
    (index, candidate, score) evaluated."""
    import cma
    import numpy as np

    if steps < 1:
        raise ConfigError(f"--steps {steps}: CMA-ES needs at least one generation")
    if sigma0 <= 0:
        raise ConfigError(f"sigma0 {sigma0} must be positive")
    n = len(space.dims)
    rng = np.random.default_rng(seed)
    options = {
        "bounds": [space.lower, space.upper],
        "popsize": popsize or default_popsize(n),
        "seed": math.nan,  # cma must not touch numpy's global generator ...
        "randn": lambda *shape: rng.standard_normal(shape),  # ... it draws from ours
        "maxiter": steps,
        "verbose": -9, "verb_log": 0, "verb_disp": 0,  # no console output, no outcmaes/ files
    }
    if n == 1:  # SLERP's or NearSwap's t alone: cma 4.5's cap of the step size at a third of the range fails in one
        options["maxstd"] = math.inf  # dimension ("not yet initialized") once sigma reaches it; the bounds still hold
    x0 = [space.start()[label] for label in space.labels]
    es = cma.CMAEvolutionStrategy(x0, sigma0, options)
    evaluate([_candidate(space, x0)])  # cma never proposes its mean itself; it draws nothing from rng here
    for done in range(steps):
        stop = es.stop()
        if stop:
            warnings.warn(f"CMA-ES stopped after {done} of {steps} generations: cma's own stopping criteria fired "
                          f"({', '.join(map(str, stop))}: the search has converged, or its step size cannot shrink "
                          "further); the best so far is the result", UserWarning, stacklevel=2)
            break
        xs = es.ask()
        candidates = [_candidate(space, x) for x in xs]
        scores = evaluate(candidates)
        es.tell(xs, [s.objective if math.isfinite(s.objective) else PENALTY for s in scores])
    return evaluate.best()


def _candidate(space: SearchSpace, x) -> Candidate:
    point = space.point(x)
    return Candidate(point, space.to_config(point))
