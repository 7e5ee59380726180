"""The CLI parses, calls the library, prints; errors exit 2 with one readable line."""

from __future__ import annotations

import contextlib
import gc
import json

import pytest
import yaml
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.errors import ConfigError, SafemergeError

runner = CliRunner()


def test_merge_and_mergealign_commands(tmp_path, tiny_family):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(tiny_family["base"]),
                                   "models": [{"model": str(tiny_family["expert"]), "parameters": {"weight": 1, "density": 0.5}}]}))
    r = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "o"), "--json", "--no-progress"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["output"] == str(tmp_path / "o")
    from safemerge.checkpoint import Checkpoint
    written, base = Checkpoint(tmp_path / "o"), Checkpoint(tiny_family["base"])
    assert summary["tensors"] == len(base.names()) and summary["parameters"] == base.num_params()
    assert summary["shards"] == len(written.weight_files()) == 1 and summary["dtype"] == "float32"
    assert summary["bytes"] == written.weight_files()[0].stat().st_size and summary["seconds"] >= 0
    r = runner.invoke(app, ["mergealign", str(tmp_path / "ma"), "--base", str(tiny_family["base"]),
                            "--domain", str(tiny_family["expert"]), "--aligned", str(tiny_family["aligned"]),
                            "--beta", "0.5", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert f"{len(base.names())} tensors, {base.num_params():,} parameters (float32)" in " ".join(r.stdout.split())
    saved = yaml.safe_load((tmp_path / "ma" / "mergekit_config.yml").read_text())
    assert saved["models"][1]["parameters"]["weight"] == 0.5
    assert saved["tokenizer_source"] == str(tiny_family["aligned"])
    # review: paths given relative to the working folder stayed so, and the YAML merged from nowhere else
    with contextlib.chdir(tiny_family["base"].parent):
        r = runner.invoke(app, ["mergealign", str(tmp_path / "rel"), "--base", "base", "--domain", "expert",
                                "--aligned", "aligned", "--tokenizer-source", "./aligned/", "--no-progress"])
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((tmp_path / "rel" / "mergekit_config.yml").read_text())
    assert (saved["base_model"], saved["models"][1]["model"]) == (str(tiny_family["base"]), str(tiny_family["aligned"]))
    assert saved["tokenizer_source"] == str(tiny_family["aligned"])
    assert str(tiny_family["base"].parent) not in (tmp_path / "rel" / "README.md").read_text()  # the card: as written
    assert gc.isenabled()  # paused only while the engine is imported
    # -j and --shard-size as merge has them (mergealign had neither); the same tensors, in several shards
    r = runner.invoke(app, ["mergealign", str(tmp_path / "ma2"), "--base", str(tiny_family["base"]),
                            "--domain", str(tiny_family["expert"]), "--aligned", str(tiny_family["aligned"]),
                            "--beta", "0.5", "-j", "1", "--shard-size", "40KB", "--json", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["shards"] == len(Checkpoint(tmp_path / "ma2").weight_files()) > 1
    one, two = Checkpoint(tmp_path / "ma"), Checkpoint(tmp_path / "ma2")
    assert all(one.get(n).equal(two.get(n)) for n in one.names())


def test_engine_import_leaves_the_collector_as_it_found_it():
    from safemerge.cli.merge import _start_engine

    gc.disable()
    try:
        _start_engine()
        assert not gc.isenabled()
    finally:
        gc.enable()
    _start_engine()
    assert gc.isenabled()


def test_the_cli_loads_without_torch():
    """`safemerge --help` and option parsing must not pay for torch and transformers (seconds): only a command
    that merges, evaluates or trains imports them."""
    import subprocess
    import sys

    code = "import sys, safemerge.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_errors_exit_2_with_a_message(tmp_path, tiny_family):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "tie", "base_model": "x", "models": [{"model": "y"}]}))
    r = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "did you mean 'ties'" in r.output
    assert not (tmp_path / "o").exists()


def test_an_error_naming_a_long_path_stays_on_one_line(tmp_path):
    """Error lines are not wrapped at the terminal's width, so a path in them can be copied whole."""
    deep = tmp_path / ("a-rather-long-directory-name-" * 4) / "merge-config-that-does-not-exist.yml"
    r = runner.invoke(app, ["merge", str(deep), str(tmp_path / "o")])
    assert r.exit_code == 2
    assert len(str(deep)) > 100 and str(deep) in r.output


@pytest.mark.parametrize("model", ["/models/expert-7b", "expert"])
def test_an_error_with_brackets_is_printed_as_text(tmp_path, model):
    """Messages such as `models[/path].parameters.lambda` are text: rich must neither fail on `[/path]` (a
    closing tag to it) nor swallow `[expert]` (a style tag)."""
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": "base",
                                   "models": [{"model": model, "parameters": {"weight": 1, "lambda": 0.5}}]}))
    r = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert f"models[{model}].parameters.lambda" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


@pytest.mark.parametrize("size", ["5XB", "0", "-5MB", "lots", "infGB", "1e400GB"])
def test_a_bad_shard_size_is_a_usage_error(tmp_path, tiny_family, size):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(tiny_family["base"]), "parameters": {"weight": 1}}]}))
    r = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "o"), "--shard-size", size])
    assert r.exit_code == 2 and "is not a positive size" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", [["--alpha", "nan"], ["--beta", "inf"]])
