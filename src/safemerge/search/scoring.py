"""Scoring candidates: a config in, its losses out; serially here, in parallel in `search.parallel`.

A `ScorerSpec` is everything a scorer needs to build itself (plain data, so it pickles to worker
processes and Ray actors): the pool's config, the data files, λ and the batching options. Each
scorer builds one `CandidateModel` (the pool, read once) and one `Objective` (the data, tokenised
once) and then scores any number of candidate configs of that pool.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Protocol, Sequence

import torch

from safemerge.search.objective import DEFAULT_LAMBDA, Objective, Score, load_pairs


@dataclass(frozen=True)
class ScorerSpec:
    """What builds a scorer. `config` is the merge config as a dict; data paths may be None when λ gives
    that set no weight. `threads` fixes torch's intra-op threads (None: leave torch's default)."""

    config: dict[str, Any]
    safety_data: str | None
    domain_data: str | None
    lambda_: float = DEFAULT_LAMBDA
    batch_size: int = 16
    max_length: int | None = 512
    limit: int | None = None
    device: str = "cpu"
    threads: int | None = None
    allow_pickle: bool = False
    trim_memo_bytes: int | None = None  # CandidateModel's memo of sorted |τ| and DARE draws (None: memo_budget; 0: none)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def effective_max_length(max_length: int | None, config: dict) -> int | None:
    """`max_length`, but no more than the model's `max_position_embeddings`: no example is scored past the positions
    the model has (the search journals this value, so a resume cannot mix cut and uncut scores)."""
    context = config.get("max_position_embeddings") if isinstance(config, dict) else None
    values = [x for x in (max_length, context) if isinstance(x, int) and x > 0]
    return min(values) if values else None


class Scorer(Protocol):
    """Scores candidate configs; yields (position in `configs`, score, seconds) as each one finishes."""

    def score(self, configs: Sequence[dict[str, Any]]) -> Iterator[tuple[int, Score, float]]:
        ...

    def close(self) -> None:
        ...


class SerialScorer:
    """Scores in this process, one candidate after another."""

    def __init__(self, spec: ScorerSpec):
        from safemerge.search.candidates import CandidateModel

        self._threads_before = torch.get_num_threads()
        if spec.threads:
            torch.set_num_threads(spec.threads)  # restored by close()
        self.spec = spec
        self.candidate = CandidateModel(spec.config, device=spec.device, allow_pickle=spec.allow_pickle,
                                        trim_memo_bytes=spec.trim_memo_bytes)
        safety = load_pairs(spec.safety_data, limit=spec.limit) if spec.safety_data else None
        domain = load_pairs(spec.domain_data, limit=spec.limit) if spec.domain_data else None
        max_length = effective_max_length(spec.max_length, self.candidate.reference.config)
        self.objective = Objective(self.candidate.tokenizer, safety=safety, domain=domain, lambda_=spec.lambda_,
                                   batch_size=spec.batch_size, max_length=max_length)

    def score_one(self, config: dict[str, Any]) -> tuple[Score, float]:
        start = time.perf_counter()
        model = self.candidate.load(config)
        score = self.objective(model)
        return score, time.perf_counter() - start

    def score(self, configs: Sequence[dict[str, Any]]) -> Iterator[tuple[int, Score, float]]:
        for k, config in enumerate(configs):
            score, seconds = self.score_one(config)
            yield k, score, seconds

    def close(self) -> None:
        torch.set_num_threads(self._threads_before)
