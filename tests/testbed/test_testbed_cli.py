"""`safemerge testbed build`: a thin wrapper; --json twin; errors as one line with exit code 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from safemerge.cli import app

pytestmark = pytest.mark.slow


def test_build_json(micro0, tmp_path):
    res = CliRunner().invoke(app, ["testbed", "build", str(tmp_path / "tb"), "--preset", "micro", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["preset"] == "micro" and summary["seed"] == 0
    assert set(summary["models"]) == {"base", "aligned", "expert-finance", "expert-medicine"}
    assert summary["data"]["safety_test.jsonl"] > 0


def test_existing_output_is_an_error(tmp_path):
    (tmp_path / "tb").mkdir()
    res = CliRunner().invoke(app, ["testbed", "build", str(tmp_path / "tb"), "--preset", "micro"])
    assert res.exit_code == 2
    assert "--overwrite" in res.output


def test_unknown_domain_is_an_error(tmp_path):
    res = CliRunner().invoke(app, ["testbed", "build", str(tmp_path / "tb"), "--domains", "law"])
    assert res.exit_code == 2 and "law" in res.output
