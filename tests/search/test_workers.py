"""Worker processes: a worker that dies is said plainly (the journal keeps what was scored), and workers end with the
search that spawned them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safemerge.errors import SafemergeError
from safemerge.search.parallel.processes import ProcessScorer
from safemerge.search.scoring import ScorerSpec

from conftest import task_config


def _spec(tiny_family, family_data) -> ScorerSpec:
    return ScorerSpec(config=task_config(tiny_family), safety_data=str(family_data["safety"]),
                      domain_data=str(family_data["domain"]), lambda_=0.5, threads=1)


def test_a_worker_that_dies_is_an_error_that_says_resume(tiny_family, family_data):
    scorer = ProcessScorer(_spec(tiny_family, family_data), workers=2)
    configs = [task_config(tiny_family, weight=w) for w in (0.2, 0.4)]
    try:
        assert sorted(k for k, _, _ in scorer.score(configs)) == [0, 1]
        os.kill(next(iter(scorer._pool._processes)), signal.SIGKILL)
        deadline = time.monotonic() + 20  # until the pool has seen it (else the other worker may score both in time)
        while not scorer._pool._broken and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(SafemergeError, match=r"a worker process died while scoring .* --resume"):
            list(scorer.score(configs))
    finally:
        scorer.close()


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie nobody reaps has ended all the same


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_workers_end_when_the_search_is_killed(tiny_family, family_data):
    """SIGKILL shuts no pool down: each worker notices its parent is gone and exits, freeing its copy of the pool."""
    spec = _spec(tiny_family, family_data)
    code = (
        "import json, sys, time\n"
        "from safemerge.search.parallel.processes import ProcessScorer\n"
        "from safemerge.search.scoring import ScorerSpec\n"
        f"spec = ScorerSpec(**json.loads({json.dumps(json.dumps(spec.as_dict()))}))\n"
        "s = ProcessScorer(spec, workers=2)\n"
        "list(s.score([spec.config, spec.config]))\n"
        "print(' '.join(map(str, s._pool._processes)), flush=True)\n"
        "time.sleep(300)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        workers = [int(x) for x in proc.stdout.readline().split()]
        assert workers and not any(_gone(w) for w in workers)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while not all(_gone(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(_gone(w) for w in workers), workers
    finally:
        proc.kill()
        for w in workers:
            if not _gone(w):
                os.kill(w, signal.SIGKILL)


def test_a_ray_actor_that_dies_is_an_error_that_says_resume(tiny_family, family_data):
    ray = pytest.importorskip("ray")
    from safemerge.search.parallel.ray_pool import RayScorer

    scorer = RayScorer(_spec(tiny_family, family_data), address="local", workers=2)
    try:
        ray.kill(scorer._actors[0])
        with pytest.raises(SafemergeError, match=r"a Ray actor died while scoring .* --resume"):
            list(scorer.score([task_config(tiny_family, weight=w) for w in (0.2, 0.4, 0.6)]))
    finally:
        scorer.close()