def test_mergealign_refuses_non_finite_weights(tmp_path, tiny_family, flag):
    r = runner.invoke(app, ["mergealign", str(tmp_path / "ma"), "--base", str(tiny_family["base"]),
                            "--domain", str(tiny_family["expert"]), "--aligned", str(tiny_family["aligned"]), *flag])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and f"MergeAlign {flag[0]} {flag[1]}: give a finite number" in text, r.output
    assert not (tmp_path / "ma").exists()


@pytest.mark.parametrize("role", ["aligned", "domain"])
def test_mergealign_refuses_a_model_in_two_roles(tmp_path, tiny_family, role):
    """--aligned (or --domain) naming the base again would make its task vector zero: an unsafe merge, no error."""
    given = {"base": str(tiny_family["base"]), "domain": str(tiny_family["expert"]), "aligned": str(tiny_family["aligned"])}
    given[role] = str(tiny_family["base"]) + "/"  # another spelling of the same folder
    r = runner.invoke(app, ["mergealign", str(tmp_path / "ma"), "--base", given["base"], "--domain", given["domain"],
                            "--aligned", given["aligned"]])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and f"MergeAlign --{role}" in text and "the same model as --base" in text, r.output
    assert not (tmp_path / "ma").exists()


def test_merge_ignore_unknown_warns_and_merges(tmp_path, tiny_family):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(tiny_family["base"]), "int_space": 1,
                                   "models": [{"model": str(tiny_family["expert"]), "parameters": {"weight": 1.0}}]}))
    r = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "o")])
    assert r.exit_code == 2 and "--ignore-unknown" in " ".join(r.output.split()) and not (tmp_path / "o").exists()
    r = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "o"), "--ignore-unknown"])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "warning:" in text and "ignored 1 unknown key(s)" in text and "int_space" in text, r.output
    assert "int_space" not in (tmp_path / "o" / "mergekit_config.yml").read_text()  # the config that was merged


def test_methods_lists_declared_parameters():
    r = runner.invoke(app, ["methods", "--json"])
    rows = json.loads(r.stdout)
    assert rows["ties"]["per_model"]["density"] == 1.0 and rows["slerp"]["global"]["t"] == "required"


def test_methods_table_says_which_kernels_run():
    from safemerge.methods import native

    r = runner.invoke(app, ["methods"])
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "fused CPU kernels" in text and native.status().split()[0] in text


