"""Safety-aware merge search: find the weights and densities (or t) of a merge config that minimise

    λ · CE(safety data) + (1 − λ) · CE(domain data)

with CMA-ES (EvoMM), LM-Cocktail or a grid, scoring every candidate in memory, journaling it in
SQLite (resumable), optionally on worker processes or Ray. See docs/search.md.
"""

from safemerge.search.candidates import CandidateModel
from safemerge.search.evaluations import Candidate, Evaluations
from safemerge.search.journal import Journal
from safemerge.search.objective import DEFAULT_LAMBDA, Objective, PairSet, Score, answer_ce, load_pairs
from safemerge.search.run import OPTIMIZERS, SearchResult, search
from safemerge.search.space import SearchSpace

__all__ = [
    "search", "SearchResult", "OPTIMIZERS", "SearchSpace", "CandidateModel", "Candidate", "Evaluations", "Journal",
    "Objective", "Score", "PairSet", "load_pairs", "answer_ce", "DEFAULT_LAMBDA",
]
