"""write_report and `safemerge report`: the files, their references, overwrite rules, the CLI."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from safemerge.cli import report as report_cli
from safemerge.errors import OutputExistsError
from safemerge.report import write_report


def data_pngs(html: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b, validate=True)))
            for b in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_writes_markdown_html_and_figures(full_report):
    done = full_report
    out = done["markdown"].parent
    assert sorted(p.name for p in out.iterdir()) == ["report-knowledge-safety.png", "report-l2.png", "report.html",
                                                    "report.md"]       # and no temporary directory left
    assert done["verdicts"] == {"PASS": 6, "FAIL": 0, "SKIPPED": 0} and len(done["claims"]) == 6
    md = done["markdown"].read_text()
    for ref in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / ref).is_file()
    for title in ("Table 1", "Table 2", "Table 3", "Table 4", "## Claims", "## Timings"):
        assert title in md
    html = done["html"].read_text()
    assert [img.format for img in data_pngs(html)] == ["PNG", "PNG"]
    assert not re.search(r'(src|href)="(?!data:|#)', html) and "<script" not in html     # self-contained
    assert html.count("<table") == 5 and html.count('<span class="badge PASS">PASS</span>') == 6


def test_tables_are_numbered_without_gaps(full, tmp_path):
    """A comparison without searches has no Table 3; the L2 table is then Table 3, not Table 4."""
    full["models"] = {k: v for k, v in full["models"].items() if v.get("method") not in ("evomm", "cocktail")}
    md = write_report(full, tmp_path)["markdown"].read_text()
    titles = re.findall(r"\*\*(Table \d+): ([^*]+)\*\*", md)
    assert [t for t, _ in titles] == ["Table 1", "Table 2", "Table 3"]
    assert titles[2][1].startswith("L2 distance")


def test_fail_and_skipped_are_shown_not_hidden(full, tmp_path):
    full["models"] = {k: v for k, v in full["models"].items() if k in ("aligned", "expert-medicine", "mergealign",
                                                                       "slerp-gradient", "evomm-safe", "evomm-unsafe",
                                                                       "dpo", "orpo")}
    full["models"]["mergealign"]["safety"] = {"safety_test": 0.1, "advbench_like": 0.1}
    del full["models"]["orpo"]
    done = write_report(full, tmp_path)
    assert done["verdicts"] == {"PASS": 3, "FAIL": 2, "SKIPPED": 1}     # safety and vs-slerp fail
    md, html = done["markdown"].read_text(), done["html"].read_text()
    assert md.count("| **FAIL** |") == 2 and md.count("| **SKIPPED** |") == 1 and "no model of method 'orpo'" in md
    assert html.count('<span class="badge FAIL">FAIL</span>') == 2
    assert "2 FAIL" in md and '<span class="badge FAIL">2 FAIL</span>' in html


def test_never_overwrites_without_being_asked(full, tmp_path):
    full["models"] = {k: full["models"][k] for k in ("aligned", "mergealign")}
    write_report(full, tmp_path)
    before = (tmp_path / "report.md").read_text()
    with pytest.raises(OutputExistsError, match="report"):
        write_report({"models": {}}, tmp_path)
    assert (tmp_path / "report.md").read_text() == before
    done = write_report({"models": {}}, tmp_path, overwrite=True)     # no figures now: the old PNGs go
    assert done["figures"] == {} and sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.md"]
    assert "No claims" not in done["markdown"].read_text() and done["verdicts"]["SKIPPED"] == 6


def test_a_folder_where_a_report_file_goes_is_an_error_before_anything_is_written(full, tmp_path):
    (tmp_path / "report.html").mkdir()
    with pytest.raises(OutputExistsError, match="report.html: is a folder where the report writes a file"):
        write_report(full, tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_reads_results_json_and_takes_given_claims(full, tmp_path):
    full["models"] = {k: full["models"][k] for k in ("aligned", "mergealign")}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(full))
    done = write_report(path, tmp_path, title="My run", claims=[])
    assert done["claims"] == [] and done["markdown"].read_text().startswith("# My run")
    assert "No claims were checked." in done["html"].read_text()


def cli() -> typer.Typer:
    app = typer.Typer()
    report_cli.register(app)
    app.command("noop")(lambda: None)     # a second command keeps `report` a sub-command
    return app


def test_cli_writes_beside_results_and_prints_json(full, tmp_path):
    path = tmp_path / "results.json"
    full["models"] = {k: full["models"][k] for k in ("aligned", "expert-medicine", "mergealign")}
    path.write_text(json.dumps(full))
    r = CliRunner().invoke(cli(), ["report", str(path), "--json"])
    assert r.exit_code == 0, r.output
    done = json.loads(r.stdout)
    assert done["html"] == str(tmp_path / "report.html") and done["verdicts"] == {"PASS": 2, "FAIL": 0, "SKIPPED": 4}
    r = CliRunner().invoke(cli(), ["report", str(path)])
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = CliRunner().invoke(cli(), ["report", str(path), "--out", str(tmp_path / "o"), "--title", "x"])
    assert r.exit_code == 0 and "PASS" in r.stdout and (tmp_path / "o" / "report.html").is_file()


def test_cli_given_a_run_folder_writes_into_it(full, tmp_path):
    """As `seeds` takes runs: the report goes beside the folder's results.json, not into the folder above it."""
    run = tmp_path / "runs" / "r0"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(full))
    r = CliRunner().invoke(cli(), ["report", str(run), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["html"] == str(run / "report.html") and not (tmp_path / "runs" / "report.html").exists()


def test_cli_bad_results_is_one_clear_error(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"models": {"m": {"safety": {"s": 7}}}}))
    r = CliRunner().invoke(cli(), ["report", str(path)])
    assert r.exit_code == 2 and "models.m.safety.s" in r.output and "Traceback" not in r.output


def test_odd_paths_and_hand_edited_meta_are_clear_errors(tmp_path, full):
    from safemerge.report import ResultsError, load_results

    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(full))
    assert load_results(run).meta["seed"] == 0  # a run's folder, as `seeds` takes it
    with pytest.raises(ResultsError, match="is a folder without results.json"):
        load_results(tmp_path)
    (tmp_path / "latin1.json").write_bytes(b'{"models": {"caf\xe9": {}}}')
    with pytest.raises(ResultsError, match="not a UTF-8 text file"):
        load_results(tmp_path / "latin1.json")
    for key, value in (("domains", 5), ("primary_domain", 1)):
        bad = json.loads(json.dumps(full))
        bad["meta"][key] = value
        with pytest.raises(ResultsError, match=f"meta.{key} must be a name"):
            load_results(bad)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        write_report(full, tmp_path / "afile", overwrite=True)
    bad = json.loads(json.dumps(full))  # review: an infinite rate was shown as "—", not measured
    bad["models"]["mergealign"]["safety"] = {"safety_test": float("inf")}
    with pytest.raises(ResultsError, match=r"mergealign.safety.safety_test = inf: out of range"):
        load_results(bad)


def test_a_timing_that_is_not_a_number_reads_not_measured(tmp_path, full):
    full["meta"]["timings"] = {"testbed": float("nan"), "merges": 12.5}
    done = write_report(full, tmp_path / "r")
    text = done["markdown"].read_text()
    assert "not measured" in text and "12.5 s" in text