def test_what_the_machine_refuses_is_one_line_and_a_bug_is_not_hidden(capsys):
    import errno

    import typer

    from safemerge.cli._common import user_errors

    for err in (PermissionError(errno.EACCES, "Permission denied", "/models/out"),
                OSError(errno.ENOSPC, "No space left on device", "/models/out/model.safetensors")):
        with pytest.raises(typer.Exit) as e:
            with user_errors():
                raise err
        assert e.value.exit_code == 2
        line = capsys.readouterr().err.strip()
        assert line.startswith(f"error: {err.filename}: {err.strerror}") and "Traceback" not in line
    with pytest.raises(FileNotFoundError):  # not the machine's refusal: raised as it is
        with user_errors():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/nowhere")


def test_a_full_disk_under_safetensors_is_one_line(capsys):
    """QA: the testbed and align save through safetensors' save_file, whose (Rust) error carries the OS error only in
    its text; a full disk printed a traceback. The messages are safetensors 0.8's, from a full tmpfs and a missing
    folder."""
    import typer
    from safetensors import SafetensorError

    from safemerge.cli._common import user_errors

    with pytest.raises(typer.Exit) as e:
        with user_errors():
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert e.value.exit_code == 2
    assert capsys.readouterr().err.strip().startswith("error: No space left on device (writing safetensors) (the machine "
                                                      "refused")
    with pytest.raises(typer.Exit):
        with user_errors():
            raise SafetensorError('Error while serializing: I/O error: Permission denied (os error 13) at path '
                                  '"/models/out/.tmpSghSGE"')
    assert capsys.readouterr().err.strip().startswith("error: /models/out: Permission denied (writing safetensors)")
    with pytest.raises(SafetensorError):  # not the machine's refusal: raised as it is
        with user_errors():
            raise SafetensorError('Error while serializing: I/O error: No such file or directory (os error 2) at path '
                                  '"/nope/.tmpSghSGE"')


def test_an_interrupt_after_the_output_is_in_place_does_not_say_nothing_was_written(tmp_path, capsys):
    """QA: Ctrl-C while the summary printed, after the output was complete, said "nothing was written"."""
    import typer

    from safemerge.checkpoint import atomic_output, atomic_write
    from safemerge.cli._common import user_errors

    with pytest.raises(typer.Exit):
        with user_errors():
            with atomic_output(tmp_path / "merged") as tmp:
                (tmp / "config.json").write_text("{}")
                with atomic_output(tmp / "inner") as inner:  # inside an output still being made: not a finished one
                    (inner / "config.json").write_text("{}")
            raise KeyboardInterrupt
    assert capsys.readouterr().err.strip() == (f"interrupted: {tmp_path / 'merged'} had been written in full before it; "
                                               "nothing is half-written")
    with pytest.raises(typer.Exit):
        with user_errors():
            atomic_write(tmp_path / "a.json", "{}", record=True)
            atomic_write(tmp_path / "b.json", "{}", record=True)
            raise KeyboardInterrupt
    assert capsys.readouterr().err.strip() == (f"interrupted: 2 outputs had been written in full before it (the last: "
                                               f"{tmp_path / 'b.json'}); nothing is half-written")
    with pytest.raises(typer.Exit):  # each command counts its own outputs, and a side file is not one
        with user_errors():
            atomic_write(tmp_path / "responses.jsonl", "{}")  # (as an evaluation's responses beside the store)
            raise KeyboardInterrupt
    assert capsys.readouterr().err.strip() == "interrupted: nothing was written at the target path"


def test_progress_bars_leave_no_blank_line_in_a_log(tmp_path, tiny_family):
    """QA: an error after a progress bar had started printed a blank line before it when stderr was not a terminal."""
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(tiny_family["base"]),
                                   "models": [{"model": str(tiny_family["expert"]), "parameters": {"weight": 1}}]}))
    r = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "o")])  # progress on (the default)
    assert r.exit_code == 0, r.output
    assert r.stderr == ""  # (the summary is on stdout)
    missing = tmp_path / "missing.jsonl"
    r = runner.invoke(app, ["data", "safety", "--pool", str(tiny_family["aligned"]), "--prompts", str(missing),
                            "--out", str(tmp_path / "s.jsonl")])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and str(missing) in r.stderr, r.stderr


