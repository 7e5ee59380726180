"""audit and the CLI commands (through typer's runner, on a local app with this area registered)."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from safemerge.cli.evaluate import register
from safemerge.evaluate import audit

pytestmark = pytest.mark.filterwarnings("ignore:.*no chat template:safemerge.evaluate.backends.EvaluationWarning")


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    register(app)
    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, [str(a) for a in args])

    return run


def test_audit_flags_the_unsafe_model(refuser, complier, prompts_file, mc_file, store):
    r = audit([refuser, complier], safety_prompts=prompts_file, domain_tasks=[mc_file], threshold=0.4,
              device="cpu", store=store, max_new_tokens=8)
    rows = {row["name"]: row for row in r["models"]}
    assert rows["refuser"]["safe_rate"] == pytest.approx(0.5) and not rows["refuser"]["flagged"]
    assert rows["complier"]["safe_rate"] == 0.0 and rows["complier"]["flagged"]
    assert r["flagged"] == [str(complier)] and r["tasks"] == ["questions"]
    assert 0 <= rows["refuser"]["domain"]["questions"]["acc"] <= 1
    again = audit([refuser, complier], safety_prompts=prompts_file, domain_tasks=[mc_file], threshold=0.4,
                  device="cpu", store=store, max_new_tokens=8)
    assert all(row["cached"] and row["domain"]["questions"]["cached"] for row in again["models"])
    n = rows["refuser"]["domain"]["questions"]["n"]
    fewer = audit([refuser], safety_prompts=prompts_file, domain_tasks=[mc_file], device="cpu", store=store,
                  max_new_tokens=8, domain_limit=n - 1)  # QA: audit could not limit the questions, as compare can
    assert fewer["models"][0]["domain"]["questions"]["n"] == n - 1


def test_audit_refuses_a_model_twice_and_an_unknown_format_before_evaluating(refuser, prompts_file, store):
    from safemerge.errors import SafemergeError

    with pytest.raises(SafemergeError, match="refuser: the same model as .*refuser; audit each model once"):
        audit([refuser, refuser], safety_prompts=prompts_file, device="cpu", store=store)
    with pytest.raises(SafemergeError, match="--format 'xml': choose one of plain, chat"):
        audit([refuser], safety_prompts=prompts_file, format="xml", device="cpu", store=store)
    with pytest.raises(SafemergeError, match="--batch-size 0: must be a whole number"):
        audit([refuser], safety_prompts=prompts_file, batch_size=0, device="cpu", store=store)
    assert not store.path.exists()


def test_cli_safety_and_domain_json(cli, refuser, prompts_file, mc_file, tmp_path):
    store = tmp_path / "r.sqlite"
    res = cli("eval", "safety", refuser, "--prompts", prompts_file, "--device", "cpu", "--max-new-tokens", 8,
              "--store", store, "--json")
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["safe_rate"] == pytest.approx(0.5) and r["n"] == 6
    assert "warning: " in res.stderr and f"{refuser}: the tokenizer has no chat template" in res.stderr
    res = cli("eval", "domain", refuser, "--task", mc_file, "--device", "cpu", "--store", store, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n"] == 8


def test_cli_human_tables(cli, refuser, complier, prompts_file, tmp_path):
    store = tmp_path / "r.sqlite"
    res = cli("audit", refuser, complier, "--safety-prompts", prompts_file, "--threshold", 0.4, "--device", "cpu",
              "--max-new-tokens", 8, "--store", store)
    assert res.exit_code == 0, res.output
    assert "FLAG" in res.stdout and "complier" in res.stdout and "refuser" in res.stdout
    res = cli("eval", "similarity", refuser, complier, "--per-layer")
    assert res.exit_code == 0, res.output
    assert "per layer" in res.stdout and "L2" in res.stdout


def test_models_of_one_folder_name_are_told_apart(cli, refuser, complier, prompts_file, tmp_path):
    """Review: two pool members in folders of one name (r1/merged, r2/merged) were two rows 'merged', one flagged, and
    the summary did not say which; the similarity table named both 'merged' too. The threshold is printed as given."""
    import shutil

    a, b = tmp_path / "r1" / "merged", tmp_path / "r2" / "merged"
    shutil.copytree(refuser, a)
    shutil.copytree(complier, b)
    store = tmp_path / "r.sqlite"
    r = audit([a, b], safety_prompts=prompts_file, threshold=0.4, device="cpu", store=store, max_new_tokens=8)
    assert [row["name"] for row in r["models"]] == ["r1/merged", "r2/merged"]
    res = cli("audit", a, b, "--safety-prompts", prompts_file, "--threshold", 0.4375, "--device", "cpu",
              "--max-new-tokens", 8, "--store", store)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # rich wraps long lines
    assert "flag below 0.4375)" in text and "1 of 2 models below the safety threshold: r2/merged" in text, res.output
    for extra, status in ((["--fail-on-flag"], 1), (["--fail-on-flag", "--json"], 1),
                          (["--fail-on-flag", "--threshold", 0], 0), ([], 0)):
        res = cli("audit", a, b, "--safety-prompts", prompts_file, "--device", "cpu", "--max-new-tokens", 8, "--store",
                  store, "--threshold", 0.4375, *extra)
        assert res.exit_code == status, res.output
    assert "r1/merged" in text
    res = cli("eval", "similarity", a, b)
    assert res.exit_code == 0, res.output
    assert "r1/merged" in res.output and "r2/merged" in res.output, res.output


def test_cli_errors_are_one_line(cli, refuser, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    res = cli("eval", "safety", refuser, "--prompts", tmp_path / "bad.jsonl", "--store", tmp_path / "r.sqlite")
    assert res.exit_code == 2
    text = " ".join(res.output.split())  # rich wraps long lines
    assert "bad.jsonl: no 'prompt' column" in text and "Traceback" not in text
    res = cli("eval", "safety", refuser, "--prompts", tmp_path / "bad.jsonl", "--judge", "llama-guard")
    assert res.exit_code == 2


def test_a_bad_limit_is_named_as_the_command_line_gives_it(cli, refuser, prompts_file, mc_file, tmp_path):
    """The message said `limit must be a positive number of prompts`: the API's name after a CLI command."""
    for args, what in ((("eval", "safety", refuser, "--prompts", prompts_file), "prompts"),
                       (("eval", "domain", refuser, "--task", mc_file), "questions")):
        res = cli(*args, "--limit", "0", "--store", tmp_path / "r.sqlite")
        assert res.exit_code == 2
        assert f"--limit 0 (limit=): give a positive number of {what}" in " ".join(res.output.split())
    # review: audit's --domain-limit 0 was named "--limit 0 (limit=)", an option audit does not have
    res = cli("audit", refuser, "--safety-prompts", prompts_file, "--domain-task", mc_file, "--domain-limit", "0",
              "--store", tmp_path / "r.sqlite")
    assert res.exit_code == 2 and "Invalid value for '--domain-limit'" in res.output, res.output
