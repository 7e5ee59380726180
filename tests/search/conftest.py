"""Fixtures of the search tests: the tiny family, {prompt, response} data that the family itself wrote
(so the landscape has a known shape), and one torch thread (the tiny models run fastest that way on a
shared 2-core machine, and scores do not depend on it)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

WORDS = ["the", "a", "capital", "of", "is", "drug", "for", "help", "with", "that", "."]


@pytest.fixture(scope="session")
def search_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(autouse=True)
def results_store_in_tmp(search_home, monkeypatch):
    """The pool audit's figures go to one session-wide store outside the repository."""
    monkeypatch.setenv("SAFEMERGE_HOME", str(search_home))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every search test on one torch thread (the root conftest's `one_thread`)."""


def task_config(family: dict, method: str = "task_arithmetic", **params) -> dict:
    """A config over base + expert + aligned with per-model params (weight 0.5 unless given)."""
    per = {"weight": 0.5, **params}
    return {"merge_method": method, "base_model": str(family["base"]),
            "models": [{"model": str(family[m]), "parameters": dict(per)} for m in ("expert", "aligned")]}


@pytest.fixture(scope="session")
def family_data(tiny_family, tmp_path_factory) -> dict[str, Path]:
    """domain.jsonl: the expert's greedy answers; safety.jsonl: the aligned model's greedy answers, to
    the same 10 prompts. So CE(domain) is lowest near the expert and CE(safety) near the aligned model."""
    from safemerge.evaluate.backends import GenerationSettings, TransformersBackend

    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(4)) for _ in range(10)]
    out = {}
    for role, model in (("domain", "expert"), ("safety", "aligned")):
        backend = TransformersBackend.from_pretrained(tiny_family[model], device="cpu")
        gens = backend.generate(prompts, GenerationSettings(max_new_tokens=5))
        out[role] = root / f"{role}.jsonl"
        out[role].write_text("".join(json.dumps({"prompt": p, "response": g.text}) + "\n" for p, g in zip(prompts, gens)))
    return out
