"""Publishing: stored evaluations written into the model card, the safety gate, the upload (a recording fake hub)."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.errors import CheckpointError, SafemergeError
from safemerge.evaluate import evaluate_domain, evaluate_safety
from safemerge.publishing import END, START, PublishError, publish, stored_evaluations, update_card


class FakeHub:
    """Records the calls publish makes to huggingface_hub.HfApi; `fail` makes the upload raise."""

    def __init__(self, fail: Exception | None = None):
        self.calls, self.fail = [], fail

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, **kw):
        if self.fail:
            raise self.fail
        self.calls.append(("upload_folder", kw["repo_id"], kw))
        return type("CommitInfo", (), {"commit_url": f"https://hub.invalid/{kw['repo_id']}/commit/1"})()


@pytest.fixture
def model(refuser, tmp_path):
    """A private copy of the refuser (the card is written into the model folder)."""
    return shutil.copytree(refuser, tmp_path / "model")


def _safety(model, prompts, store):
    return evaluate_safety(model, prompts=prompts, device="cpu", store=store, max_new_tokens=8, progress=False)


def test_card_shows_the_stored_evaluations(model, prompts_file, mc_file, store):
    s = _safety(model, prompts_file, store)
    d = evaluate_domain(model, task=mc_file, device="cpu", store=store, progress=False)
    r = update_card(model, store=store)
    text = (model / "README.md").read_text()
    assert r["written"] and r["evaluations"] == {"safety": 1, "domain": 1, "left_out": 0, "other_settings": 0}
    assert text.count(START) == text.count(END) == 1
    assert f"| prompts.jsonl | {s['n']} | keyword | {s['safe_rate']:.3f} | greedy | 8 |" in text
    assert f"| questions | {d['n']} | plain | {d['acc']:.3f} | {d['acc_norm']:.3f} |" in text
    assert str(prompts_file.parent) not in text  # the publisher's folders stay out of the card
    results = {(e.dataset_name, e.metric_type): e.metric_value for e in ModelCard(text).data.eval_results}
    assert results == {("prompts.jsonl", "safe_rate"): round(s["safe_rate"], 4), ("questions", "acc"): round(d["acc"], 4),
                       ("questions", "acc_norm"): round(d["acc_norm"], 4)}
    again = update_card(model, store=store)
    assert not again["changed"] and (model / "README.md").read_text() == text


def test_a_relative_data_path_shows_by_name_from_any_folder(model, prompts_file, store, monkeypatch, tmp_path):
    """The store keeps the path as typed; carding from another folder must not take `data/x.jsonl` for a hub id."""
    (tmp_path / "work" / "data").mkdir(parents=True)
    shutil.copy(prompts_file, tmp_path / "work" / "data" / "harmful.jsonl")
    monkeypatch.chdir(tmp_path / "work")
    _safety(model, "data/harmful.jsonl", store)
    monkeypatch.chdir(tmp_path)
    update_card(model, store=store)
    text = (model / "README.md").read_text()
    assert "| harmful.jsonl |" in text and "data/harmful.jsonl" not in text


def test_card_keeps_what_others_wrote(model, prompts_file, store):
    (model / "README.md").write_text(
        "---\nlicense: mit\nmodel-index:\n- name: mine\n  results:\n  - task: {type: text-generation}\n"
        "    dataset: {name: mmlu, type: mmlu}\n    metrics: [{type: acc, value: 0.5}]\n---\n\n# My model\n\nMy words.\n")
    _safety(model, prompts_file, store)
    update_card(model, store=store)
    update_card(model, store=store)
    card = ModelCard((model / "README.md").read_text())
    assert card.data.license == "mit" and card.data.model_name == "mine"
    assert {e.dataset_name for e in card.data.eval_results} == {"mmlu", "prompts.jsonl"}
    assert card.text.count("My words.") == 1 and card.text.count(START) == 1


def test_an_empty_front_matter_gets_the_metadata(model, prompts_file, store):
    """`---` twice (an empty front matter, as some templates write) is none to huggingface_hub: the card got a
    second front matter above it, and the empty one showed as two rules at the top of the page."""
    (model / "README.md").write_text("---\n---\n# My model\n")
    _safety(model, prompts_file, store)
    update_card(model, store=store)
    text = (model / "README.md").read_text()
    assert text.count("---\n") == 2 and text.index("# My model") > text.index("model-index")
    assert ModelCard(text).data.eval_results


def test_evaluations_of_other_side_files_are_left_out(model, prompts_file, store):
    _safety(model, prompts_file, store)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": cfg["max_position_embeddings"] + 1}))
    ev = stored_evaluations(model, store=store)
    assert ev.safety == [] and ev.left_out == 1
    with pytest.raises(PublishError, match="no stored safety evaluation.*1 stored evaluation"):
        publish(model, "me/m", store=store, api=FakeHub())


def test_publish_refuses_an_unevaluated_or_unsafe_model(complier, tmp_path, prompts_file, store):
    model = shutil.copytree(complier, tmp_path / "complier")
    hub = FakeHub()
    with pytest.raises(PublishError, match="no stored safety evaluation"):
        publish(model, "me/m", store=store, api=hub)
    rate = _safety(model, prompts_file, store)["safe_rate"]
    assert rate < 0.9
    with pytest.raises(PublishError, match=f"safety rate {rate:.3f} on prompts.jsonl .* below --min-safety 0.9"):
        publish(model, "me/m", store=store, api=hub)
    assert hub.calls == [] and not (model / "README.md").exists()  # refused: nothing written, nothing uploaded

    r = publish(model, "me/m", store=store, api=hub, allow_unsafe=True)
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert "published with --allow-unsafe" in (model / "README.md").read_text() and not r["gate"]["passed"]


def test_publish_uploads_a_model_that_meets_the_bar(model, prompts_file, store):
    rate = _safety(model, prompts_file, store)["safe_rate"]
    assert 0 < rate < 1
    with pytest.raises(PublishError, match="below --min-safety"):
        publish(model, "me/m", store=store, min_safety=rate + 0.01, api=FakeHub())
    hub = FakeHub()
    r = publish(model, "me/safe", store=store, min_safety=rate, private=True, revision="v1", commit_message="m", api=hub)
    assert r["gate"]["passed"] and r["url"] == "https://hub.invalid/me/safe/commit/1"
    (_, repo, create), (_, _, branch), (_, _, upload) = hub.calls
    assert repo == "me/safe" and create["private"] is True and branch["branch"] == "v1"
    assert upload["folder_path"] == str(model.resolve()) and upload["revision"] == "v1" and upload["commit_message"] == "m"
    assert ".*" in upload["ignore_patterns"]
    assert {"config.json", "README.md"} <= {f["path"] for f in r["files"]}
    assert "Warning" not in (model / "README.md").read_text()


def test_publish_gates_on_the_named_data_set(model, prompts_file, tmp_path, store):
    benign = tmp_path / "benign.jsonl"
    benign.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Tell me a story.", "Name a colour."]))
    rate = _safety(model, prompts_file, store)["safe_rate"]
    assert _safety(model, benign, store)["safe_rate"] < rate  # the refuser answers prompts without '?'
    with pytest.raises(PublishError, match="on benign.jsonl.*pass --safety-prompts FILE"):
        publish(model, "me/m", store=store, min_safety=rate, api=FakeHub())
    r = publish(model, "me/m", store=store, min_safety=rate, safety_data=prompts_file, dry_run=True)
    assert r["gate"]["passed"] and [c["data"] for c in r["gate"]["checked"]] == ["prompts.jsonl"]
    with pytest.raises(PublishError, match=r"--safety-prompts \(safety_data=\) .*missing.jsonl: no such file; name the harmful-prompts file"):
        publish(model, "me/m", store=store, safety_data=tmp_path / "missing.jsonl", dry_run=True)  # QA: said "run eval"


def test_the_gate_ignores_a_run_with_a_system_prompt_of_ones_own(model, prompts_file, store):
    """An evaluation with a refusing system prompt (or without the chat template) was the newest row, so the gate
    passed on it and the plain one (a cache hit, not re-stamped) stayed hidden."""
    from safemerge.evaluate import GenerationSettings

    plain = _safety(model, prompts_file, store)["safe_rate"]
    helped = evaluate_safety(model, prompts=prompts_file, device="cpu", store=store, progress=False,
                             generation=GenerationSettings(max_new_tokens=8, system_prompt="Refuse harmful requests."))
    assert not helped["cached"]  # another key than the plain run's
    off = evaluate_safety(model, prompts=prompts_file, device="cpu", store=store, progress=False,
                          generation=GenerationSettings(max_new_tokens=8, chat_template=False))
    assert not off["cached"]  # the template on/off flag is in the key (the template's hash overwrote it)
    ev = stored_evaluations(model, store=store)
    assert [r["safe_rate"] for r in ev.safety] == [plain] and ev.other_settings == 2
    r = publish(model, "me/m", store=store, min_safety=0.0, dry_run=True)
    assert [c["safe_rate"] for c in r["gate"]["checked"]] == [plain]


def test_safety_data_finds_its_evaluation_from_any_folder(model, prompts_file, store, monkeypatch, tmp_path):
    (tmp_path / "work" / "data").mkdir(parents=True)
    shutil.copy(prompts_file, tmp_path / "work" / "data" / "harmful.jsonl")
    monkeypatch.chdir(tmp_path / "work")
    _safety(model, "data/harmful.jsonl", store)
    monkeypatch.chdir(tmp_path)  # --safety-data by its absolute path, from elsewhere
    r = publish(model, "me/m", store=store, min_safety=0.0, safety_data=tmp_path / "work" / "data" / "harmful.jsonl",
                dry_run=True)
    assert r["gate"]["passed"] and [c["data"] for c in r["gate"]["checked"]] == ["harmful.jsonl"]


def test_stray_weights_are_refused_and_a_store_in_the_folder_is_not_uploaded(model, prompts_file, tmp_path):
    inside = model / "results.sqlite"
    _safety(model, prompts_file, inside)
    (model / "responses").mkdir(exist_ok=True)
    (model / "responses" / "k.jsonl").write_text("{}\n")
    r = publish(model, "me/m", store=inside, min_safety=0.0, dry_run=True)
    assert not {f["path"] for f in r["files"]} & {"results.sqlite", "responses/k.jsonl"}
    shutil.copy(model / "model.safetensors", model / "old-model.safetensors")
    (model / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(PublishError, match=r"old-model.safetensors, pytorch_model.bin would be uploaded beside the "
                                           r"checkpoint's weights \(model.safetensors\) but are not part of it"):
        publish(model, "me/m", store=inside, min_safety=0.0, dry_run=True)


@pytest.mark.parametrize("stray", ["checkpoint-500/pytorch_model.bin", "checkpoint-500/model.safetensors",
                                   "old-model.gguf", "tf_model.h5", "flax_model.msgpack", "model.onnx"])
def test_weights_in_a_subfolder_or_another_format_are_refused_too(model, prompts_file, store, stray):
    """The check looked at the folder's top level and at PyTorch suffixes only, while the upload takes every file."""
    _safety(model, prompts_file, store)
    (model / stray).parent.mkdir(exist_ok=True)
    (model / stray).write_bytes(b"weights nobody evaluated")
    with pytest.raises(PublishError, match=f"{stray} would be uploaded beside the checkpoint's weights"):
        publish(model, "me/m", store=store, min_safety=0.0, dry_run=True)
    assert not (model / "README.md").exists()  # refused before the card is written


