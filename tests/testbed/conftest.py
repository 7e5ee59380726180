"""Fixtures of the testbed tests: micro builds for seeds 0 and 1, made once per session.

Builds go through the normal cache ($SAFEMERGE_CACHE, default ~/.cache/safemerge), so a second
test session copies instead of training.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def micro_build(tmp_path_factory):
    """A function seed -> path of the micro testbed for that seed (built at most once per session)."""
    from safemerge.testbed import build_testbed

    built = {}

    def get(seed: int):
        if seed not in built:
            built[seed] = build_testbed(tmp_path_factory.mktemp(f"micro-s{seed}") / "tb", seed=seed,
                                        preset="micro", progress=False)
        return built[seed]

    return get


@pytest.fixture(scope="session")
def micro0(micro_build):
    return micro_build(0)
