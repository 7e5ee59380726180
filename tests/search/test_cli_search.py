"""`safemerge search`: the command runs a search and prints JSON; bad input exits 2 with one clear line."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from safemerge.cli import app

from conftest import task_config

runner = CliRunner()


@pytest.fixture
def config_file(tmp_path, tiny_family):
    f = tmp_path / "pool.yml"
    f.write_text(yaml.safe_dump(task_config(tiny_family)))
    return f


def _search(config_file, out, data, *extra):
    return runner.invoke(app, ["search", str(config_file), str(out), "--safety-data", str(data["safety"]),
                               "--domain-data", str(data["domain"]), "--no-progress", *extra])


def test_search_command_writes_the_best_merge(config_file, family_data, tmp_path):
    r = _search(config_file, tmp_path / "out", family_data, "--optimizer", "cocktail", "--lambda", "0.3", "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["optimizer"] == "cocktail" and got["lambda"] == 0.3 and got["candidates"] == 3
    assert (tmp_path / "out" / "mergekit_config.yml").is_file() and (tmp_path / "out.journal.sqlite").is_file()
    assert sum(got["best"]["params"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize("extra, message", [
    (["--lambda", "1.5"], "must be in [0, 1]"),
    (["--optimizer", "bayes"], "choose one of cmaes, cocktail, grid"),
    (["--popsize", "1"], "--popsize 1: must be at least 2"),
    (["--popsize", "0"], "--popsize 0: must be at least 2"),
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--sigma0", "0"], "--sigma0 0.0: must be a positive number"),
    (["--seed", "-1"], "--seed -1: must be at least 0"),  # was numpy's error, after the pool audit
    (["--optimizer", "cocktail", "--temperature", "0"], "--temperature 0.0: must be a positive number"),
    (["--device", "tpu"], "device 'tpu': merging computes on cpu or cuda"),
    (["--memo-gib", "-1"], "--memo-gib -1.0: a size in GiB from 0 (no memo) to 1048576"),
    (["--memo-gib", "nan"], "--memo-gib nan: a size in GiB from 0 (no memo) to 1048576"),
    (["--memo-gib", "1e308"], "--memo-gib 1e+308: a size in GiB from 0 (no memo) to 1048576"),
])
def test_bad_options_exit_2(config_file, family_data, tmp_path, extra, message):
    r = _search(config_file, tmp_path / "out", family_data, *extra)
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.journal.sqlite").exists()


def test_memo_gib_sets_the_scorers_memo_and_not_the_result(config_file, family_data, tmp_path, monkeypatch):
    """--memo-gib reaches the scorer's ScorerSpec (None when not given: the device's default); the memo only makes
    TIES / DARE candidates faster, so a journal written with one size resumes with another."""
    import safemerge.search.run as run

    seen = []
    real = run._LazyScorer.__init__

    def spy(self, spec, **kw):
        seen.append(spec.trim_memo_bytes)
        real(self, spec, **kw)

    monkeypatch.setattr(run._LazyScorer, "__init__", spy)
    r = _search(config_file, tmp_path / "out", family_data, "--optimizer", "cocktail", "--memo-gib", "0.5")
    assert r.exit_code == 0, r.output
    r = _search(config_file, tmp_path / "out", family_data, "--optimizer", "cocktail", "--resume", "--overwrite")
    assert r.exit_code == 0, r.output
    assert seen == [2**29, None]


def test_the_output_and_journal_stay_apart_from_the_pool(tiny_family, family_data, tmp_path):
    import shutil

    fam = {k: shutil.copytree(v, tmp_path / "pool" / k) for k, v in tiny_family.items() if k in ("base", "expert", "aligned")}
    cfg = tmp_path / "pool.yml"
    cfg.write_text(yaml.safe_dump(task_config(fam)))
    before = (fam["aligned"] / "model.safetensors").read_bytes()
    r = _search(cfg, fam["aligned"], family_data, "--overwrite", "--optimizer", "cocktail")
    assert r.exit_code == 2 and "the output is the input model" in " ".join(r.output.split()), r.output
    assert (fam["aligned"] / "model.safetensors").read_bytes() == before
    r = _search(cfg, tmp_path / "out", family_data, "--journal", str(fam["expert"] / "j.sqlite"))
    assert r.exit_code == 2 and "the journal is inside the input model" in " ".join(r.output.split()), r.output
    r = _search(cfg, tmp_path / "out", family_data, "--journal", str(tmp_path / "out" / "j.sqlite"))
    assert r.exit_code == 2 and "the journal would lie in the output" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overwrite", [True, False])
@pytest.mark.parametrize("what, message", [
    ("file", "is a file, and the output is a folder"),
    ("work", "holds other files (notes.txt)"),
    ("under a file", "is a file, so nothing can be written under it"),
])
def test_an_output_path_that_cannot_be_written_fails_before_the_search(config_file, family_data, tmp_path, what,
                                                                      message, overwrite, monkeypatch):
    """Not after hours of scoring: what stands at OUT is checked first, and nothing is scored or journaled."""
    import safemerge.search.run as run

    monkeypatch.setattr(run, "_optimize", lambda *a, **k: pytest.fail("the search ran before OUT was checked"))
    out = tmp_path / "out"
    if what == "work":
        out.mkdir()
        (out / "notes.txt").write_text("my notes")
    else:
        out.write_text("my notes")
    target = out / "sub" if what == "under a file" else out
    r = _search(config_file, target, family_data, *(["--overwrite"] if overwrite else []), "--optimizer", "cocktail")
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output  # without --overwrite: not its advice
    assert (out / "notes.txt" if what == "work" else out).read_text() == "my notes"
    assert not list(tmp_path.glob("*.journal.sqlite")) and not list(out.parent.glob(".out.partial-*"))


def test_overwrite_never_deletes_a_data_file_kept_in_the_output(config_file, family_data, tmp_path):
    import shutil

    r = _search(config_file, tmp_path / "out", family_data, "--optimizer", "cocktail")
    assert r.exit_code == 0, r.output
    kept = shutil.copy(family_data["safety"], tmp_path / "out" / "safety.jsonl")
    r = _search(config_file, tmp_path / "out", {**family_data, "safety": kept}, "--optimizer", "cocktail", "--overwrite")
    assert r.exit_code == 2 and "the output contains the input file" in " ".join(r.output.split()), r.output
    assert (tmp_path / "out" / "safety.jsonl").read_bytes() == family_data["safety"].read_bytes()
    r = _search(tmp_path / "out" / "mergekit_config.yml", tmp_path / "out", family_data, "--optimizer", "cocktail",
                "--overwrite")  # the earlier output's own config: replaced at the end, so the start would be lost
    assert r.exit_code == 2 and "the output contains the input file" in " ".join(r.output.split()), r.output
    assert "move the input file out of it, or write it to another folder" in " ".join(r.output.split())


def test_a_broken_file_the_best_merge_copies_fails_before_the_search(tiny_family, family_data, tmp_path, monkeypatch):
    """The best merge copies the tokenizer source's generation_config.json at the end: checked before any scoring."""
    import shutil

    import safemerge.search.run as run

    monkeypatch.setattr(run, "_optimize", lambda *a, **k: pytest.fail("the search ran before the check"))
    tok = shutil.copytree(tiny_family["aligned"], tmp_path / "tok")
    (tok / "generation_config.json").write_text("{not json")
    cfg = tmp_path / "pool.yml"
    cfg.write_text(yaml.safe_dump({**task_config(tiny_family), "tokenizer_source": str(tok)}))
    r = _search(cfg, tmp_path / "out", family_data, "--optimizer", "cocktail")
    assert r.exit_code == 2 and "tok/generation_config.json: is not valid JSON" in " ".join(r.output.split()), r.output


