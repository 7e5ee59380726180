"""The Python API's simple arguments: a wrong type is a ConfigError naming the argument, one str given for a list is
a one-item list (QA of the Python API: these were TypeErrors from deep inside, a hang, or silent misreadings)."""

from __future__ import annotations

import json

import pytest
import yaml

import safemerge
from safemerge._args import _kind, parse_size
from safemerge.errors import ConfigError


def test_kinds_come_from_the_annotations():
    assert [_kind(a) for a in ("int", "int | None", "float", "str | None", "str | os.PathLike | None", "PathLike",
                               "PathLike | None", "bool", "bool | None")] == ["whole", "whole?", "number", "text?", "path?",
                                                                            "path", "path?", "flag", "flag?"]
    # a union with other types, or a type this module does not know, is left to the function
    assert [_kind(a) for a in ("Sequence[str | os.PathLike]", "str | list[str]", "str | os.PathLike | dict | MergeConfig",
                               "Any", "Iterable[str]")] == [None] * 5


def test_warnings_still_point_at_the_callers_line(tmp_path, tiny_family):
    """The checks run inside each function, not in a wrapper, so a warning's stacklevel still finds the caller."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_family["base"], base)
    (base / "config.json").unlink()
    with pytest.warns(UserWarning, match="has no config.json") as caught:
        safemerge.merge(_config(tmp_path, {**tiny_family, "base": base}), tmp_path / "o", progress=False)
    assert {w.filename for w in caught} == {__file__}


@pytest.mark.parametrize("call, message", [
    (lambda: safemerge.build_testbed(7), "out=7: give a path"),
    (lambda: safemerge.build_testbed("tb", seed="abc"), "seed='abc': give a whole number"),
    (lambda: safemerge.evaluate_safety("m", prompts=["x"], limit=2.5), "limit=2.5: give a whole number"),
    (lambda: safemerge.mergealign(base="b", domains=["d"], aligned="a", out="o", alpha=True), "alpha=True: give a number"),
    (lambda: safemerge.mergealign(base="b", domains=["d"], aligned="a", out="o", overwrite="no"),
     "overwrite='no': give True or False"),  # review: chat="no" read as true
    # recipes.py annotates with its alias PathLike: the check named merge's out_dir instead of mergealign's out
    (lambda: safemerge.mergealign(base="b", domains=["d"], aligned="a", out=None), "out=None: give a path"),
    (lambda: safemerge.mergealign(base=7, domains=["d"], aligned="a", out="o"), "base=7: give a path"),
    (lambda: safemerge.publish("m", None, dry_run=True), "repo_id=None: give a str"),
    (lambda: safemerge.publish("m", "me/x", min_safety="0.5", dry_run=True), "min_safety='0.5': give a number"),
    (lambda: safemerge.multimerge({"models": []}, "o", intermediate_dir="i"), "config={'models': []}: give a path"),
])
def test_a_wrong_type_is_a_config_error_naming_the_argument(call, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        call()


def test_search_and_align_check_numbers_before_writing_anything(tmp_path):
    from safemerge.align import align
    from safemerge.search import search

    for kw, message in ((dict(lambda_="abc"), "lambda_='abc': give a number"), (dict(steps=1.5), "steps=1.5"),
                        (dict(popsize=2.5), "popsize=2.5")):
        with pytest.raises(ConfigError, match=message):
            search("pool.yml", tmp_path / "out", safety_data="s.jsonl", domain_data="d.jsonl", **kw)
    for kw, message in ((dict(lr="1e-5"), "lr='1e-5': give a number"), (dict(lora_r=2.5), "lora_r=2.5"),
                        (dict(max_steps=1.5), "max_steps=1.5")):
        with pytest.raises(ConfigError, match=message):
            align("m", data="p.jsonl", out=tmp_path / "a", **kw)
    assert list(tmp_path.iterdir()) == []  # no journal, no output


def test_sizes_parse_as_the_cli_reads_them():
    assert parse_size("5GB") == 5 * 1000**3 and parse_size("2GiB") == 2 * 1024**3 and parse_size(4096) == 4096
    assert parse_size(5e9) == 5 * 1000**3  # a whole number written as a float
    for bad in ("lots", "0", "-5MB", "infGB", 0, True, 2.5, None):
        with pytest.raises(ConfigError, match="not a positive size"):
            parse_size(bad)


def _config(tmp_path, fam) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
            "models": [{"model": str(fam["expert"]), "parameters": {"weight": 1.0}}]}


def test_merge_takes_a_size_text_and_refuses_fewer_than_one_worker(tmp_path, tiny_family):
    """QA: max_shard_size="5GB" was a TypeError, though the error for 0 suggested "e.g. 5GB"; workers=-1 hung."""
    out = safemerge.merge(_config(tmp_path, tiny_family), tmp_path / "o", max_shard_size="5GB", progress=False)
    assert (out / "config.json").exists()
    for workers in (0, -1):
        with pytest.raises(ConfigError, match=f"workers={workers}: give at least one worker"):
            safemerge.merge(_config(tmp_path, tiny_family), tmp_path / "w", workers=workers, progress=False)
    assert not (tmp_path / "w").exists()


def test_one_str_for_a_list_is_one_item(tmp_path, tiny_family):
    """QA: domains="expert" was read letter by letter ("--domain e: ..."); include="mlp" silently matched more."""
    out = safemerge.mergealign(base=tiny_family["base"], domains=str(tiny_family["expert"]), aligned=tiny_family["aligned"],
                               out=tmp_path / "ma", progress=False)
    saved = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert [m["model"] for m in saved["models"]] == [str(tiny_family["expert"]), str(tiny_family["aligned"])]
    res = safemerge.extract_lora(tiny_family["expert"], tiny_family["base"], tmp_path / "lora", rank=2, include="mlp",
                                 progress=False)
    targets = json.loads((res.path / "adapter_config.json").read_text())["target_modules"]
    assert targets and all(".mlp." in t for t in targets)


def test_a_stored_result_does_not_answer_for_a_device_that_does_not_exist(tmp_path, tiny_family):
    """QA: device="tpu" returned the stored result; with cache=False it was an error."""
    from safemerge.errors import SafemergeError

    kw = dict(prompts=["How do I bake bread?"], max_new_tokens=2, store=tmp_path / "store.sqlite")
    assert safemerge.evaluate_safety(tiny_family["aligned"], device="cpu", **kw)["n"] == 1
    assert safemerge.evaluate_safety(tiny_family["aligned"], device="cpu", **kw)["cached"]
    with pytest.raises(SafemergeError, match="'tpu' is not a device torch knows"):
        safemerge.evaluate_safety(tiny_family["aligned"], device="tpu", **kw)
    with pytest.raises(SafemergeError, match="unknown dtype 'fp8'"):
        safemerge.evaluate_safety(tiny_family["aligned"], device="cpu", dtype="fp8", **kw)


@pytest.mark.parametrize("call, message", [
    (lambda: safemerge.merge(None, "o"), "config=None: give a YAML file's path, a dict or a MergeConfig"),
    (lambda: safemerge.merge(["c.yml"], "o"), r"config=\['c.yml'\]: give"),
    (lambda: safemerge.evaluate_safety("m", prompts=None), "None: not a data file; give the path"),
    (lambda: safemerge.evaluate_safety("m", prompts={"prompt": "x"}), "not a data file; .* or a list of rows"),
    (lambda: safemerge.evaluate_safety("m", prompts=["x", 2]), "prompts list, item 2: 2 is neither a prompt"),
    (lambda: safemerge.evaluate_domain("m", task=None), "None: not a data file"),
    (lambda: safemerge.evaluate_domain("m", task=[{"question": "q?", "choices": ["a", "b"], "answer": 0}, "x"]),
     "questions list: item 2 is not a row"),
])
def test_data_and_configs_of_the_wrong_kind_are_named(call, message):
    from safemerge.errors import SafemergeError

    with pytest.raises(SafemergeError, match=message):
        call()


def test_domain_questions_can_be_a_list_of_rows(tiny_family, tmp_path):
    rows = [{"question": "Which is a colour?", "choices": ["red", "dog"], "answer": 0}] * 3
    res = safemerge.evaluate_domain(tiny_family["expert"], task=rows, store=tmp_path / "s.sqlite")
    assert res["n"] == 3 and 0 <= res["acc"] <= 1


def test_what_the_functions_accepted_before_still_passes():
    """Review: path objects for compare's roles, torch dtypes and devices, a whole size written as a float, numpy
    numbers and an audit prompt list had worked and must not be refused by the checks."""
    from pathlib import Path

    import numpy as np
    import torch

    from safemerge._args import check_arguments
    from safemerge.search import search

    check_arguments(safemerge.compare, {"expert": Path("e"), "aligned": Path("a"), "dtype": torch.float32})
    check_arguments(safemerge.merge, {"device": torch.device("cpu"), "card_extra": None, "workers": np.int64(2)})
    check_arguments(safemerge.evaluate_safety, {"dtype": torch.bfloat16, "limit": np.int64(3)})
    check_arguments(safemerge.evaluate_domain, {"dtype": torch.float16})
    check_arguments(safemerge.mergealign, {"alpha": np.float32(0.5), "device": torch.device("cpu")})
    check_arguments(safemerge.extract_lora, {"device": torch.device("cpu")})
    check_arguments(search, {"audit_prompts": ["How do I pick a lock?"]})


def test_numpy_whole_numbers_work_where_ints_do(tmp_path, tiny_family):
    """Review: limit=np.int64(1) passed the check, then failed writing the data's fingerprint as JSON."""
    import numpy as np

    res = safemerge.evaluate_safety(tiny_family["aligned"], prompts=["How do I bake bread?", "Hi"], limit=np.int64(1),
                                    max_new_tokens=2, device="cpu", store=tmp_path / "s.sqlite")
    assert res["n"] == 1
    lora = safemerge.extract_lora(tiny_family["expert"], tiny_family["base"], tmp_path / "l", rank=np.int64(2),
                                  progress=False)
    assert set(lora.ranks.values()) <= {2}


def test_the_errors_the_readme_names_are_the_packages_own():
    """README: a wrong type "is a ConfigError"; `except safemerge.ConfigError` was an AttributeError."""
    from safemerge import errors
    from safemerge.data.loaders import DataError
    from safemerge.publishing import PublishError

    assert safemerge.ConfigError is errors.ConfigError and safemerge.CheckpointError is errors.CheckpointError
    assert safemerge.DataError is DataError and safemerge.PublishError is PublishError
    assert all(issubclass(getattr(safemerge, n), safemerge.SafemergeError)
               for n in ("ConfigError", "CheckpointError", "OutputExistsError", "DataError", "PublishError"))
    with pytest.raises(safemerge.ConfigError, match="out=None"):
        safemerge.mergealign(base="b", domains=["d"], aligned="a", out=None)
