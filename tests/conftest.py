"""Shared fixtures. The micro testbed is built once per session (and cached across runs)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Nothing is fetched at test time: a hub id resolves from the local HF cache only (tests point it at their own).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_family  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Testbed builds are cached across test runs inside the repo (git-ignored), not in the user's ~/.cache.
os.environ.setdefault("SAFEMERGE_CACHE", str(REPO / ".cache"))


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP spinning made single matmuls
    10-1000x slower: a test runs on one torch thread, and the count is restored after. Directories whose tests all
    want it use it autouse (evaluate/, search/), others by `pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict[str, Path]:
    """base, expert, aligned: tiny random float32 Llamas sharing a base (expert/aligned = base + noise)."""
    return make_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="session")
def tiny_family_bf16(tmp_path_factory) -> dict[str, Path]:
    """The tiny family stored in bf16, as real checkpoints are (merged in float32, written in bf16)."""
    return make_family(tmp_path_factory.mktemp("family-bf16"), dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def micro_testbed(tmp_path_factory) -> Path:
    """The `micro` testbed (seed 0): base, aligned, expert-medicine, expert-finance and data/.

    Built once into $SAFEMERGE_CACHE (trained on the first run, copied afterwards) and copied here, so
    tests may write beside it freely."""
    from safemerge.testbed import build_testbed

    return build_testbed(tmp_path_factory.mktemp("micro") / "testbed", seed=0, preset="micro", progress=False)
