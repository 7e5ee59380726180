"""Scoring a population in parallel: worker processes on this machine, or Ray actors on a cluster.

Every worker builds its own scorer from the same `ScorerSpec` (so each holds the pool once) and
scores whole candidates; results are identical to the serial run's because scoring a candidate is
deterministic and each worker scores with the same number of torch threads as the serial run would
be told to use (`ScorerSpec.threads`; the search sets it to 1 whenever it runs workers).
"""

from __future__ import annotations

from dataclasses import replace

from safemerge.errors import SafemergeError
from safemerge.methods.task_arithmetic import TRIM_MEMO_BYTES
from safemerge.search.scoring import Scorer, ScorerSpec, SerialScorer


def worker_died(workers: int, what: str = "worker process") -> SafemergeError:
    """The error for a worker lost while scoring: what to do next (the journal keeps what was scored)."""
    return SafemergeError(f"a {what} died while scoring (killed, or out of memory: each of the {workers} workers holds "
                          "the whole pool); the candidates scored so far are in the journal: run the same command with "
                          "--resume to go on, with fewer --workers if memory ran out")


def make_scorer(spec: ScorerSpec, *, workers: int = 1, ray_address: str | None = None) -> Scorer:
    """SerialScorer for one worker, ProcessScorer for several, RayScorer when a Ray address is given
    ("local" or "auto" start or join a local instance; "ray://host:10001" joins a cluster).

    Several scorers may share one GPU, so each keeps a TIES / DARE memo of at most TRIM_MEMO_BYTES (1 GiB) unless the
    spec sets a budget (one scorer alone on a GPU may keep an eighth of its free memory: `memo_budget`)."""
    if (ray_address or workers > 1) and spec.trim_memo_bytes is None:
        spec = replace(spec, trim_memo_bytes=TRIM_MEMO_BYTES)
    if ray_address:
        from safemerge.search.parallel.ray_pool import RayScorer

        return RayScorer(spec, address=ray_address, workers=workers)
    if workers > 1:
        from safemerge.search.parallel.processes import ProcessScorer

        return ProcessScorer(spec, workers=workers)
    return SerialScorer(spec)


__all__ = ["make_scorer"]
