"""Scoring on Ray (optional extra `safemerge[ray]`): one actor per worker, each holding the pool once.

The actors are built from the `ScorerSpec`, so the pool's model paths and the data paths must be
readable where the actors run (a shared file system on a cluster). A population is spread over the
actors one candidate at a time, and results are yielded as they finish.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Iterator, Sequence

from safemerge._signals import sigterm_kept
from safemerge.errors import ConfigError, SafemergeError
from safemerge.search.objective import Score
from safemerge.search.parallel import worker_died
from safemerge.search.scoring import ScorerSpec


def _ray():
    try:
        import ray
    except ImportError:
        raise SafemergeError("--ray-address needs Ray: pip install 'safemerge[ray]' (ray==2.60.0), "
                             "or use --workers N for local worker processes") from None
    return ray


def gpu_share(device: str, gpus: float, workers: int, *, address: str) -> float:
    """The GPUs each actor asks Ray for: none on the CPU; with `--device cuda`, one each where the cluster has a GPU
    per worker, else 1/k of one, k = ⌈workers / GPUs⌉ actors to a GPU (2 workers on 1 GPU: 0.5 each; 4 on 3: 0.5, since
    Ray places a fractional actor on one GPU and 0.75 would leave the fourth actor waiting for ever), so that every actor
    is placed. An actor asking for none would see no GPU (Ray hides them), so a cluster without one is an error."""
    if not device.startswith("cuda"):
        return 0.0
    if gpus < 1:
        raise ConfigError(f"--device {device} with --ray-address {address or 'local'}: the Ray cluster has no GPU; "
                          "start its nodes with GPUs (ray start --num-gpus N) or score with --device cpu")
    return 1.0 if gpus >= workers else 1.0 / math.ceil(workers / int(gpus))


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) address that nothing answers at is an error now: ray.init retried it for
    minutes, printing only Ray's own connection lines. "auto" and other forms are left to Ray."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"--ray-address {address}: no Ray cluster answers there ({e.strerror or e}); give the head "
                          "node's HOST:PORT (`ray status` on it shows the cluster), or leave --ray-address out to "
                          "start a local one") from None


class RayScorer:
    """Scores candidates on `workers` Ray actors (1 CPU each, and a share of the GPUs with `--device cuda`)."""

    def __init__(self, spec: ScorerSpec, *, address: str, workers: int):
        ray = _ray()
        if workers < 1:
            raise ConfigError(f"--workers {workers}: give at least one Ray worker")
        self._started = not ray.is_initialized()
        self._actors: list[Any] = []
        if self._started:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address in ("local", ""):
                kwargs["num_cpus"] = workers
            else:
                check_reachable(address)
                kwargs["address"] = address
            with sigterm_kept():  # Ray's own handler would exit at once, without the CLI's clean-up
                ray.init(**kwargs)
        try:  # whatever stops the actors' start (no GPU, a scorer that fails, Ctrl-C) shuts down what was started
            share = gpu_share(spec.device, ray.cluster_resources().get("GPU", 0), workers, address=address)
            if share:  # Ray shows each actor its own GPU(s) as cuda:0 on: a cuda:N of the driver's means nothing there
                spec = replace(spec, device="cuda")
            actor = ray.remote(num_cpus=1, num_gpus=share)(_Actor)
            self._actors = [actor.remote(spec) for _ in range(workers)]
            ray.get([a.ready.remote() for a in self._actors])  # build every scorer before the first population
        except BaseException:
            self.close()
            raise

    def score(self, configs: Sequence[dict[str, Any]]) -> Iterator[tuple[int, Score, float]]:
        ray = _ray()
        queue = list(enumerate(configs))
        running: dict[Any, Any] = {}
        idle = list(self._actors)
        while queue or running:
            while queue and idle:
                k, config = queue.pop(0)
                a = idle.pop()
                running[a.score.remote(k, config)] = a
            (done,), _ = ray.wait(list(running), num_returns=1)
            idle.append(running.pop(done))
            try:
                result = ray.get(done)
            except ray.exceptions.RayActorError:  # the actor's process died (its own errors come as themselves)
                raise worker_died(len(self._actors), "Ray actor") from None
            yield result

    def close(self) -> None:
        ray = _ray()
        for a in self._actors:
            ray.kill(a)
        self._actors = []
        if self._started:
            ray.shutdown()


class _Actor:
    def __init__(self, spec: ScorerSpec):
        from safemerge.search.scoring import SerialScorer

        self.scorer = SerialScorer(spec)

    def ready(self) -> bool:
        return True

    def score(self, k: int, config: dict[str, Any]) -> tuple[int, Score, float]:
        score, seconds = self.scorer.score_one(config)
        return k, score, seconds