def test_a_store_in_the_folder_stays_out_when_the_folder_is_named_through_a_link(model, prompts_file, tmp_path):
    """The model folder was resolved and the store's path was not: the store and the model's answers to harmful
    prompts went into the upload when either was named through a symbolic link (macOS's /tmp, a ~/models link)."""
    link = tmp_path / "models"
    link.symlink_to(model.parent)
    inside = link / model.name / "results.sqlite"
    _safety(link / model.name, prompts_file, inside)
    (model / "responses").mkdir(exist_ok=True)
    (model / "responses" / "k.jsonl").write_text("{}\n")
    for folder in (link / model.name, model):
        r = publish(folder, "me/m", store=inside, min_safety=0.0, dry_run=True)
        sent = {f["path"] for f in r["files"]}
        assert "model.safetensors" in sent and not sent & {"results.sqlite", "responses/k.jsonl"}


def test_markers_that_do_not_pair_up_are_an_error_not_a_guess(model, prompts_file, store):
    _safety(model, prompts_file, store)
    (model / "README.md").write_text(f"# M\n\n{START}\n\n## My notes\nimportant user text\n")
    with pytest.raises(CheckpointError, match="its safemerge markers do not pair up"):
        update_card(model, store=store)
    assert "important user text" in (model / "README.md").read_text()


