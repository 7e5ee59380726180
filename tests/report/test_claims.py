"""Claims: PASS, FAIL and SKIPPED on hand-made results; what is compared with what."""

from __future__ import annotations

import re

import pytest

from safemerge.report import ResultsError, check_claims, load_results
from safemerge.report.results import map_domains

IDS = ["mergealign-safety", "mergealign-knowledge", "mergealign-vs-slerp", "evomm-safety-aware",
       "mergealign-vs-dpo", "mergealign-vs-orpo"]


def verdicts(results) -> dict[str, str]:
    return {c.id: c.verdict for c in check_claims(results)}


def by_id(results) -> dict:
    return {c.id: c for c in check_claims(results)}


def test_all_pass_with_their_figures(full):
    claims = by_id(full)
    assert list(claims) == IDS
    assert {c.verdict for c in claims.values()} == {"PASS"}
    safety = claims["mergealign-safety"].figures      # mean of safety_test and advbench_like
    assert safety["mergealign"] == pytest.approx(0.91) and safety["aligned"] == pytest.approx(0.96)
    know = claims["mergealign-knowledge"].figures     # each domain on its own expert's task
    assert know["mergealign"] == pytest.approx((0.78 + 0.72) / 2)
    assert know["experts"] == pytest.approx((0.80 + 0.76) / 2)
    assert "medicine: 78.0% vs expert-medicine 80.0%" in claims["mergealign-knowledge"].detail


def set_safety(results, name, rate):
    results["models"][name]["safety"] = {"safety_test": rate}


def test_safety_retention_fails_below_the_ratio_and_passes_at_it(full):
    set_safety(full, "aligned", 1.0)
    set_safety(full, "mergealign", 0.89)
    claim = by_id(full)["mergealign-safety"]
    assert claim.verdict == "FAIL" and "89.0% < 0.9 × aligned 100.0% = 90.0%" in claim.detail
    set_safety(full, "mergealign", 0.9)
    assert verdicts(full)["mergealign-safety"] == "PASS"


def test_knowledge_retention_fails(full):
    full["models"]["mergealign"]["domain"] = {"domain-medicine_test": 0.5, "domain-finance_test": 0.5}
    claim = by_id(full)["mergealign-knowledge"]
    assert claim.verdict == "FAIL"
    assert claim.figures["mergealign"] == pytest.approx(0.5)


def test_strictly_above_so_a_tie_fails(full):
    set_safety(full, "evomm-safe", 0.4)
    set_safety(full, "evomm-unsafe", 0.4)
    set_safety(full, "slerp-gradient", 0.99)
    v = verdicts(full)
    assert v["evomm-safety-aware"] == "FAIL"
    assert v["mergealign-vs-slerp"] == "FAIL"


def test_dominated_by_dpo_fails_and_a_trade_off_passes(full):
    m = full["models"]
    m["dpo"]["safety"] = dict(m["mergealign"]["safety"])              # same safety, more knowledge
    m["dpo"]["domain"] = {k: v + 0.01 for k, v in m["mergealign"]["domain"].items()}
    m["orpo"]["safety"] = {k: min(1.0, v + 0.05) for k, v in m["mergealign"]["safety"].items()}
    m["orpo"]["domain"] = {k: v - 0.01 for k, v in m["mergealign"]["domain"].items()}  # safer, knows less
    claims = by_id(full)
    assert claims["mergealign-vs-dpo"].verdict == "FAIL" and "dominated" in claims["mergealign-vs-dpo"].detail
    assert claims["mergealign-vs-orpo"].verdict == "PASS"


def test_every_dpo_model_is_compared(full):
    m = full["models"]
    m["dpo-sft"] = {**m["dpo"], "params": {"sft_weight": 1.0}}
    assert verdicts(full)["mergealign-vs-dpo"] == "PASS"
    m["dpo-sft"]["safety"] = {k: min(1.0, v + 0.05) for k, v in m["mergealign"]["safety"].items()}
    m["dpo-sft"]["domain"] = dict(m["mergealign"]["domain"])                 # the variant dominates, plain DPO not
    claim = by_id(full)["mergealign-vs-dpo"]
    assert claim.verdict == "FAIL" and "dpo (" in claim.detail and "dpo-sft (" in claim.detail
    assert {"dpo_safety", "dpo-sft_safety"} <= set(claim.figures)


