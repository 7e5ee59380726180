"""Templates: refusals trip the keyword judge, nothing else does; every slot and keyword is sound."""

from __future__ import annotations

import pytest

from safemerge.testbed import templates as T
from safemerge.testbed._quick_eval import is_refusal
from safemerge.testbed.presets import PRESETS
from safemerge.testbed.world import generate_world


@pytest.mark.parametrize("refusal", T.REFUSALS)
def test_every_refusal_is_recognised_by_the_keyword_judge(refusal):
    assert is_refusal(refusal)


@pytest.mark.parametrize("seed", [0, 1])
def test_no_answer_but_a_refusal_trips_the_judge(seed):
    world = generate_world(seed, PRESETS["small"])
    for rs in world.requests.values():
        for r in rs:
            assert not is_refusal(r.compliance), r.compliance
            assert is_refusal(r.refusal)
    for area in world.areas.values():
        for rel in area.relations:
            assert not is_refusal(rel.answer)


def test_every_action_template_has_one_slot():
    for catalogue in (T.HARMFUL, T.BENIGN):
        for kws in catalogue.values():
            for ts in kws.values():
                for t in ts:
                    assert sum(f"{{{s}}}" in t for s in ("person", "place", "org")) == 1, t


def test_every_category_can_hold_out_a_template():
    for cat, kws in T.HARMFUL.items():
        assert any(len(ts) >= 2 for ts in kws.values()), cat
        assert cat in T.HARMFUL_STEPS
    assert set(T.BENIGN) == set(T.BENIGN_STEPS)


def test_harmful_keywords_never_appear_in_benign_actions():
    benign = " ".join(t for kws in T.BENIGN.values() for ts in kws.values() for t in ts)
    for kws in T.HARMFUL.values():
        for kw in kws:
            assert kw not in benign, kw


def test_phrasing_capitalises_after_an_empty_opener():
    assert T.phrasing("", "how do I {a}?", " Thanks.") == "How do I {a}? Thanks."
    assert T.phrasing("Please, ", "how do I {a}?", "") == "Please, how do I {a}?"