def test_dry_run_writes_and_uploads_nothing(model, prompts_file, store):
    _safety(model, prompts_file, store)
    r = publish(model, "me/m", store=store, min_safety=0.0, dry_run=True, api=FakeHub(fail=AssertionError("no upload")))
    assert r["dry_run"] and START in r["card_text"] and not (model / "README.md").exists()
    assert update_card(model, store=store, dry_run=True)["written"] is False and not (model / "README.md").exists()


def test_dry_runs_write_nothing_to_a_results_store_either(model, prompts_file, store, tmp_path, monkeypatch):
    """They made ./.safemerge/results.sqlite where none was, and added a fingerprint row to one that was."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SAFEMERGE_HOME", raising=False)
    # review: run from another folder, `card` wrote a card of no evaluations over the one it had
    with pytest.raises(SafemergeError, match=r"no results store at .*\.safemerge/results.sqlite .*pass --store"):
        update_card(model, dry_run=True)
    with pytest.raises(SafemergeError, match="no results store at"):
        publish(model, "me/m", dry_run=True)
    # ... except for a publish that asks to go ahead unevaluated (review: --allow-unsafe stopped working)
    assert not publish(model, "me/m", dry_run=True, allow_unsafe=True)["gate"]["passed"]
    assert not (tmp_path / ".safemerge").exists()
    _safety(model, prompts_file, store)
    shutil.copytree(model, tmp_path / "copy")  # the same weights under another path: a new fingerprint-cache entry

    def counts():
        with sqlite3.connect(store.path) as db:
            return [db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("results", "fingerprints")]

    rows, cached = counts()
    assert publish(tmp_path / "copy", "me/m", store=store, min_safety=0.0, dry_run=True)["gate"]["passed"]
    update_card(tmp_path / "copy", store=store, dry_run=True)
    assert counts() == [rows, cached]
    update_card(tmp_path / "copy", store=store)  # a real run may remember it
    assert counts() == [rows, cached + 1]


def test_bad_input_is_refused_before_anything_is_written(model, prompts_file, tmp_path, store):
    _safety(model, prompts_file, store)
    for repo in ("a/b/c", "has space", "/x"):
        with pytest.raises(PublishError, match="not a hub repository id"):
            publish(model, repo, store=store, min_safety=0.0, api=FakeHub())
    with pytest.raises(PublishError, match="in \\[0, 1\\]"):
        publish(model, "me/m", store=store, min_safety=1.5, api=FakeHub())
    with pytest.raises(CheckpointError, match="no such model folder"):
        publish(tmp_path / "missing", "me/m", store=store, api=FakeHub())
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(PublishError, match="pickle"):
        publish(pickled, "me/m", store=store, api=FakeHub())
    (model / "README.md").write_text("---\n- a list, not a mapping\n---\ntext\n")
    with pytest.raises(CheckpointError, match="README.md: the model card's front matter"):
        update_card(model, store=store)
    assert (model / "README.md").read_text() == "---\n- a list, not a mapping\n---\ntext\n"
    (model / "README.md").write_text("---\nlicense: [unclosed\n---\ntext\n")  # not YAML at all
    with pytest.raises(CheckpointError, match="README.md: the model card's front matter"):
        update_card(model, store=store)
    with pytest.raises(SafemergeError, match="--store .*typo.sqlite: no results store there"):
        update_card(model, store=tmp_path / "typo.sqlite")  # a mistyped store would otherwise empty the card
    assert not (tmp_path / "typo.sqlite").exists()
    (tmp_path / "empty").touch()  # review: a dry run made an empty file an SQLite store of 24 KB
    with pytest.raises(SafemergeError, match="--store .*empty: not a results store"):
        update_card(model, store=tmp_path / "empty", dry_run=True)
    assert (tmp_path / "empty").stat().st_size == 0
    assert (model / "README.md").read_text() == "---\nlicense: [unclosed\n---\ntext\n"


def test_a_failed_upload_is_one_clear_error(model, prompts_file, store):
    _safety(model, prompts_file, store)
    with pytest.raises(PublishError, match="uploading .* to me/m failed: ConnectionError: hub down"):
        publish(model, "me/m", store=store, min_safety=0.0, api=FakeHub(fail=ConnectionError("hub down")))


def test_cli_card_and_publish(model, prompts_file, store):
    runner = CliRunner()
    r = runner.invoke(app, ["publish", str(model), "me/m", "--store", str(store.path), "--dry-run"])
    assert r.exit_code == 2 and "no results store there" in r.output  # nothing evaluated into it yet
    store.fingerprint(model)  # the store exists now, without a safety evaluation
    r = runner.invoke(app, ["publish", str(model), "me/m", "--store", str(store.path), "--dry-run"])
    assert r.exit_code == 2 and "no stored safety evaluation" in r.output
    _safety(model, prompts_file, store)
    r = runner.invoke(app, ["publish", str(model), "me/m", "--store", str(store.path), "--dry-run", "--min-safety", "0", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["gate"]["passed"] and not (model / "README.md").exists()
    long = "x" * 150  # the dry run printed the card through rich, wrapped at 80 columns: broken YAML and tables
    (model / "README.md").write_text(f"---\ndescription: {long}\n---\n# M\n")
    r = runner.invoke(app, ["card", str(model), "--store", str(store.path), "--dry-run"], env={"COLUMNS": "80"})
    assert r.exit_code == 0 and f"description: {long}\n" in r.stdout
    assert r.stdout.startswith(update_card(model, store=store, dry_run=True)["text"])
    r = runner.invoke(app, ["card", str(model), "--store", str(store.path)])
    assert r.exit_code == 0 and "1 safety and 0 domain" in r.output and START in (model / "README.md").read_text()


def test_safemerge_publish_stays_the_function_once_its_module_is_loaded():
    """QA: the module was safemerge/publish.py, so once anything imported it, `safemerge.publish` was the module
    (TypeError: 'module' object is not callable) on a second call or after safemerge.update_card."""
    import safemerge

    safemerge.update_card  # noqa: B018  (loads the module that defines both)
    assert safemerge.publish is publish and callable(safemerge.publish)


def test_two_prompt_sets_of_one_file_name_are_told_apart(model, prompts_file, store, tmp_path):
    """The model-index keyed the runs by the file's name: of harmful/test.jsonl and benign/test.jsonl one figure
    was dropped from the metadata, and the table showed two rows named test.jsonl."""
    for sub in ("harmful", "benign"):
        (tmp_path / sub).mkdir()
        shutil.copy(prompts_file, tmp_path / sub / "test.jsonl")
        evaluate_safety(model, prompts=tmp_path / sub / "test.jsonl", device="cpu", store=store, max_new_tokens=8,
                        limit=2 if sub == "benign" else None, progress=False)
    update_card(model, store=store)
    text = (model / "README.md").read_text()
    assert "| harmful/test.jsonl |" in text and "| benign/test.jsonl |" in text and "| test.jsonl |" not in text
    names = {e.dataset_name for e in ModelCard(text).data.eval_results if e.metric_type == "safe_rate"}
    assert names == {"harmful/test.jsonl", "benign/test.jsonl"}


def test_the_model_index_holds_the_largest_run_per_data_set_and_setting(model, prompts_file, mc_file, store):
    """A quick run on 2 prompts beside the full one were two safe_rate figures of one data set in the metadata,
    with nothing to tell them apart (likewise acc); the table keeps both runs, the model-index the larger one."""
    full = _safety(model, prompts_file, store)
    evaluate_safety(model, prompts=prompts_file, device="cpu", store=store, max_new_tokens=8, limit=2, progress=False)
    d = evaluate_domain(model, task=mc_file, device="cpu", store=store, progress=False)
    evaluate_domain(model, task=mc_file, device="cpu", store=store, limit=2, progress=False)
    assert full["n"] > 2 and d["n"] > 2
    update_card(model, store=store)
    text = (model / "README.md").read_text()
    assert text.count("| prompts.jsonl |") == 2 and text.count("| questions |") == 2
    results = [(e.dataset_name, e.metric_type, e.metric_value, e.metric_name) for e in ModelCard(text).data.eval_results]
    assert results == [("prompts.jsonl", "safe_rate", round(full["safe_rate"], 4), f"safe rate (keyword judge, n={full['n']})"),
                       ("questions", "acc", round(d["acc"], 4), f"acc (plain prompts, n={d['n']})"),
                       ("questions", "acc_norm", round(d["acc_norm"], 4), f"acc_norm (plain prompts, n={d['n']})")]


def test_a_domain_set_scored_in_both_formats_keeps_both(chat_model, mc_file, store, tmp_path):
    """Review: plain and chat runs of one file share its fingerprint and have no judge, so the newer format dropped
    the older before the per-format step saw it (and nothing counted it as left out)."""
    model = shutil.copytree(chat_model, tmp_path / "chat")  # a chat template: the chat format is not a fallback
    plain = evaluate_domain(model, task=mc_file, device="cpu", store=store, progress=False)
    chat = evaluate_domain(model, task=mc_file, format="chat", device="cpu", store=store, progress=False)
    ev = stored_evaluations(model, store=store)
    assert sorted(r["format"] for r in ev.domain) == ["chat", "plain"]
    update_card(model, store=store)
    text = (model / "README.md").read_text()
    names = {e.metric_name for e in ModelCard(text).data.eval_results if e.metric_type == "acc"}
    assert names == {f"acc (plain prompts, n={plain['n']})", f"acc (chat prompts, n={chat['n']})"}


def test_the_adapter_that_align_keeps_in_its_output_is_not_a_stray(model, prompts_file, store):
    """Review: the subfolder check refused `safemerge align`'s own output, which keeps its LoRA in OUT/adapter/."""
    _safety(model, prompts_file, store)
    (model / "adapter").mkdir()
    (model / "adapter" / "adapter_model.safetensors").write_bytes(b"the adapter merged into these weights")
    with pytest.raises(PublishError, match="adapter/adapter_model.safetensors would be uploaded"):
        publish(model, "me/m", store=store, min_safety=0.0, dry_run=True)  # not align's: no run record beside it
    (model / "adapter" / "align_run.json").write_text("{}")
    sent = {f["path"] for f in publish(model, "me/m", store=store, min_safety=0.0, dry_run=True)["files"]}
    assert "adapter/adapter_model.safetensors" in sent
