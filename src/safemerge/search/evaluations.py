"""The one way an optimizer scores candidates: through the journal, which makes every run resumable.

`Evaluations(journal, scorer)` numbers the candidates an optimizer proposes (0, 1, 2, ...). A number
the journal already holds is answered from it, after checking that the journal's candidate is the
same config (else the run is not a replay of the journaled one, and that is an error); the others
are scored (in parallel when the scorer is) and each is journaled as soon as it is scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from safemerge.config import MergeConfig
from safemerge.errors import SafemergeError
from safemerge.search.journal import Journal, canonical
from safemerge.search.objective import Score, sort_key
from safemerge.search.scoring import Scorer


@dataclass(frozen=True)
class Candidate:
    """A point the optimizer proposes: its labelled numbers and the merge config they make."""

    params: dict[str, float]
    config: MergeConfig

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_yaml_dict()


class ReplayMismatch(SafemergeError):
    """The resumed run proposed a different candidate than the journal holds at that position."""


class Evaluations:
    """Callable: list of candidates -> list of scores, journaled; counts what was scored vs replayed."""

    def __init__(self, journal: Journal, scorer: Scorer, *, on_result: Callable[[int, Candidate, Score, bool], None] | None = None):
        self.journal = journal
        self.scorer = scorer
        self.on_result = on_result or (lambda *a: None)
        self.next = 0
        self.scored = 0
        self.replayed = 0
        self.history: list[tuple[int, Candidate, Score]] = []

    def __call__(self, candidates: Sequence[Candidate]) -> list[Score]:
        first = self.next
        self.next += len(candidates)
        results: list[Score | None] = [None] * len(candidates)
        todo: list[int] = []
        for k, cand in enumerate(candidates):
            entry = self.journal.get(first + k)
            if entry is None:
                todo.append(k)
                continue
            if canonical(entry.config) != canonical(cand.config_dict()):
                raise ReplayMismatch(
                    f"{self.journal.path}: candidate {first + k} of this run differs from the journaled one; the journal "
                    "was written by another version or run of the search; start afresh with --overwrite")
            results[k] = entry.score
            self.replayed += 1
            self.on_result(first + k, cand, entry.score, True)
        if todo:
            for j, score, seconds in self.scorer.score([candidates[k].config_dict() for k in todo]):
                k = todo[j]
                cand = candidates[k]
                self.journal.append(first + k, params=cand.params, config=cand.config_dict(), score=score, seconds=seconds)
                results[k] = score
                self.scored += 1
                self.on_result(first + k, cand, score, False)
        for k, cand in enumerate(candidates):
            self.history.append((first + k, cand, results[k]))  # type: ignore[arg-type]
        return results  # type: ignore[return-value]

    def best(self) -> tuple[int, Candidate, Score]:
        """The lowest objective so far (the earliest among equals)."""
        if not self.history:
            raise SafemergeError("no candidate was scored")
        return min(self.history, key=lambda h: (sort_key(h[2].objective), h[0]))
