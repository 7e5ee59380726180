"""Safety-aware merge search: find the weights and densities (or t) of a merge config that minimise

    λ · CE(safety data) + (1 − λ) · CE(domain data)

with CMA-ES (EvoMM), LM-Cocktail or a grid, scoring every candidate in memory, journaling it in
SQLite (resumable), optionally on worker processes or Ray. See docs/search.md.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it; imported on first use, so that a submodule without torch (the
# CLI's option defaults in pool_audit) does not pull torch and transformers in with the package
_API = {
    "search": "run", "SearchResult": "run", "OPTIMIZERS": "run", "SearchSpace": "space", "CandidateModel": "candidates",
    "Candidate": "evaluations", "Evaluations": "evaluations", "Journal": "journal", "Objective": "objective",
    "Score": "objective", "PairSet": "objective", "load_pairs": "objective", "answer_ce": "objective",
    "DEFAULT_LAMBDA": "objective",
}
__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f"safemerge.search.{_API[name]}"), name)
    raise AttributeError(f"module 'safemerge.search' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