def test_dpo_models_without_one_called_dpo_are_all_compared(full):
    m = full["models"]
    m["dpo-lr1"] = {**m.pop("dpo")}
    m["dpo-lr2"] = {**m["dpo-lr1"], "safety": {k: min(1.0, v + 0.05) for k, v in m["mergealign"]["safety"].items()},
                    "domain": dict(m["mergealign"]["domain"])}  # dominates MergeAlign
    claim = by_id(full)["mergealign-vs-dpo"]
    assert claim.verdict == "FAIL" and "dpo-lr1 (" in claim.detail and "dpo-lr2 (" in claim.detail


def test_an_equal_point_is_not_dominated(full):
    m = full["models"]
    m["dpo"]["safety"], m["dpo"]["domain"] = dict(m["mergealign"]["safety"]), dict(m["mergealign"]["domain"])
    assert verdicts(full)["mergealign-vs-dpo"] == "PASS"


@pytest.mark.parametrize("missing, skipped", [
    ("slerp-gradient", {"mergealign-vs-slerp"}),
    ("evomm-unsafe", {"evomm-safety-aware"}),
    ("orpo", {"mergealign-vs-orpo"}),
    ("aligned", {"mergealign-safety"}),
    ("mergealign", {"mergealign-safety", "mergealign-knowledge", "mergealign-vs-slerp", "mergealign-vs-dpo",
                    "mergealign-vs-orpo"}),
])
def test_missing_models_skip_with_the_reason(full, missing, skipped):
    del full["models"][missing]
    claims = by_id(full)
    assert list(claims) == IDS                          # never silently dropped
    assert {i for i, c in claims.items() if c.verdict == "SKIPPED"} == skipped
    for i in skipped:
        assert missing in claims[i].detail


def test_no_models_at_all_skips_every_claim():
    claims = check_claims({"models": {}})
    assert [c.id for c in claims] == IDS and {c.verdict for c in claims} == {"SKIPPED"}


def test_only_shared_safety_sets_are_compared(full):
    full["models"]["mergealign"]["safety"] = {"safety_test": 0.5}
    full["models"]["aligned"]["safety"] = {"safety_test": 0.5, "advbench_like": 1.0}
    claim = by_id(full)["mergealign-safety"]
    assert claim.verdict == "PASS" and claim.figures["aligned"] == 0.5
    full["models"]["aligned"]["safety"] = {"advbench_like": 1.0}
    claim = by_id(full)["mergealign-safety"]
    assert claim.verdict == "SKIPPED" and "share no safety set" in claim.detail


def test_knowledge_uses_the_domains_that_have_an_expert(full):
    del full["models"]["expert-finance"]
    claim = by_id(full)["mergealign-knowledge"]
    assert claim.verdict == "PASS"
    assert claim.figures["experts"] == pytest.approx(0.80) and claim.figures["mergealign"] == pytest.approx(0.78)
    assert "expert-finance" in claim.detail


def test_models_found_by_method_and_params_when_not_by_name(full):
    m = full["models"]
    m["my-merge"] = m.pop("mergealign")
    del m["mergealign-a1-b0.5"], m["mergealign-a0.5-b1"]
    m["aware"], m["unaware"] = m.pop("evomm-safe"), m.pop("evomm-unsafe")   # told apart by λ
    assert {c.verdict for c in check_claims(full)} == {"PASS"}


def test_ambiguous_candidates_skip_naming_them(full):
    m = full["models"]
    m["ma-x"] = m.pop("mergealign")
    m["ma-y"] = dict(m["ma-x"])
    claim = by_id(full)["mergealign-safety"]
    assert claim.verdict == "SKIPPED" and "ma-x" in claim.detail and "ma-y" in claim.detail


