"""`safemerge compare`: any models evaluated side by side into results.json and the knowledge-safety report."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.comparison import compare, infer_method, parse_models
from safemerge.errors import SafemergeError

LIMITS = dict(limit=12, domain_limit=12, max_new_tokens=16)


@pytest.fixture(scope="module")
def pool(micro_testbed, tmp_path_factory):
    """The micro family, its MergeAlign and an LM-Cocktail search's best (λ = 0), written as users write them."""
    from safemerge.recipes import mergealign
    from safemerge.search import search

    tb, root = micro_testbed, tmp_path_factory.mktemp("pool")
    mergealign(base=tb / "base", domains=[tb / "expert-medicine"], aligned=tb / "aligned", out=root / "ma", progress=False)
    search({"merge_method": "linear", "models": [{"model": str(tb / m), "parameters": {"weight": 0.5}}
                                                 for m in ("expert-medicine", "aligned")]},
           root / "cocktail", optimizer="cocktail", lambda_=0, domain_data=tb / "data" / "domain-medicine_train.jsonl",
           limit=4, audit=False, progress=False)
    return {"base": tb / "base", "aligned": tb / "aligned", "expert-medicine": tb / "expert-medicine",
            "mergealign": root / "ma", "cocktail-unsafe": root / "cocktail", "data": tb / "data"}


def _specs(pool):
    return [str(pool["base"]), str(pool["aligned"]), str(pool["expert-medicine"]), f"mergealign={pool['mergealign']}",
            f"cocktail-unsafe={pool['cocktail-unsafe']}"]


def test_every_model_is_evaluated_as_the_evaluators_do_and_reported(pool, tmp_path, monkeypatch):
    import shutil

    import safemerge.evaluate as ev
    from safemerge.evaluate import evaluate_domain, evaluate_safety, similarity

    d = pool["data"]
    medqa = shutil.copy(d / "domain-medicine_test.jsonl", tmp_path / "medqa.jsonl")  # a name without its domain's
    kw = dict(safety_prompts=d / "safety_test.jsonl", domain_tasks=[f"medicine={medqa}"],
              general_task=d / "general_test.jsonl", expert="expert-medicine", aligned=str(pool["aligned"]) + "/",
              store=tmp_path / "store.sqlite", progress=False, **LIMITS)
    done = compare(_specs(pool), tmp_path / "cmp", **kw)
    doc = json.loads((tmp_path / "cmp" / "results.json").read_text())
    rows = doc["models"]
    assert doc["meta"]["domains"] == ["medicine"]
    assert doc["meta"]["domain_task_files"] == f"medicine: {medqa}"  # the report names the file behind a column
    assert doc["meta"]["general_task_file"] == str(d / "general_test.jsonl")
    # review: the settings the figures depend on were left out of the record
    assert (doc["meta"]["max_new_tokens"], doc["meta"]["format"]) == (LIMITS["max_new_tokens"], "plain")
    assert f"medicine: {medqa}" in done["report"]["markdown"].read_text()
    assert list(rows) == ["base", "aligned", "expert-medicine", "mergealign", "cocktail-unsafe"]
    assert {n: r["method"] for n, r in rows.items()} == {
        "base": "pretrained", "aligned": "aligned", "expert-medicine": "expert", "mergealign": "mergealign",
        "cocktail-unsafe": "cocktail"}
    assert rows["mergealign"]["params"] == {"alpha": 1.0, "beta": 1.0}
    assert rows["cocktail-unsafe"]["params"]["lambda"] == 0 and rows["cocktail-unsafe"]["params"]["optimizer"] == "cocktail"
    for name in ("expert-medicine", "mergealign"):  # the figures are the evaluators' own (a fresh store: computed anew)
        path = pool[name]
        s = evaluate_safety(path, prompts=d / "safety_test.jsonl", limit=12, max_new_tokens=16, cache=False,
                            store=tmp_path / "other.sqlite")
        assert rows[name]["safety"] == {"safety_test": s["safe_rate"]}
        acc = evaluate_domain(path, task=medqa, limit=12, cache=False, store=tmp_path / "other.sqlite")["acc"]
        assert rows[name]["domain"] == {"medicine": acc}
        pairs = similarity([path, pool["expert-medicine"], pool["aligned"]])["pairs"]
        assert rows[name]["l2"] == {"expert": pairs[0]["l2"], "aligned": pairs[1]["l2"]}
    assert rows["expert-medicine"]["l2"]["expert"] == 0.0 and rows["mergealign"]["l2"]["expert"] > 0
    assert rows["expert-medicine"]["safety"]["safety_test"] == 0.0 and rows["aligned"]["safety"]["safety_test"] > 0.5
    report = done["report"]
    assert set(report["figures"]) == {"knowledge_safety", "l2"} and report["figures"]["knowledge_safety"].read_bytes()[:4] == b"\x89PNG"
    verdicts = {c["text"]: c["verdict"] for c in report["claims"]}
    assert verdicts["MergeAlign's safety ≥ 0.9 × the aligned model's"] in ("PASS", "FAIL")  # found by its name, judged
    assert verdicts["MergeAlign's domain accuracy ≥ 0.9 × the expert's"] in ("PASS", "FAIL")  # medqa is medicine's task
    assert "| cocktail-unsafe | LM-Cocktail | no | 0 |" in report["markdown"].read_text()

    def nothing_again(*a, **k):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(ev, "similarity", nothing_again)  # every figure, L2 too, is looked up the second time
    again = compare(_specs(pool), tmp_path / "cmp", overwrite=True, **kw)
    assert again["models"] == done["models"]


