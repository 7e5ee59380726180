"""`safemerge repro`'s arguments and its per-model cache (the whole run is the demo, too long for a test)."""

from __future__ import annotations

import json

import pytest

from safemerge.errors import ConfigError, OutputExistsError
from safemerge.repro import Repro, repro
from safemerge.testbed.build import ordered_domains


def test_domains_keep_their_order_once_each():
    assert ordered_domains("finance, medicine,finance") == ("finance", "medicine")
    assert ordered_domains(["medicine", "medicine"]) == ("medicine",)
    with pytest.raises(ConfigError, match="domain"):
        ordered_domains(" , ")
    with pytest.raises(ConfigError, match="'law' is unknown"):
        ordered_domains(["medicine", "law"])


@pytest.mark.parametrize("kwargs, error, message", [
    ({"skip": ["serach"]}, ConfigError, "--skip serach: the stages that can be skipped are search, align"),
    ({"domains": ","}, ConfigError, "at least one domain"),
    ({"preset": "huge"}, ConfigError, "preset 'huge' is unknown"),
    ({"skip": "serach"}, ConfigError, "--skip serach: the stages"),  # one name, not its letters
    ({"seed": "0"}, ConfigError, "seed='0': give a whole number"),
])
def test_bad_arguments_fail_before_anything_is_written(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        repro(out=tmp_path / "run", progress=False, **kwargs)
    assert not (tmp_path / "run").exists()


def test_an_output_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        repro(out=tmp_path / "f", progress=False)
    with pytest.raises(OutputExistsError, match="is a file, so nothing can be written under it"):
        repro(out=tmp_path / "f" / "run", progress=False)


def test_a_model_is_made_again_when_the_primary_domain_changes(tmp_path):
    """Single-expert models come from the first domain's expert: its order is part of each model's key."""
    testbed = tmp_path / "testbed"
    testbed.mkdir()
    (testbed / "world.json").write_text(json.dumps({"key": "k"}))
    built = []

    def build(path):
        built.append(path)
        path.mkdir(parents=True, exist_ok=True)

    for domains in (("medicine", "finance"), ("medicine", "finance"), ("finance", "medicine")):
        r = Repro(out=tmp_path, testbed=testbed, domains=domains, budget={}, seed=0, progress=False, store=tmp_path / "s")
        r.make("mergealign", "mergealign", {"alpha": 1, "beta": 1}, build)
    assert len(built) == 2  # reused once, made again for the other primary domain


def test_a_model_is_made_again_when_safemerge_changes(tmp_path, monkeypatch):
    """Left alone before: a run resumed after an upgrade (or an edit) reused the models older code had made."""
    import safemerge.repro as rp

    digest = rp.code_digest.__wrapped__
    assert digest() == digest() and len(digest()) == 16  # stable from call to call
    testbed = tmp_path / "testbed"
    testbed.mkdir()
    (testbed / "world.json").write_text(json.dumps({"key": "k"}))
    built = []
    for code in ("old", "old", "new"):
        monkeypatch.setattr(rp, "code_digest", lambda c=code: c)
        r = Repro(out=tmp_path, testbed=testbed, domains=("medicine",), budget={}, seed=0, progress=False,
                  store=tmp_path / "s")
        r.make("mergealign", "mergealign", {"alpha": 1, "beta": 1}, lambda p: (built.append(p), p.mkdir(exist_ok=True, parents=True)))
    assert len(built) == 2