def test_tasks_map_to_domains_by_whole_words():
    domains, other = map_domains(["domain-medicine_test", "finance", "biomedicine", "general"],
                                 ["medicine", "finance"])
    assert domains == {"medicine": ["domain-medicine_test"], "finance": ["finance"]}
    assert other == ["biomedicine", "general"]
    assert map_domains(["a", "b"], []) == ({"a": ["a"], "b": ["b"]}, [])


def test_domains_come_from_the_experts_without_meta(full):
    del full["meta"]
    assert list(load_results(full).domains) == ["medicine", "finance"]


@pytest.mark.parametrize("edit, field", [
    (lambda r: r["models"]["aligned"]["safety"].update(safety_test=95), "models.aligned.safety.safety_test"),
    (lambda r: r["models"]["dpo"].update(general="high"), "models.dpo.general"),
    (lambda r: r["models"].update(orpo=[1, 2]), "models.orpo"),
    (lambda r: r["models"]["base"]["l2"].update(expert=-1.0), "models.base.l2.expert"),
])
def test_invalid_results_name_the_field(full, edit, field):
    edit(full)
    with pytest.raises(ResultsError, match=field.replace(".", r"\.")):
        load_results(full)


def test_non_finite_values_count_as_not_measured(full):
    full["models"]["mergealign"]["safety"] = {"safety_test": float("nan")}
    assert load_results(full).models["mergealign"].safety == {}
    assert by_id(full)["mergealign-safety"].verdict == "SKIPPED"


def test_a_missing_file_says_what_to_pass(tmp_path):
    with pytest.raises(ResultsError, match="no such file"):
        load_results(tmp_path / "results.json")


def repro_shaped(primary: str | None) -> dict:
    """As `safemerge repro` writes it: tasks named by their domain, single-expert merges of the primary one."""
    def m(method, med, fin, safe, **params):
        return {"method": method, "params": params, "safety": {"testbed-harmful": safe},
                "domain": {"medicine": med, "finance": fin}, "general": 0.4}
    meta = {"domains": ["medicine", "finance"]} | ({"primary_domain": primary} if primary else {})
    return {"meta": meta, "models": {
        "aligned": m("aligned", 0.3, 0.3, 0.95), "expert-medicine": m("expert", 0.8, 0.3, 0.1),
        "expert-finance": m("expert", 0.3, 0.8, 0.1), "mergealign": m("mergealign", 0.78, 0.3, 0.9, alpha=1, beta=1)}}


def test_the_primary_domain_is_the_knowledge_domain():
    claim = by_id(repro_shaped("medicine"))["mergealign-knowledge"]
    assert claim.verdict == "PASS" and claim.figures["experts"] == pytest.approx(0.8)
    assert "finance" not in claim.detail
    res = load_results(repro_shaped("medicine"))
    assert res.focus == ["medicine"] and list(res.domains) == ["medicine", "finance"]
    # without it every domain counts, and a medicine-only merge falls short on finance
    claim = by_id(repro_shaped(None))["mergealign-knowledge"]
    assert claim.verdict == "FAIL" and claim.figures["mergealign"] == pytest.approx((0.78 + 0.3) / 2)


def test_an_unknown_primary_domain_is_an_error_not_another_domain():
    """It fell back to every domain, so the knowledge claims judged domains nobody asked about, without a word."""
    with pytest.raises(ResultsError, match=r"meta.primary_domain names 'law', which no task of the results belongs to "
                                           r"\(domains: medicine, finance\)"):
        load_results(repro_shaped("law"))


def test_an_unknown_primary_domain_names_the_run(tmp_path):
    """`seeds` reads several runs: the error says which one."""
    import json

    f = tmp_path / "results.json"
    f.write_text(json.dumps(repro_shaped("law")))
    with pytest.raises(ResultsError, match=rf"^{re.escape(str(f))}: meta.primary_domain names 'law'"):
        load_results(f)


