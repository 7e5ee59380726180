"""`safemerge seeds`: several runs side by side."""

from __future__ import annotations

import json

import pytest

from safemerge.report.results import ResultsError
from safemerge.report.seeds import seeds_table


def _write(tmp_path, name, results) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps(results))
    return d


def test_models_and_claims_per_seed(tmp_path, full):
    a = _write(tmp_path, "s0", full)
    worse = json.loads(json.dumps(full))
    worse["meta"]["seed"] = 1
    worse["models"]["mergealign"]["safety"] = {"safety_test": 0.10, "advbench_like": 0.10}
    b = _write(tmp_path, "s1", worse)
    text = seeds_table([a, b / "results.json"])
    lines = text.splitlines()
    assert "| model | seed 0 | seed 1 | mean |" in lines
    row = next(l for l in lines if l.startswith("| mergealign |"))
    # knowledge = medicine and finance averaged (no primary domain): (78 + 72) / 2 = 75.0
    assert row == "| mergealign | 75.0 / 91.0 | 75.0 / 10.0 | 75.0 / 50.5 |"
    claim = next(l for l in lines if l.startswith("| MergeAlign's safety ≥ 0.9"))
    assert claim.endswith("| PASS | FAIL |")


def test_a_bad_run_is_named(tmp_path, full):
    a = _write(tmp_path, "s0", full)
    with pytest.raises(ResultsError, match="nothere"):
        seeds_table([a, tmp_path / "nothere.json"])
