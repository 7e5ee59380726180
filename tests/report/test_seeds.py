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


def test_a_run_without_a_model_is_left_out_of_its_mean(tmp_path, full):
    a = _write(tmp_path, "s0", full)
    partial = json.loads(json.dumps(full))
    partial["meta"]["seed"] = 1
    del partial["models"]["dpo"]  # as `repro --skip align` leaves it
    row = next(l for l in seeds_table([a, _write(tmp_path, "s1", partial)]).splitlines() if l.startswith("| dpo |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "– / –" and cells[3] == cells[1]  # the mean is the one run that has it


@pytest.mark.parametrize("change, words", [
    ({"preset": "micro"}, "preset"),
    ({"primary_domain": "finance"}, "knowledge domains"),
    (None, "safety sets"),  # a mean over a run on two sets and a run on one means nothing either
    ({"testbed_code": "0123456789abcdef"}, "testbed recipe"),  # a testbed trained by other code or libraries
])
def test_runs_of_different_studies_are_refused(tmp_path, full, change, words):
    full["meta"]["testbed_code"] = "fedcba9876543210"
    a = _write(tmp_path, "s0", full)
    other = json.loads(json.dumps(full))
    other["meta"].update(seed=1, **(change or {}))
    if change is None:
        for m in other["models"].values():
            m["safety"].pop("advbench_like")
    with pytest.raises(ResultsError, match=f"differs from .* in {words}"):
        seeds_table([a, _write(tmp_path, "s1", other)])


def test_a_run_from_before_the_recipe_was_recorded_is_not_refused_for_it(tmp_path, full):
    newer = json.loads(json.dumps(full))
    newer["meta"].update(seed=1, testbed_code="fedcba9876543210")
    assert "testbed_code" not in full["meta"]
    assert "| model | seed 0 | seed 1 | mean |" in seeds_table([_write(tmp_path, "s0", full),
                                                                _write(tmp_path, "s1", newer)]).splitlines()


def test_two_runs_of_one_seed_get_distinct_labels(tmp_path, full):
    text = seeds_table([_write(tmp_path, "a", full), _write(tmp_path, "b", full)])
    assert "| model | seed 0 (a) | seed 0 (b) | mean |" in text.splitlines()


def test_runs_given_as_results_files_are_named_by_their_folder(tmp_path, full):
    text = seeds_table([_write(tmp_path, "a", full) / "results.json", _write(tmp_path, "b", full) / "results.json"])
    assert "| model | seed 0 (a) | seed 0 (b) | mean |" in text.splitlines()


def test_a_copied_results_file_is_named_by_its_own_name(tmp_path, full, monkeypatch):
    """Review: `seeds s1 s1copy.json` labelled the copy 'seed 0 ()', by the name of a folder it does not lie in."""
    _write(tmp_path, "s1", full)
    (tmp_path / "s1copy.json").write_text(json.dumps(full))
    monkeypatch.chdir(tmp_path)
    assert "| model | seed 0 (s1) | seed 0 (s1copy.json) | mean |" in seeds_table(["s1", "s1copy.json"]).splitlines()


def test_one_run_given_twice_is_refused(tmp_path, full):
    """Its folder and its results.json are one run: it would count twice in every mean."""
    a = _write(tmp_path, "s0", full)
    with pytest.raises(ResultsError, match="the same run as .*s0.*; give each run once"):
        seeds_table([a, a / "results.json"])
    with pytest.raises(ResultsError, match="the same run as"):
        seeds_table([a, tmp_path / "." / "s0"])