@pytest.mark.parametrize("kind", ["text", "dir", "another database"])
def test_a_journal_path_that_is_not_a_journal_is_left_alone(config_file, family_data, tmp_path, kind):
    import sqlite3

    j = tmp_path / "j"
    if kind == "dir":
        j.mkdir()
    elif kind == "text":
        j.write_text('{"prompt": "precious data"}\n')
    else:  # an SQLite file of another program's: --resume must not add tables to it, nor --overwrite delete it
        with sqlite3.connect(j) as db:
            db.execute("CREATE TABLE users (id INTEGER, name TEXT)")
            db.execute("INSERT INTO users VALUES (1, 'ada')")
        db.close()
    before = None if kind == "dir" else j.read_bytes()
    for extra in (["--overwrite"], ["--resume"], []):
        r = _search(config_file, tmp_path / "out", family_data, "--journal", str(j), *extra)
        assert r.exit_code == 2 and ("is a directory" if kind == "dir" else "is not a search journal") in r.output, r.output
    assert j.is_dir() if kind == "dir" else j.read_bytes() == before


def test_a_failed_search_that_scored_nothing_leaves_no_journal(config_file, family_data, tmp_path, monkeypatch):
    """Else the corrected rerun would be told to pass --resume or --overwrite for a journal of nothing."""
    import safemerge.search.run as run

    def boom(*a, **k):
        raise RuntimeError("the scorer failed")

    monkeypatch.setattr(run, "_optimize", boom)
    r = _search(config_file, tmp_path / "out", family_data, "--optimizer", "cocktail")
    assert r.exit_code != 0 and isinstance(r.exception, RuntimeError)
    assert not list(tmp_path.glob("out.journal.sqlite*"))
    monkeypatch.undo()
    r = _search(config_file, tmp_path / "out", family_data, "--optimizer", "cocktail")
    assert r.exit_code == 0, r.output


def test_data_without_response_field_exits_2(config_file, family_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "answer": "y"}) + "\n")
    r = _search(config_file, tmp_path / "out", {**family_data, "domain": bad})
    assert r.exit_code == 2 and "bad.jsonl: line 1 has no text 'response' field" in " ".join(r.output.split()), r.output


def test_pool_of_different_architectures_exits_2(tiny_family, family_data, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tiny import make_family

    other = make_family(tmp_path / "other", names=("deeper",), layers=4)["deeper"]
    cfg = tmp_path / "mixed.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(tiny_family["base"]),
                                   "models": [{"model": str(tiny_family["expert"]), "parameters": {"weight": 1}},
                                              {"model": str(other), "parameters": {"weight": 1}}]}))
    r = _search(cfg, tmp_path / "out", family_data)
    assert r.exit_code == 2 and "differs in architecture" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "out.journal.sqlite").exists()  # refused before any journal or model
