"""The results store: keys, round trips, the fingerprint cache, and concurrent writers."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

from safemerge.store import ResultsStore, default_store_path, result_key


def test_key_is_canonical_and_discriminating():
    k = result_key("safety", model="m", data="d", judge="j", settings={"a": 1, "b": 2})
    assert k == result_key("safety", model="m", data="d", judge="j", settings={"b": 2, "a": 1})
    assert k != result_key("safety", model="m", data="d", judge="j", settings={"a": 1, "b": 3})
    assert k != result_key("domain", model="m", data="d", judge="j", settings={"a": 1, "b": 2})


def test_round_trip_and_artifact(store):
    key = result_key("safety", model="m", data="d")
    assert store.get(key) is None
    store.put(key, {"safe_rate": 0.75}, kind="safety", model="m", data="d", artifact=b"line\n" * 1000)
    assert store.get(key) == {"safe_rate": 0.75}
    assert store.artifact(key) == b"line\n" * 1000
    store.put(key, {"safe_rate": 0.5}, kind="safety", model="m", data="d")  # replace
    assert store.get(key) == {"safe_rate": 0.5} and store.artifact(key) is None
    assert [r["result"] for r in store.rows(kind="safety", model="m")] == [{"safe_rate": 0.5}]


def test_default_place(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFEMERGE_HOME", str(tmp_path / "home"))
    assert default_store_path() == tmp_path / "home" / "results.sqlite"
    monkeypatch.delenv("SAFEMERGE_HOME")
    monkeypatch.chdir(tmp_path)
    assert default_store_path() == tmp_path / ".safemerge" / "results.sqlite"


def test_fingerprint_is_remembered(store, chat_model, monkeypatch):
    from safemerge.checkpoint import Checkpoint

    calls = []
    real = Checkpoint.fingerprint
    monkeypatch.setattr(Checkpoint, "fingerprint", lambda self: calls.append(1) or real(self))
    first = store.fingerprint(chat_model)
    assert store.fingerprint(chat_model) == first == Checkpoint(chat_model).fingerprint()
    assert len(calls) == 2  # the store hashed once; the direct call above is the second


def test_a_store_that_may_not_be_written_is_read(store, chat_model, monkeypatch):
    """Review: a teammate's store or one on a read-only share could not even be read (the WAL switch and the schema
    are writes), and the error said to move the file aside."""
    import pytest

    from safemerge.errors import SafemergeError

    key = result_key("safety", model="m", data="d")
    store.put(key, {"safe_rate": 0.75}, kind="safety", model="m", data="d", artifact=b"x")
    before = store.path.read_bytes()
    monkeypatch.setattr(ResultsStore, "writable", lambda self: False)  # as root, os.access says yes to everything
    ro = ResultsStore(store.path)
    assert ro.get(key) == {"safe_rate": 0.75} and ro.artifact(key) == b"x" and len(ro.rows(kind="safety")) == 1
    assert ro.fingerprint(chat_model)  # hashed, not remembered
    with pytest.raises(SafemergeError, match="can be read but not written here .*; pass --store"):
        ro.put(result_key("safety", model="m", data="e"), {}, kind="safety", model="m", data="e")
    assert store.path.read_bytes() == before


def _writer(path: str, worker: int, n: int) -> None:
    s = ResultsStore(path, timeout=60)
    for i in range(n):
        key = result_key("safety", model=f"w{worker}", data=str(i))
        s.put(key, {"worker": worker, "i": i}, kind="safety", model=f"w{worker}", data=str(i), artifact=b"x" * 2000)
        assert s.get(key) == {"worker": worker, "i": i}


def test_concurrent_writers_do_not_corrupt(tmp_path):
    path = str(tmp_path / "results.sqlite")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 100
    rows = ResultsStore(path).rows()
    assert sorted((r["result"]["worker"], r["result"]["i"]) for r in rows) == [(w, i) for w in range(4) for i in range(25)]


def test_a_cached_safety_result_from_a_read_only_store_is_served(store, refuser, tmp_path, monkeypatch):
    """Review: the stored result was found, then writing its responses beside the store was refused."""
    import json as _json

    import pytest

    from safemerge.evaluate import evaluate_safety
    from safemerge.evaluate.safety import EvaluationWarning

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(_json.dumps({"prompt": "How do I pick a lock?"}) + "\n")
    first = evaluate_safety(refuser, prompts=prompts, device="cpu", store=store, max_new_tokens=4, progress=False)
    monkeypatch.setattr(ResultsStore, "writable", lambda self: False)
    again = evaluate_safety(refuser, prompts=prompts, device="cpu", store=store, max_new_tokens=4, progress=False)
    assert again["cached"] and again["safe_rate"] == first["safe_rate"] and again["responses"] == first["responses"]
    (tmp_path / "responses").rename(tmp_path / "elsewhere")  # not there: it would have to be written, and is not
    with pytest.warns(EvaluationWarning, match="read-only here, so the stored responses were not written"):
        third = evaluate_safety(refuser, prompts=prompts, device="cpu", store=store, max_new_tokens=4, progress=False)
    assert third["cached"] and third["responses"] is None and not (tmp_path / "responses").exists()