def test_errors_come_before_any_evaluation_and_write_nothing(pool, tmp_path):
    d = pool["data"]
    kw = dict(safety_prompts=d / "safety_test.jsonl", progress=False, store=tmp_path / "s.sqlite")
    with pytest.raises(SafemergeError, match="missing-model"):
        compare([str(pool["base"]), str(tmp_path / "missing-model")], tmp_path / "a", **kw)
    with pytest.raises(SafemergeError, match="two models are named base"):
        compare([str(pool["base"]), f"base={pool['aligned']}"], tmp_path / "a", **kw)
    with pytest.raises(SafemergeError, match="need both --expert and --aligned"):
        compare([str(pool["base"])], tmp_path / "a", expert="base", **kw)
    with pytest.raises(SafemergeError, match="unknown judge"):
        compare([str(pool["base"])], tmp_path / "a", judge="keywords", **kw)
    with pytest.raises(SafemergeError, match="nope.jsonl"):
        compare([str(pool["base"])], tmp_path / "a", domain_tasks=[tmp_path / "nope.jsonl"], **kw)
    assert not (tmp_path / "a").exists() and not (tmp_path / "s.sqlite").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text("{}")
    with pytest.raises(SafemergeError, match="already exists; pass --overwrite"):
        compare([str(pool["base"])], tmp_path / "b", **kw)
    assert (tmp_path / "b" / "results.json").read_text() == "{}" and not (tmp_path / "s.sqlite").exists()
    (tmp_path / "file").write_text("")
    (tmp_path / "not-a-model").mkdir()
    for bad, match in ((dict(out=tmp_path / "file" / "cmp"), "is a file, so nothing can be written under it"),
                       (dict(format="mc"), "--format 'mc': choose one of plain, chat"),
                       (dict(models=[str(tmp_path / "not-a-model")]), "not-a-model"),
                       (dict(knowledge="law", domain_tasks=[d / "domain-medicine_test.jsonl"]), "--knowledge law: no domain task"),
                       (dict(out=pool["base"] / "cmp"), "lies in the model folder"),
                       (dict(batch_size=0), "--batch-size 0: must be a whole number"),
                       (dict(models=[f"my model={pool['base']}"]), "the NAME is letters, digits"),
                       (dict(domain_tasks=["medicine="]), "needs a path after '='"),
                       (dict(models=[str(pool["base"]), str(pool["base"] / "model.safetensors")]), "is a file; evaluation needs"),
                       # QA: the same model under two names (here a trailing slash) was evaluated and listed twice
                       (dict(models={"a": str(pool["base"]), "b": str(pool["base"]) + "/"}),
                        r"b=.*/: the same model as a=.*; compare each model once"),
                       # a misspelt name was "no such model directory", naming neither the names nor the option
                       (dict(models={"base": str(pool["base"]), "expert-medicine": str(pool["expert-medicine"])},
                             expert="expert-medicin", aligned="base"),
                        r"--expert expert-medicin: no model of that name \(the names are base, expert-medicine\).*"
                        r"did you mean 'expert-medicine'")):
        args = {"models": [str(pool["base"])], "out": tmp_path / "c", **kw, **bad}
        with pytest.raises(SafemergeError, match=match):
            compare(args.pop("models"), args.pop("out"), **args)
    assert not (tmp_path / "c").exists() and not (tmp_path / "s.sqlite").exists()
    # review: a model whose tensors the L2 distances cannot compare failed after the first model's evaluations
    import shutil

    from safetensors.torch import load_file, save_file
    wider = tmp_path / "wider"
    shutil.copytree(pool["aligned"], wider)
    weights = load_file(wider / "model.safetensors")
    name = next(n for n in weights if n.endswith("norm.weight"))
    weights[name] = torch.cat([weights[name], weights[name][:1]])
    save_file(weights, wider / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SafemergeError, match=rf"tensor '{name}' has shape .*The L2 distances compare wider with "
                                             "--expert and --aligned .* leave out --expert and --aligned"):
        compare({"base": str(pool["base"]), "wider": str(wider), "expert": str(pool["expert-medicine"])},
                tmp_path / "c", expert="expert", aligned="base", **kw)
    assert not (tmp_path / "c").exists() and not (tmp_path / "s.sqlite").exists()