def test_sigterm_ends_a_command_as_ctrl_c_does(capsys):
    """QA: `kill` during a search exited 143 without a word (and without the journal's clean close)."""
    import os
    import signal

    import typer

    from safemerge.cli._common import user_errors

    def sentinel(signum, frame):  # were user_errors' handler missing, this fails the test instead of killing pytest
        raise AssertionError("user_errors did not take SIGTERM")

    original = signal.signal(signal.SIGTERM, sentinel)
    try:
        with pytest.raises(typer.Exit) as e:
            with user_errors("; the journal keeps every candidate scored so far"):
                os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is sentinel  # put back after the command
    finally:
        signal.signal(signal.SIGTERM, original)
    assert e.value.exit_code == 130
    assert capsys.readouterr().err.strip() == ("interrupted: nothing was written at the target path; the journal keeps "
                                               "every candidate scored so far")


def test_claims_that_cannot_apply_are_one_line(capsys):
    """QA (a new user's compare of two experts): six SKIPPED rows of the papers' claims, every run."""
    from safemerge.cli.report import _print

    skipped = {"verdict": "SKIPPED", "text": "MergeAlign is safer than the expert", "detail": "no model 'mergealign'"}
    _print({"claims": [skipped] * 6, "html": "r.html", "markdown": "r.md"})
    text = " ".join(capsys.readouterr().out.split())
    assert "none of the papers' 6 claims applies to these models (no model 'mergealign'" in text and "SKIPPED" not in text
    _print({"claims": [skipped, {**skipped, "verdict": "PASS"}], "html": "r.html", "markdown": "r.md"})
    assert "SKIPPED" in capsys.readouterr().out  # where one applies, the table lists them all


@pytest.mark.parametrize("name", ["merge", "mergealign", "compare", "multimerge", "search", "extract-lora", "publish"])
def test_help_at_80_columns_shows_whole_option_names(name):
    """QA (a new user's walkthrough): at 80 columns (and in a pipe) --help cut names short (`--tokenizer-sour…`),
    squeezed by a column of `--no-X` forms of flags that are off by default, which turn nothing off; then by
    `-j`'s `<int range> [x>=1]` (now `N`) and by a store path that could not wrap (`--store`'s help)."""
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "from safemerge.cli import main; main()", name, "--help"],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"})
    assert r.returncode == 0 and "…" not in r.stdout and "--no-overwrite" not in r.stdout, r.stdout
    assert name in ("compare", "publish") or "--no-progress" in r.stdout  # a flag on by default keeps its --no- form


def test_short_help_everywhere():
    for args in (["-h"], ["merge", "-h"], ["eval", "safety", "-h"], ["testbed", "build", "-h"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0 and "Usage" in r.output, (args, r.output)


def test_device_auto_merges_where_torch_computes(tmp_path, tiny_family):
    """--device auto (as evaluation and search take it) on every merge command: cuda when torch sees a GPU, else cpu."""
    import torch

    from safemerge.align.run import _device
    from safemerge.engine import check_device

    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert check_device("auto") == _device("auto") == here
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(tiny_family["base"]),
                                   "models": [{"model": str(tiny_family["expert"]), "parameters": {"weight": 0.5}}]}))
    for device in ("auto", "cpu"):
        r = runner.invoke(app, ["merge", str(cfg), str(tmp_path / device), "--device", device, "--no-progress"])
        assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    a, b = (load_file(next((tmp_path / d).glob("*.safetensors"))) for d in ("auto", "cpu"))
    assert here != "cpu" or all(torch.equal(a[k], b[k]) for k in b)
    r = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "x"), "--device", "tpu"])
    assert r.exit_code == 2 and "auto" in r.output


