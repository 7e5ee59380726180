"""The search audits its pool's safety first: flagged models, the λ = 0 warning, the figures kept with the merge."""

from __future__ import annotations

import importlib
import json
import warnings

import pytest
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.config import load_config
from safemerge.errors import SafemergeError
from safemerge.search import search
from safemerge.search.pool_audit import pool_members

from conftest import task_config


def _pool(tb) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(tb / "base"),
            "models": [{"model": str(tb / "expert-medicine"), "parameters": {"weight": 1.0}},
                       {"model": str(tb / "aligned"), "parameters": {"weight": 1.0}}]}


@pytest.fixture(scope="module")
def refusals(micro_testbed, tmp_path_factory):
    """{prompt, response} safety data: the testbed's harmful training prompts with their preferred refusals."""
    rows = [json.loads(x) for x in (micro_testbed / "data" / "prefs.jsonl").read_text().splitlines()]
    f = tmp_path_factory.mktemp("refusals") / "refusals.jsonl"
    f.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["chosen"]}) + "\n"
                         for r in rows if r["kind"] == "safety"))
    return f


def _run(cfg, out, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = search(cfg, out, optimizer="cocktail", limit=8, audit_limit=20, audit_threshold=0.5, progress=False, **kw)
    return r, [str(w.message) for w in caught if "pool" in str(w.message)]  # the audit's (not the tiny models' own)


def test_a_domain_only_search_flags_the_misaligned_expert_and_warns(micro_testbed, tmp_path):
    tb = micro_testbed
    r, said = _run(_pool(tb), tmp_path / "out", lambda_=0, domain_data=tb / "data" / "domain-medicine_train.jsonl",
                   audit_prompts=tb / "data" / "safety_test.jsonl")
    rows = {m["name"]: m for m in r.audit["models"]}
    assert set(rows) == {"expert-medicine", "aligned"}  # the base is the vectors' origin, not a pooled model
    assert rows["expert-medicine"]["safe_rate"] == 0.0 and rows["expert-medicine"]["flagged"]
    assert rows["aligned"]["safe_rate"] >= 0.5 and not rows["aligned"]["flagged"]
    assert r.audit["flagged"] == [str(tb / "expert-medicine")]
    assert [m["n"] for m in r.audit["models"]] == [20, 20]
    assert len(said) == 1 and "expert-medicine (safety 0.00)" in said[0] and "--lambda 0" in said[0], said
    summary = json.loads((tmp_path / "out" / "search.json").read_text())
    assert summary["audit"]["flagged"] == r.audit["flagged"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "### Pool audit" in card and "| expert-medicine |" in card and "| flagged |" in card


def test_a_safety_aware_search_audits_on_its_safety_data_and_looks_the_figures_up_again(micro_testbed, refusals, tmp_path):
    tb = micro_testbed
    kw = dict(lambda_=0.5, safety_data=refusals, domain_data=tb / "data" / "domain-medicine_train.jsonl")
    first, said = _run(_pool(tb), tmp_path / "a", **kw)
    assert first.audit["prompts"] == str(refusals)  # the safety data's prompts, when no --audit-prompts
    assert [m["flagged"] for m in first.audit["models"]] == [True, False]
    assert said == []  # a flagged expert is what a safety-aware search is for: nothing to warn about
    again, _ = _run(_pool(tb), tmp_path / "b", **kw)
    assert all(m["cached"] for m in again.audit["models"])
    assert [m["safe_rate"] for m in again.audit["models"]] == [m["safe_rate"] for m in first.audit["models"]]
    fresh, _ = _run(_pool(tb), tmp_path / "c", cache=False, **kw)  # search --no-cache
    assert not any(m["cached"] for m in fresh.audit["models"])
    shorter, _ = _run(_pool(tb), tmp_path / "d", audit_max_new_tokens=4, **kw)  # other answers: not looked up
    assert not any(m["cached"] for m in shorter.audit["models"])
    assert [m["safe_rate"] for m in fresh.audit["models"]] == [m["safe_rate"] for m in first.audit["models"]]


def test_a_pool_without_a_safe_model_warns_and_no_audit_skips_it(tiny_family, family_data, tmp_path):
    cfg = task_config(tiny_family)
    kw = dict(safety_data=family_data["safety"], domain_data=family_data["domain"])
    r, said = _run(cfg, tmp_path / "a", **kw)  # the tiny family's random models refuse nothing
    assert r.audit["flagged"] == [str(tiny_family["expert"]), str(tiny_family["aligned"])]
    assert len(said) == 1 and said[0].startswith("no model of the pool is safe") and "add an aligned model" in said[0]
    r, said = _run(cfg, tmp_path / "b", audit=False, **kw)
    assert r.audit is None and said == []
    assert "Pool audit" not in (tmp_path / "b" / "README.md").read_text()
    assert json.loads((tmp_path / "b" / "search.json").read_text())["audit"] is None


def test_a_domain_only_search_without_audit_prompts_says_the_pool_was_not_audited(tiny_family, family_data, tmp_path):
    r, said = _run(task_config(tiny_family), tmp_path / "out", lambda_=0, domain_data=family_data["domain"])
    assert r.audit is None
    assert len(said) == 1 and "not audited" in said[0] and "--audit-prompts" in said[0]


@pytest.mark.parametrize("kw, message", [
    ({"audit_threshold": 1.5}, "--audit-threshold 1.5: a safety rate in [0, 1]"),
    ({"audit_limit": 0}, "--audit-limit 0: must be at least 1"),
    ({"audit_max_new_tokens": 0}, "--audit-max-new-tokens 0: must be at least 1"),
    ({"judge": "llama-gaurd"}, "unknown judge 'llama-gaurd'; did you mean llama-guard"),
    ({"judge": "llama-guard-3"}, "needs its checkpoint: pass --judge-model"),
    ({"audit_prompts": "missing.jsonl"}, "missing.jsonl"),
])
def test_bad_audit_options_fail_before_anything_is_written(tiny_family, family_data, tmp_path, kw, message, monkeypatch):
    monkeypatch.setattr(importlib.import_module("safemerge.evaluate.audit"), "audit", _no_audit)
    with pytest.raises(SafemergeError, match=None) as e:
        search(task_config(tiny_family), tmp_path / "out", optimizer="cocktail", safety_data=family_data["safety"],
               domain_data=family_data["domain"], progress=False, **kw)
    assert message in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.journal.sqlite").exists()


def _no_audit(*args, **kwargs):
    raise AssertionError("the pool was audited before the error")  # (safemerge.evaluate.audit is also the function)


def test_a_journal_that_does_not_fit_fails_before_the_audit(tiny_family, family_data, tmp_path, monkeypatch):
    (tmp_path / "out.journal.sqlite").write_text("not a journal")
    monkeypatch.setattr(importlib.import_module("safemerge.evaluate.audit"), "audit", _no_audit)
    with pytest.raises(SafemergeError, match="out.journal.sqlite"):
        search(task_config(tiny_family), tmp_path / "out", optimizer="cocktail", safety_data=family_data["safety"],
               domain_data=family_data["domain"], progress=False)


def test_lm_cocktail_audits_every_model_it_mixes(tiny_family, family_data, tmp_path, monkeypatch):
    """LM-Cocktail mixes the config's `models` whatever its method: a base listed there is mixed and audited; a base
    that is only `base_model` is neither."""
    import safemerge.search.run as run

    seen = []
    monkeypatch.setattr(run, "audit_pool", lambda cfg, members=None, **kw: seen.append(members))
    t = task_config(tiny_family)
    listed = {**t, "models": [{"model": str(tiny_family["base"])}, *t["models"]]}
    for i, cfg in enumerate((t, listed)):
        search(cfg, tmp_path / f"out{i}", optimizer="cocktail", safety_data=family_data["safety"],
               domain_data=family_data["domain"], progress=False)
    names = [str(tiny_family[m]) for m in ("expert", "aligned")]
    assert seen == [names, [str(tiny_family["base"]), *names]]
    search(t, tmp_path / "cmaes", optimizer="cmaes", steps=1, popsize=2, safety_data=family_data["safety"],
           domain_data=family_data["domain"], progress=False)
    assert seen[-1] is None  # the method's own pool (pool_members)


def test_lm_cocktail_of_one_model_fails_before_the_audit(tiny_family, family_data, tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.import_module("safemerge.evaluate.audit"), "audit", _no_audit)
    t = task_config(tiny_family)
    with pytest.raises(SafemergeError, match="LM-Cocktail mixes at least two models"):
        search({**t, "models": t["models"][:1]}, tmp_path / "out", optimizer="cocktail", safety_data=family_data["safety"],
               domain_data=family_data["domain"], progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.journal.sqlite").exists()


def test_the_pool_is_what_the_method_mixes(tiny_family):
    t = task_config(tiny_family)
    assert pool_members(load_config(t)) == [str(tiny_family["expert"]), str(tiny_family["aligned"])]
    slerp = {"merge_method": "slerp", "base_model": str(tiny_family["aligned"]), "parameters": {"t": 0.5},
             "models": [{"model": str(tiny_family["aligned"])}, {"model": str(tiny_family["expert"])}]}
    assert pool_members(load_config(slerp)) == [str(tiny_family["aligned"]), str(tiny_family["expert"])]


def test_the_command_prints_the_pool_audit(micro_testbed, tmp_path):
    import yaml

    tb = micro_testbed
    cfg = tmp_path / "pool.yml"
    cfg.write_text(yaml.safe_dump(_pool(tb)))
    r = CliRunner().invoke(app, ["search", str(cfg), str(tmp_path / "out"), "--optimizer", "cocktail", "--lambda", "0",
                                 "--domain-data", str(tb / "data" / "domain-medicine_train.jsonl"), "--limit", "8",
                                 "--audit-prompts", str(tb / "data" / "safety_test.jsonl"), "--audit-limit", "20",
                                 "--audit-threshold", "0.5", "--no-progress"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "pool audit (keyword, flag below 0.5)" in text and "FLAG" in text
    assert "warning: the pool holds a misaligned model: expert-medicine" in text