def test_an_expert_whose_domain_has_no_task_is_a_warning(pool, tmp_path, monkeypatch):
    import safemerge.comparison as cmp

    monkeypatch.setattr(cmp, "evaluate_models", lambda entries, **k: {n: {"method": e["method"]} for n, e in entries.items()})
    with pytest.warns(UserWarning, match="expert-medicine: no domain task belongs to medicine.*--domain-task medicine=FILE"):
        cmp.compare([str(pool["expert-medicine"])], tmp_path / "c", safety_prompts=pool["data"] / "safety_test.jsonl",
                    domain_tasks=[pool["data"] / "general_test.jsonl"], progress=False, store=tmp_path / "s.sqlite")


def test_an_expert_the_claims_cannot_find_is_a_warning(pool, tmp_path):
    """--expert feeds the L2 distances; the knowledge claim looks for `expert-<d>` by name."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text("{}")  # stops compare right after its checks
    specs = [f"instruct={pool['aligned']}", f"medic={pool['expert-medicine']}"]
    kw = dict(safety_prompts=pool["data"] / "safety_test.jsonl", progress=False, store=tmp_path / "s.sqlite")
    with pytest.warns(UserWarning) as seen, pytest.raises(SafemergeError, match="already exists"):
        compare(specs, tmp_path / "b", expert="medic", aligned=str(pool["aligned"]), **kw)
    text = [str(w.message) for w in seen]
    assert any(t.startswith("--expert medic: used for the L2") and "expert-<domain>=PATH" in t for t in text)
    assert not any(t.startswith("--aligned") for t in text)  # the claims find the aligned model by its method too
    with warnings.catch_warnings(), pytest.raises(SafemergeError, match="already exists"):
        warnings.simplefilter("error")  # names the claims use: no warning
        compare([f"aligned={pool['aligned']}", f"expert-medicine={pool['expert-medicine']}"], tmp_path / "b",
                expert="expert-medicine", aligned="aligned", **kw)


def test_names_and_methods(pool, tmp_path, monkeypatch):
    assert parse_models(["/m/expert-law", "merged=/x/out", "/m/base+/a/lora/"]) == {
        "expert-law": "/m/expert-law", "merged": "/x/out", "lora": "/m/base+/a/lora/"}
    assert parse_models(["/a=b/model", "base+runs/lr=1e-5/lora"]) == {  # '=' in a folder's name: still paths
        "model": "/a=b/model", "lora": "base+runs/lr=1e-5/lora"}
    with pytest.raises(SafemergeError, match="the NAME is letters"):
        parse_models(["my model=/x"])
    (tmp_path / "lr=1e-5" / "merged").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert parse_models(["lr=1e-5/merged"]) == {"merged": "lr=1e-5/merged"}  # an existing path, not NAME=PATH
    assert infer_method(str(tmp_path / "lr=1e-5" / "merged"), "Llama-3-8B-Instruct") == ("model", {})
    from safemerge.comparison import _domains
    from safemerge.naming import task_columns

    cols = task_columns(["medicine=a/medqa.jsonl", "medicine=b/pubmedqa.jsonl", "c/domain-finance_test.jsonl", "x.jsonl"])
    assert [c[0] for c in cols] == ["medicine-medqa", "medicine-pubmedqa", "domain-finance_test", "x"]
    assert _domains([c[:2] for c in cols], ["expert-finance", "base"]) == ["medicine", "finance", "x"]
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "mergekit_config.yml").write_text("merge_method: ties\nparameters: [1, 2]\nmodels: 3\n")
    assert infer_method(str(tmp_path / "odd"), "x") == ("ties", {})
    assert infer_method(str(pool["cocktail-unsafe"]), "x")[0] == "cocktail"
    assert infer_method(str(pool["mergealign"]), "x") == ("mergealign", {"alpha": 1.0, "beta": 1.0})
    # an align run given as BASE+ADAPTER (its adapter folder holds the run record) keeps its method; max_steps shows
    run = tmp_path / "dpo" / "adapter"
    run.mkdir(parents=True)
    (run / "align_run.json").write_text(json.dumps({"settings": {"method": "dpo", "lr": 8e-6, "epochs": 3,
                                                                 "max_steps": 2, "sft_weight": 0.0}}))
    assert infer_method(f"{tmp_path / 'base'}+{run}", "tuned") == \
        ("dpo", {"lr": 8e-6, "epochs": 3, "max_steps": 2, "sft_weight": 0.0})
    assert infer_method(str(pool["base"]), "expert-law") == ("expert", {})
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "mergekit_config.yml").write_text("merge_method: slerp\nparameters: {t: [0, 0.5, 1, 0.5, 0]}\n")
    assert infer_method(str(tmp_path / "s"), "x") == ("slerp", {"t": [0, 0.5, 1, 0.5, 0]})


def test_the_command_prints_each_model_and_the_claims(pool, tmp_path):
    d = pool["data"]
    r = CliRunner().invoke(app, ["compare", *_specs(pool)[1:4], "--out", str(tmp_path / "cmp"),
                                 "--safety-prompts", str(d / "safety_test.jsonl"), "--domain-task",
                                 str(d / "domain-medicine_test.jsonl"), "--limit", "12", "--domain-limit", "12",
                                 "--max-new-tokens", "16", "--store", str(tmp_path / "s.sqlite")])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "mergealign (mergealign): safety" in text and "domain-medicine_test" in text
    assert "Claims" in text and ("PASS" in text or "FAIL" in text) and "wrote" in text  # the table wraps its cells
    assert (tmp_path / "cmp" / "report.html").is_file()


def test_knowledge_takes_comma_separated_domains(pool, tmp_path):
    """README: a list of names takes commas or repeats; `--knowledge medicine,finance` was read as one domain name."""
    d = pool["data"]
    r = CliRunner().invoke(app, ["compare", *_specs(pool)[1:3], "--out", str(tmp_path / "cmp"), "--safety-prompts",
                                 str(d / "safety_test.jsonl"), "--domain-task", f"medicine={d / 'domain-medicine_test.jsonl'}",
                                 "--domain-task", f"finance={d / 'domain-finance_test.jsonl'}", "--knowledge", "medicine,law",
                                 "--store", str(tmp_path / "s.sqlite")])
    assert r.exit_code == 2, r.output
    assert "--knowledge law: no domain task" in " ".join(r.output.split())
    assert not (tmp_path / "cmp").exists()
