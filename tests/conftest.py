"""Shared fixtures. The micro testbed is built once per session (and cached across runs)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_family  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict[str, Path]:
    """base, expert, aligned: tiny random float32 Llamas sharing a base (expert/aligned = base + noise)."""
    return make_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="session")
def testbed_cache() -> Path:
    """Where testbeds are cached across test runs ($SAFEMERGE_TEST_CACHE or .cache/ in the repo)."""
    path = Path(os.environ.get("SAFEMERGE_TEST_CACHE", REPO / ".cache" / "tests"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def micro_testbed(testbed_cache) -> Path:
    """The `micro` testbed (seed 0): base, aligned, expert-medicine, expert-finance and data/."""
    from safemerge.testbed import build_testbed

    return build_testbed(testbed_cache / "micro-0", seed=0, preset="micro", progress=False)