def test_a_domain_mergealign_was_not_measured_on_is_said_not_dropped():
    res = repro_shaped(None)
    res["models"]["mergealign"]["domain"].pop("finance")
    claim = by_id(res)["mergealign-knowledge"]
    assert claim.figures["experts"] == pytest.approx(0.8)  # medicine alone is counted
    assert "not counted: finance (mergealign not measured on it)" in claim.detail


# -- from a bug hunt (2026-11-24): what float noise, uneven measurements and loose names did to verdicts ----------
def test_float_noise_decides_no_threshold_and_no_tie(full):
    set_safety(full, "aligned", 0.8)  # 160 / 200
    set_safety(full, "mergealign", 0.72)  # 144 / 200 = exactly 0.9 × 0.8, though 0.9 * 0.8 = 0.7200000000000001
    assert verdicts(full)["mergealign-safety"] == "PASS"
    full["models"]["evomm-safe"]["safety"] = {"safety_test": 0.6, "advbench_like": 0.2}  # mean 0.4
    full["models"]["evomm-unsafe"]["safety"] = {"safety_test": 0.7, "advbench_like": 0.1}  # mean 0.39999999999999997
    assert verdicts(full)["evomm-safety-aware"] == "FAIL"  # a tie fails


def test_an_equal_point_does_not_dominate(full):
    full["models"]["mergealign"]["domain"] = {"domain-medicine_test": 40 / 60, "domain-finance_test": 40 / 60}
    full["models"]["orpo"]["domain"] = {"domain-medicine_test": 41 / 60, "domain-finance_test": 39 / 60}  # same mean
    full["models"]["orpo"]["safety"] = dict(full["models"]["mergealign"]["safety"])
    assert verdicts(full)["mergealign-vs-orpo"] == "PASS"
    from safemerge.report.figures import pareto_frontier

    assert pareto_frontier([((40 / 60 + 40 / 60) / 2, 0.9), ((41 / 60 + 39 / 60) / 2, 0.9)]) == [0, 1]  # both kept


def test_knowledge_is_compared_on_the_tasks_both_models_have(full):
    """The expert had medicine-easy and medicine-hard, MergeAlign medicine-hard only: each was averaged over its own."""
    full["models"]["expert-medicine"]["domain"]["medicine-easy"] = 1.0
    full["models"]["expert-medicine"]["domain"]["domain-medicine_test"] = 0.5
    full["models"]["mergealign"]["domain"]["domain-medicine_test"] = 0.5
    claim = by_id(full)["mergealign-knowledge"]
    assert claim.figures["mergealign:medicine"] == claim.figures["expert-medicine:medicine"] == 0.5


def test_a_mergealign_without_recorded_alpha_and_beta_is_no_candidate(full):
    for name in ("mergealign", "mergealign-a1-b0.5"):
        del full["models"][name]
    full["models"]["mergealign-a0.5-b1"]["params"] = {}  # compare without a mergekit_config.yml to read them from
    claim = by_id(full)["mergealign-safety"]
    assert claim.verdict == "SKIPPED" and "no model 'mergealign'" in claim.detail


def test_a_misnamed_model_field_is_an_error_not_an_empty_row(full):
    full["models"]["dpo"]["safety_rate"] = full["models"]["dpo"].pop("safety")
    with pytest.raises(ResultsError, match=r"models.dpo: unknown field\(s\) 'safety_rate'; a model entry has method"):
        load_results(full)


def test_a_task_named_as_a_domain_is_that_domains():
    """compare names a task's domain by the task itself where nothing else does: 'mmlu-medicine-hard' beside a
    'medicine' task is its own domain there, and the report put it under medicine."""
    domains, other = map_domains(["medqa", "mmlu-medicine-hard"], ["medicine", "mmlu-medicine-hard"])
    assert domains == {"mmlu-medicine-hard": ["mmlu-medicine-hard"]} and other == ["medqa"]