def test_dtype_auto_means_the_models_own(tmp_path, tiny_family):
    r = runner.invoke(app, ["mergealign", str(tmp_path / "ma"), "--base", str(tiny_family["base"]), "--domain",
                            str(tiny_family["expert"]), "--aligned", str(tiny_family["aligned"]), "--dtype", "auto",
                            "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["dtype"] == "float32"
    assert "dtype" not in yaml.safe_load((tmp_path / "ma" / "mergekit_config.yml").read_text())
    r = runner.invoke(app, ["extract-lora", str(tiny_family["expert"]), str(tmp_path / "lora"), "--base",
                            str(tiny_family["base"]), "--rank", "2", "--dtype", "auto", "--svd", "randomized",
                            "--seed", "3", "--no-progress"])
    assert r.exit_code == 0, r.output


def test_list_options_take_commas_and_repeats(monkeypatch, tmp_path):
    """--domains kept only its last value when repeated, and --skip search,align was refused as one unknown stage."""
    import safemerge.repro
    import safemerge.testbed

    seen = {}

    def fake_repro(**kw):
        seen.update(kw)
        raise ConfigError("stop here")

    monkeypatch.setattr(safemerge.repro, "repro", fake_repro)
    r = runner.invoke(app, ["repro", "--domains", "finance", "--domains", "medicine", "--skip", "search,align",
                            "--out", str(tmp_path)])
    assert r.exit_code == 2 and "stop here" in r.output
    assert seen["domains"] == "finance,medicine" and seen["skip"] == ["search", "align"]

    def fake_build(out, **kw):
        seen.update(kw)
        raise ConfigError("stop here")

    monkeypatch.setattr(safemerge.testbed, "build_testbed", fake_build)
    r = runner.invoke(app, ["testbed", "build", str(tmp_path / "tb"), "--domains", "finance", "--domains",
                            "medicine", "--no-progress"])
    assert r.exit_code == 2 and seen["domains"] == ["finance", "medicine"] and seen["progress"] is False


def test_progress_switch_on_evaluation_commands(monkeypatch):
    import safemerge.evaluate

    seen = []

    def fake(*a, progress, **kw):
        seen.append(progress)
        raise SafemergeError("stop here")

    monkeypatch.setattr(safemerge.evaluate, "evaluate_safety", fake)
    for extra, shown in (([], True), (["--no-progress"], False), (["--json"], False)):
        r = runner.invoke(app, ["eval", "safety", "m", "--prompts", "p.jsonl", *extra])
        assert r.exit_code == 2 and seen[-1] is shown, (extra, r.output)


def test_seeds_out_refuses_to_replace_a_file(tmp_path, monkeypatch):
    import safemerge.report.seeds

    monkeypatch.setattr(safemerge.report.seeds, "seeds_table", lambda runs: "| table |\n")
    target = tmp_path / "seeds.md"
    target.write_text("my notes")
    r = runner.invoke(app, ["seeds", "a", "--out", str(target)])
    assert r.exit_code == 2 and "--overwrite" in r.output and target.read_text() == "my notes"
    r = runner.invoke(app, ["seeds", "a", "--out", str(target), "--overwrite"])
    assert r.exit_code == 0 and target.read_text() == "| table |\n"
    r = runner.invoke(app, ["seeds", "a", "--out", str(tmp_path / "new" / "seeds.md")])  # was FileNotFoundError
    assert r.exit_code == 0 and (tmp_path / "new" / "seeds.md").read_text() == "| table |\n"
    run = tmp_path / "s0"
    run.mkdir()
    (run / "results.json").write_text("{}")
    for given in (run, run / "results.json"):  # review: --overwrite replaced a run's results with the table
        r = runner.invoke(app, ["seeds", str(given), "--out", str(run / "results.json"), "--overwrite"])
        assert r.exit_code == 2 and "results.json: is the" in r.output and (run / "results.json").read_text() == "{}"


def test_output_options_share_their_names():
    """multimerge takes --out as the other commands do (--out-path, mergekit-multi's name, stays); publish gates
    on --safety-prompts as audit and compare name that file (--safety-data stays)."""
    from safemerge.cli import command

    cmds = command().commands
    names = lambda cmd: {o for p in cmd.params for o in p.opts}  # noqa: E731
    assert {"--out", "--out-path"} <= names(cmds["multimerge"])
    assert {"--safety-prompts", "--safety-data"} <= names(cmds["publish"])


def test_hidden_aliases_are_the_same_option(monkeypatch, tmp_path, tiny_family):
    """extract-lora's --max-rank (mergekit's name) and publish's --safety-data are hidden from --help (their pairs
    cut the option column short at 80 columns) but taken as --rank and --safety-prompts; both at once is an error."""
    import safemerge.extract
    import safemerge.publishing

    seen = {}
    monkeypatch.setattr(safemerge.extract, "extract_lora", lambda *a, **k: seen.update(rank=k["rank"]) or 1 / 0)
    for flags, want in (([], 128), (["--max-rank", "7"], 7), (["--rank", "5"], 5)):
        runner.invoke(app, ["extract-lora", str(tiny_family["expert"]), str(tmp_path / "l"), "--base",
                            str(tiny_family["base"]), *flags])
        assert seen.pop("rank") == want, flags
    r = runner.invoke(app, ["extract-lora", "m", "o", "--base", "b", "--rank", "5", "--max-rank", "7"])
    assert r.exit_code == 2 and "--rank and --max-rank are one option; give it once" in r.output
    monkeypatch.setattr(safemerge.publishing, "publish", lambda *a, **k: seen.update(data=k["safety_data"]) or 1 / 0)
    runner.invoke(app, ["publish", str(tmp_path), "me/x", "--safety-data", "h.jsonl"])
    assert seen.pop("data") == "h.jsonl"
    r = runner.invoke(app, ["publish", str(tmp_path), "me/x", "--safety-data", "a", "--safety-prompts", "b"])
    assert r.exit_code == 2 and "are one option" in r.output


@pytest.mark.parametrize("args", [["repro", "--out", "OUT", "--domains", "medicine", "--domains", "medicine"],
                                  ["repro", "--out", "OUT", "--skip", "align,search,align"],
                                  ["testbed", "build", "OUT", "--domains", "medicine,finance,medicine"]])
def test_a_name_given_twice_in_a_list_option_is_refused(tmp_path, args):
    """Review: `repro --domains medicine --domains medicine` dropped the repeat and ran a one-domain reproduction (a
    typo for another domain); the lists of names refuse a repeat before any work."""
    r = CliRunner().invoke(app, [str(tmp_path / "out") if a == "OUT" else a for a in args])
    assert r.exit_code == 2 and "given twice; give each name once" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_json_output_turns_the_progress_bars_off(monkeypatch, tmp_path):
    """Review: `--json` left merge's, mergealign's and align's bars on, where the README says it turns them off."""
    import safemerge
    import safemerge.align as al

    seen = {}

    def record(name):
        def fake(*args, **kwargs):
            seen[name] = kwargs["progress"]
            raise SystemExit(0)
        return fake

    for name in ("merge", "mergealign"):
        monkeypatch.setattr(safemerge, name, record(name))
    monkeypatch.setattr(al, "align", record("align"))
    runner.invoke(app, ["merge", "c.yml", str(tmp_path / "o"), "--json"])
    runner.invoke(app, ["mergealign", str(tmp_path / "o"), "--base", "b", "--domain", "d", "--aligned", "a", "--json"])
    runner.invoke(app, ["align", "m", str(tmp_path / "o"), "--data", "p.jsonl", "--json"])
    assert seen == {"merge": False, "mergealign": False, "align": False}
    runner.invoke(app, ["merge", "c.yml", str(tmp_path / "o")])
    assert seen["merge"] is True
