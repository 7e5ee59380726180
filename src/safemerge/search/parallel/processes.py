"""Local parallel scoring: a pool of spawned worker processes, each holding the pool once.

Each worker builds a `SerialScorer` from the spec on its first task (the scorer then lives for the
worker's lifetime as the worker process's own state) and scores one candidate per task.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Iterator, Sequence

from safemerge.errors import ConfigError
from safemerge.search.objective import Score
from safemerge.search.parallel import worker_died
from safemerge.search.scoring import ScorerSpec, SerialScorer

# this worker process's own state: the spec (set by the initializer) and the scorer built from it
_SPEC: ScorerSpec | None = None
_WORKER: SerialScorer | None = None


def _init(spec: ScorerSpec) -> None:
    global _SPEC
    _SPEC = spec
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """End this worker once the search that spawned it is gone: a search killed with SIGKILL (or by the OOM killer)
    shuts no pool down, and its workers would each go on holding a copy of the pool that a --resume needs."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _score(k: int, config: dict[str, Any]) -> tuple[int, Score, float]:
    global _WORKER
    if _WORKER is None:  # built in the first task, so that its errors reach the caller as exceptions
        assert _SPEC is not None, "worker used before its initializer ran"
        _WORKER = SerialScorer(_SPEC)
    score, seconds = _WORKER.score_one(config)
    return k, score, seconds


class ProcessScorer:
    """Scores candidates in `workers` spawned processes; yields each result as it finishes."""

    def __init__(self, spec: ScorerSpec, *, workers: int):
        if workers < 1:
            raise ConfigError(f"--workers {workers}: give at least one worker")
        self.spec = spec
        self.workers = workers
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                         initializer=_init, initargs=(spec,))

    def score(self, configs: Sequence[dict[str, Any]]) -> Iterator[tuple[int, Score, float]]:
        pending: set = set()
        try:
            pending = {self._pool.submit(_score, k, c) for k, c in enumerate(configs)}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                errors = [e for e in (f.exception() for f in done) if e is not None]
                yield from sorted((f.result() for f in done if f.exception() is None), key=lambda r: r[0])  # journaled first
                if errors:
                    raise errors[0]  # the scorer's own error (a bad checkpoint, say), as a serial run raises it
        except BrokenProcessPool:
            raise worker_died(self.workers) from None
        finally:
            for fut in pending:
                fut.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
