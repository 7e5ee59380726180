"""End-to-end searches on the tiny family: resume after a kill, the written checkpoint, the optimizers."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

import safemerge
from safemerge.checkpoint import Checkpoint
from safemerge.errors import ConfigError, OutputExistsError
from safemerge.search import search

from conftest import task_config

REPO = Path(__file__).resolve().parents[2]
CMAES = {"optimizer": "cmaes", "steps": 3, "popsize": 4, "seed": 7, "lambda_": 0.0, "progress": False}


def _run(family, data, out, **kw):
    return search(task_config(family), out, safety_data=data["safety"], domain_data=data["domain"], **{**CMAES, **kw})


def _history(result):
    return [(h["params"], h["safety_loss"], h["domain_loss"], h["objective"]) for h in result.history]


@pytest.fixture(scope="module")
def uninterrupted(tiny_family, family_data, tmp_path_factory):
    return _run(tiny_family, family_data, tmp_path_factory.mktemp("a") / "out")


class Stop(Exception):
    pass


def test_uninterrupted_run_prefers_the_expert_for_domain_data(uninterrupted):
    assert uninterrupted.candidates == 13 and uninterrupted.scored == 13  # the start, then 3 generations of 4
    start = uninterrupted.history[0]
    assert start["params"] == {"expert.weight": 0.5, "aligned.weight": 0.5}  # the config's own weights, scored first
    assert uninterrupted.score.objective <= start["objective"]
    p = uninterrupted.params
    assert p["expert.weight"] > p["aligned.weight"]  # λ = 0: the expert wrote the domain data


def test_resume_after_an_interrupt_ends_with_the_same_best(tiny_family, family_data, tmp_path, uninterrupted):
    def stop_at_5(idx, cand, score, replayed):
        if idx == 5:
            raise Stop

    with pytest.raises(Stop):
        _run(tiny_family, family_data, tmp_path / "out", on_result=stop_at_5)
    assert not (tmp_path / "out").exists()
    with _journal_rows(tmp_path / "out.journal.sqlite") as rows:
        assert [r[0] for r in rows] == list(range(6))  # each written before the next candidate was scored
    resumed = _run(tiny_family, family_data, tmp_path / "out", resume=True)
    assert (resumed.scored, resumed.candidates) == (7, 13)
    assert resumed.params == uninterrupted.params and resumed.score == uninterrupted.score
    assert _history(resumed) == _history(uninterrupted)


def test_resume_after_sigkill_ends_with_the_same_best(tiny_family, family_data, tmp_path, uninterrupted):
    code = f"""
import os, signal, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
torch.set_num_threads(1)
from test_search import _run
def kill_at_6(idx, cand, score, replayed):
    if idx == 6:
        os.kill(os.getpid(), signal.SIGKILL)
_run({ {k: str(v) for k, v in tiny_family.items()} !r}, { {k: str(v) for k, v in family_data.items()} !r}, {str(tmp_path / 'out')!r}, on_result=kill_at_6)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    resumed = _run(tiny_family, family_data, tmp_path / "out", resume=True)
    assert (resumed.scored, resumed.candidates) == (6, 13)
    assert resumed.params == uninterrupted.params and _history(resumed) == _history(uninterrupted)


@contextlib.contextmanager
def _journal_rows(path):
    conn = sqlite3.connect(path)
    try:
        yield conn.execute("SELECT idx, objective FROM candidates ORDER BY idx").fetchall()
    finally:
        conn.close()


def test_the_output_is_the_best_merge_and_its_yaml_reproduces_it(uninterrupted, tmp_path):
    out = uninterrupted.out
    saved = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert [m["parameters"]["weight"] for m in saved["models"]] == [uninterrupted.params["expert.weight"],
                                                                    uninterrupted.params["aligned.weight"]]
    safemerge.merge(out / "mergekit_config.yml", tmp_path / "again", progress=False)
    a, b = Checkpoint(out), Checkpoint(tmp_path / "again")
    assert all(torch.equal(a.get(n), b.get(n)) for n in a.names())
    summary = json.loads((out / "search.json").read_text())
    assert summary["best"]["objective"] == min(h["objective"] for h in summary["history"])
    assert len(summary["history"]) == 13
    assert summary["device"] == uninterrupted.device == ("cuda" if torch.cuda.is_available() else "cpu")  # "auto"


def test_a_finished_cmaes_run_resumes_with_more_steps(tiny_family, family_data, tmp_path, uninterrupted):
    """cma's first generations do not depend on how many follow: 1 step, then --resume --steps 3, is the 3-step run;
    and --steps 2 on that journal replays the 2-step run."""
    short = _run(tiny_family, family_data, tmp_path / "out", steps=1)
    assert short.candidates == 5
    with pytest.raises(OutputExistsError, match="--resume, --overwrite keeps the journal"):
        _run(tiny_family, family_data, tmp_path / "out", resume=True)
    longer = _run(tiny_family, family_data, tmp_path / "out", resume=True, overwrite=True)  # steps 3 (CMAES)
    assert (longer.scored, longer.candidates) == (8, 13)
    assert longer.params == uninterrupted.params and _history(longer) == _history(uninterrupted)
    shorter = _run(tiny_family, family_data, tmp_path / "out", resume=True, overwrite=True, steps=2)  # a prefix: replayed
    assert (shorter.scored, shorter.candidates) == (0, 9) and _history(shorter) == _history(uninterrupted)[:9]
    assert shorter.score.objective == min(h[3] for h in _history(uninterrupted)[:9])


def test_resume_of_another_search_and_reuse_without_resume_are_errors(tiny_family, family_data, uninterrupted, tmp_path):
    with pytest.raises(ConfigError, match="different search .*differs in: lambda"):
        _run(tiny_family, family_data, tmp_path / "x", journal=uninterrupted.journal, resume=True, lambda_=0.5)
    # steps may change on a resume, so it is not named as a cause beside one that may not ("lambda, steps" before)
    with pytest.raises(ConfigError, match=r"differs in: lambda\)"):
        _run(tiny_family, family_data, tmp_path / "x", journal=uninterrupted.journal, resume=True, lambda_=0.5, steps=2)
    with pytest.raises(OutputExistsError, match="pass --resume"):
        _run(tiny_family, family_data, tmp_path / "y", journal=uninterrupted.journal)


def test_resume_after_the_chat_template_changed_is_an_error(tiny_family, family_data, tmp_path):
    """The identity held the weights' fingerprints only: a journal scored under another template was resumed, mixing
    two objectives."""
    import shutil

    fam = {k: tmp_path / "fam" / k for k in tiny_family}
    for k, v in tiny_family.items():
        shutil.copytree(v, fam[k])
    first = _run(fam, family_data, tmp_path / "a", steps=1)
    (fam["base"] / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    with pytest.raises(ConfigError, match="differs in: tokenizer"):
        _run(fam, family_data, tmp_path / "a", steps=1, journal=first.journal, resume=True, overwrite=True)
    # review: an edited config.json (the model the candidates are built as) replayed the old scores
    fam = {k: tmp_path / "fam2" / k for k in tiny_family}
    for k, v in tiny_family.items():
        shutil.copytree(v, fam[k])
    first = _run(fam, family_data, tmp_path / "b", steps=1)
    config = json.loads((fam["base"] / "config.json").read_text())
    (fam["base"] / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.5}))
    with pytest.raises(ConfigError, match="differs in: model_config"):
        _run(fam, family_data, tmp_path / "b", steps=1, journal=first.journal, resume=True, overwrite=True)


@pytest.mark.parametrize("sigma0", [0.25, 0.4])
def test_cmaes_searches_slerps_t_alone(tiny_family, family_data, tmp_path, sigma0):
    """One dimension (SLERP's t): cma 4.5 failed with "not yet initialized (dimension needed)" once its step size
    reached a third of the range, at once with sigma0 0.4 and partway through otherwise."""
    config = {"merge_method": "slerp", "base_model": str(tiny_family["base"]), "parameters": {"t": 0.2},
              "models": [{"model": str(tiny_family["base"])}, {"model": str(tiny_family["expert"])}]}
    r = search(config, tmp_path / "s", optimizer="cmaes", steps=6, popsize=4, sigma0=sigma0, lambda_=0.0,
               safety_data=family_data["safety"], domain_data=family_data["domain"], progress=False)
    ts = [h["params"]["t"] for h in r.history]
    assert len(ts) == 25 and ts[0] == 0.2 and all(0.0 <= t <= 1.0 for t in ts)
    assert r.params["t"] > 0.5  # the domain data are the expert's answers: t moves towards the expert (t = 1)


def test_grid_shares_one_weight_and_density(tiny_family, family_data, tmp_path):
    config = {**task_config(tiny_family, "ties", density=0.5), "parameters": {"normalize": False}}
    r = search(config, tmp_path / "g", optimizer="grid", steps=2,
               safety_data=family_data["safety"], domain_data=family_data["domain"], progress=False)
    points = [h["params"] for h in r.history]
    assert points == [{"expert.weight": w, "expert.density": d, "aligned.weight": w, "aligned.density": d}
                      for w in (0.5, 1.0) for d in (0.1, 1.0)]
    assert r.score.objective == min(h["objective"] for h in r.history)


def test_grid_skips_a_shared_weight_that_normalising_cancels(tiny_family):
    from safemerge.search.grid import grid_points
    from safemerge.search.space import SearchSpace

    # TIES normalises by default: Σ w·τ / Σ w is the same for every shared w, so only the density axis is searched
    points = grid_points(SearchSpace(task_config(tiny_family, "ties", density=0.5)), 3)
    assert [(p["expert.weight"], p["expert.density"]) for p in points] == [(1.0, 0.1), (1.0, 0.55), (1.0, 1.0)]
    assert len(grid_points(SearchSpace({**task_config(tiny_family, "linear"), "base_model": None}), 3)) == 1
    assert len(grid_points(SearchSpace(task_config(tiny_family, "nuslerp")), 3)) == 1  # t = w_2 / (w_1 + w_2)
    della = grid_points(SearchSpace(task_config(tiny_family, "della", density=0.5)), 3)  # della normalises
    assert [p["expert.density"] for p in della] == pytest.approx([0.16, 0.5, 0.84])  # density ± ε (0.15) inside (0, 1)
    mixed = task_config(tiny_family, "della", density=0.5)
    mixed["models"][1]["parameters"]["epsilon"] = 0.3
    assert [p["aligned.density"] for p in grid_points(SearchSpace(mixed), 2)] == pytest.approx([0.31, 0.69])
    for eps in (0.5, 0.49):  # 0.49 leaves the one density 0.5, which cma's bounds refused with their own error
        with pytest.raises(ConfigError, match=f"epsilon {eps} leaves no density to search"):
            SearchSpace({**task_config(tiny_family, "della"), "parameters": {"epsilon": eps}})
    line = grid_points(SearchSpace(task_config(tiny_family)), 3)  # task arithmetic does not normalise
    assert [p["expert.weight"] for p in line] == pytest.approx([1 / 3, 2 / 3, 1.0])


@pytest.mark.parametrize("lam, favoured", [(0.0, "expert"), (1.0, "aligned")])
def test_cocktail_weights_are_the_softmax_of_each_models_loss(tiny_family, family_data, tmp_path, lam, favoured):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safemerge.search.objective import Objective, load_pairs

    r = search(task_config(tiny_family), tmp_path / "c", optimizer="cocktail", lambda_=lam, temperature=0.5,
               safety_data=family_data["safety"], domain_data=family_data["domain"], progress=False)
    alone, mixture = r.history[:2], r.history[2]
    assert [h["params"] for h in alone] == [{"expert.weight": 1.0, "aligned.weight": 0.0},
                                            {"expert.weight": 0.0, "aligned.weight": 1.0}]
    # each one-hot candidate scores exactly as the model loaded from disk does
    objective = Objective(AutoTokenizer.from_pretrained(tiny_family["base"]), safety=load_pairs(family_data["safety"]),
                          domain=load_pairs(family_data["domain"]), lambda_=lam)
    for h, name in zip(alone, ("expert", "aligned")):
        ref = objective(AutoModelForCausalLM.from_pretrained(tiny_family[name]).eval())
        assert h["objective"] == pytest.approx(ref.objective, rel=1e-6)
    e = [math.exp(-h["objective"] / 0.5) for h in alone]
    assert list(mixture["params"].values()) == pytest.approx([v / sum(e) for v in e])
    assert r.params == mixture["params"] and r.config.merge_method == "linear"
    assert max(r.params, key=r.params.get) == f"{favoured}.weight"


def test_what_the_grid_and_cocktail_ignore_does_not_block_a_resume(tiny_family, family_data, tmp_path):
    """Review: --seed and --popsize went into every journal's identity, so a grid or LM-Cocktail run given them was
    refused on a --resume without them ("differs in: popsize, seed"), though neither optimizer uses them."""
    kw = dict(safety_data=family_data["safety"], domain_data=family_data["domain"], progress=False, audit=False)
    with pytest.warns(UserWarning, match=r"--popsize and --seed do not apply to the grid search .* \(DARE's own seed"):
        first = search(task_config(tiny_family), tmp_path / "g", optimizer="grid", steps=2, popsize=7, seed=5, **kw)
    again = search(task_config(tiny_family), tmp_path / "g", optimizer="grid", steps=2, resume=True, overwrite=True, **kw)
    assert again.scored == 0 and _history(again) == _history(first)
    import hashlib
    import sqlite3

    from safemerge.search.journal import canonical

    with sqlite3.connect(first.journal) as db:  # a journal written before: it held the seed and popsize the grid ignores
        identity = {**json.loads(db.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()[0]),
                    "seed": 5, "popsize": 7}
        text = canonical(identity)
        db.executemany("UPDATE meta SET value = ? WHERE key = ?", [
            (text, "identity"), (hashlib.blake2b(text.encode(), digest_size=16).hexdigest(), "hash")])
    again = search(task_config(tiny_family), tmp_path / "g", optimizer="grid", steps=2, resume=True, overwrite=True, **kw)
    assert again.scored == 0 and _history(again) == _history(first)
    linear = {**task_config(tiny_family, "linear"), "base_model": None}
    with pytest.warns(UserWarning, match="--popsize and --seed do not apply to LM-Cocktail"):
        first = search(linear, tmp_path / "c", optimizer="cocktail", popsize=5, seed=3, **kw)
    with pytest.warns(UserWarning, match="--temperature does not apply to the grid search"):  # review: no word of it
        search(task_config(tiny_family), tmp_path / "t", optimizer="grid", steps=1, temperature=3.0, **kw)
    again = search(linear, tmp_path / "c", optimizer="cocktail", resume=True, overwrite=True, **kw)
    assert again.scored == 0 and _history(again) == _history(first)


def test_two_worker_processes_score_exactly_as_serial(tiny_family, family_data, tmp_path):
    kw = dict(optimizer="grid", steps=2, safety_data=family_data["safety"], domain_data=family_data["domain"], progress=False)
    serial = search(task_config(tiny_family, "ties", density=0.5), tmp_path / "s", **kw)
    parallel = search(task_config(tiny_family, "ties", density=0.5), tmp_path / "p", workers=2, **kw)
    assert _history(parallel) == _history(serial)


def test_ray_workers_score_exactly_as_serial(tiny_family, family_data, tmp_path):
    pytest.importorskip("ray")
    kw = dict(optimizer="grid", steps=2, safety_data=family_data["safety"], domain_data=family_data["domain"], progress=False)
    serial = search(task_config(tiny_family, "ties", density=0.5), tmp_path / "s", **kw)
    mine = lambda signum, frame: None  # noqa: E731  (the CLI's: SIGTERM ends the search as Ctrl-C does)
    original = signal.signal(signal.SIGTERM, mine)
    try:
        on_ray = search(task_config(tiny_family, "ties", density=0.5), tmp_path / "r", workers=2, ray_address="local", **kw)
        assert signal.getsignal(signal.SIGTERM) is mine  # review: ray.init's own handler (exit 15) had stayed
    finally:
        signal.signal(signal.SIGTERM, original)
    assert _history(on_ray) == _history(serial)


def test_ray_actors_ask_for_a_share_of_the_gpus_with_cuda(tiny_family, tmp_path):
    """An actor asking Ray for no GPU sees none, so `--device cuda` on Ray asks for one per actor, or an equal share
    where the cluster has fewer GPUs than workers (every actor placed); a cluster without a GPU is a clear error."""
    from safemerge.search.parallel.ray_pool import gpu_share

    assert gpu_share("cpu", 8, 2, address="local") == 0.0
    assert gpu_share("cuda", 4, 2, address="local") == 1.0 and gpu_share("cuda:1", 2, 2, address="x") == 1.0
    assert gpu_share("cuda", 1, 2, address="local") == 0.5 and gpu_share("cuda", 2, 5, address="x") == pytest.approx(1 / 3)
    assert gpu_share("cuda", 3, 4, address="x") == 0.5  # not 0.75: one GPU cannot hold a second 0.75 actor
    for gpus in (0, 0.5):  # a fraction of a GPU in all: no actor could be placed
        with pytest.raises(ConfigError, match="--device cuda with --ray-address ray://h:10001: the Ray cluster has no GPU"):
            gpu_share("cuda", gpus, 2, address="ray://h:10001")
    ray = pytest.importorskip("ray")
    from safemerge.search.parallel.ray_pool import RayScorer
    from safemerge.search.scoring import ScorerSpec

    spec = ScorerSpec(config=task_config(tiny_family, "ties", density=0.5), safety_data=None, domain_data=None,
                      lambda_=0.5, device="cuda")
    if not ray.is_initialized():  # this machine's local instance: a GPU only where torch sees one
        with pytest.raises(ConfigError, match="the Ray cluster has no GPU") if not torch.cuda.is_available() else contextlib.nullcontext():
            RayScorer(spec, address="local", workers=1).close()
        assert not ray.is_initialized()  # the instance it started is shut down again
        # an actor whose scorer cannot be built (a data file that is not there): the error comes, and Ray is shut down
        missing = replace(spec, device="cpu", domain_data=str(tmp_path / "missing.jsonl"), lambda_=0.0)
        with pytest.raises(ray.exceptions.RayError, match="missing.jsonl"):
            RayScorer(missing, address="local", workers=1)
        import socket

        with socket.socket() as free:  # a port nothing listens at: ray.init retried it for minutes (review)
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"--ray-address 127.0.0.1:{port}: no Ray cluster answers there"):
            RayScorer(missing, address=f"127.0.0.1:{port}", workers=1)
        assert not ray.is_initialized()
        assert not ray.is_initialized()


def test_resume_without_a_journal_says_it_starts_afresh(tmp_path):
    """QA: `search --resume` with no journal began a new search without a word."""
    from safemerge.search.journal import Journal

    with pytest.warns(UserWarning, match=r"j.sqlite: no search journal to resume; the search starts from the beginning"):
        Journal.open(tmp_path / "j.sqlite", identity={"a": 1}, resume=True).close()
    import warnings

    with warnings.catch_warnings():  # resuming the journal that is now there: nothing to say
        warnings.simplefilter("error", UserWarning)
        Journal.open(tmp_path / "j.sqlite", identity={"a": 1}, resume=True).close()


def test_a_journal_in_use_by_another_search_is_refused_and_left_alone(tmp_path):
    """Review: a second search with --resume on a live journal died on a UNIQUE constraint (a traceback), and with
    --overwrite deleted it under the first, which then reported a journal holding the other search."""
    from safemerge.search.journal import Journal, Score

    live = Journal.open(tmp_path / "j.sqlite", identity={"a": 1})
    live.append(0, params={"w": 1}, config={}, score=Score(1.0, 2.0, 1.5), seconds=0.1)
    for kw in ({"resume": True}, {"overwrite": True}):
        with pytest.raises(ConfigError, match=r"j.sqlite: another search is using this journal"):
            Journal.open(tmp_path / "j.sqlite", identity={"a": 1}, **kw)
    live.close()
    with Journal.open(tmp_path / "j.sqlite", identity={"a": 1}, resume=True) as again:  # free once the first is done
        assert len(again) == 1
    # a key added to the identity since the journal was written (model_config) does not block its resume
    with Journal.open(tmp_path / "j.sqlite", identity={"a": 1, "model_config": "c"}, resume=True) as again:
        assert len(again) == 1
    with pytest.raises(ConfigError, match=r"differs in: model_config\)"):  # once recorded, it counts
        Journal.open(tmp_path / "j.sqlite", identity={"a": 1, "model_config": "d"}, resume=True)
    with pytest.raises(ConfigError, match=r"differs in: a\)"):
        Journal.open(tmp_path / "j.sqlite", identity={"a": 2, "model_config": "c"}, resume=True)
    with Journal.open(tmp_path / "j.sqlite", identity={"a": 1, "model_config": "c"}, resume=True):  # not left locked
        pass


def test_a_candidate_whose_loss_is_nan_is_journaled_and_ranked_last(tiny_family, tmp_path):
    """SQLite stores NaN as NULL, and the column was NOT NULL: a NaN objective (logits that overflow) crashed the
    search, so the penalty CMA-ES gives such candidates never applied. It is journaled, replayed as NaN on resume,
    and never the best."""
    import math

    from safemerge.search.cmaes import cmaes
    from safemerge.search.evaluations import Evaluations
    from safemerge.search.journal import Journal
    from safemerge.search.objective import Score
    from safemerge.search.space import SearchSpace

    class Scorer:  # weight above 0.52: NaN; otherwise a bowl at (0.3, 0.3)
        def score(self, configs):
            for k, c in enumerate(configs):
                ws = [m["parameters"]["weight"] for m in c["models"]]
                v = math.nan if ws[0] > 0.52 else sum((w - 0.3) ** 2 for w in ws)
                yield k, Score(v, v, v), 0.0

        def close(self):
            pass

    cfg = task_config(tiny_family)
    with Journal.open(tmp_path / "j.sqlite", identity={"run": 1}) as jr:
        evals = Evaluations(jr, Scorer())
        idx, cand, score = cmaes(SearchSpace(cfg), evals, steps=4, seed=0, popsize=4)
        nans = [e.idx for e in jr.entries() if math.isnan(e.score.objective)]
        assert nans and idx not in nans and math.isfinite(score.objective)
        assert jr.best().idx == idx
    with Journal.open(tmp_path / "j.sqlite", identity={"run": 1}, resume=True) as jr:
        assert [e.idx for e in jr.entries() if math.isnan(e.score.objective)] == nans and jr.best().idx == idx


def test_card_says_where_a_random_methods_merge_was_made():
    """A search scored on a GPU writes DARE's masks as that device draws them; `safemerge merge` on its default cpu
    would make another model from the same mergekit_config.yml, so the card says which device to ask for."""
    from types import SimpleNamespace

    from safemerge.search.run import _device_card

    def result(method, device):
        return SimpleNamespace(device=device, config=SimpleNamespace(merge_method=method))

    assert "--device cuda:1" in _device_card(result("dare_ties", "cuda:1"))
    assert _device_card(result("dare_ties", "cpu")) == _device_card(result("ties", "cuda")) == ""


def test_cma_stopping_early_is_said(tiny_family, tmp_path):
    """cma's own criteria may end a run before --steps generations: a flat objective stops it at once; the warning
    names the generations run and the criterion, and the best so far is the result."""
    from safemerge.search.cmaes import cmaes
    from safemerge.search.evaluations import Evaluations
    from safemerge.search.journal import Journal
    from safemerge.search.objective import Score
    from safemerge.search.space import SearchSpace

    class Flat:
        def score(self, configs):
            for k, _ in enumerate(configs):
                yield k, Score(1.0, 1.0, 1.0), 0.0

        def close(self):
            pass

    with Journal.open(tmp_path / "j.sqlite", identity={"run": 1}) as jr:
        evals = Evaluations(jr, Flat())
        with pytest.warns(UserWarning, match=r"CMA-ES stopped after \d+ of 50 generations: .*(tolflatfitness|tolfun)"):
            idx, _, _ = cmaes(SearchSpace(task_config(tiny_family)), evals, steps=50, seed=0, popsize=4)
        assert idx == 0 and 1 < evals.next < 1 + 50 * 4


def test_a_store_inside_out_and_an_empty_out_are_refused_at_once(tiny_family, family_data, tmp_path, monkeypatch):
    """Review: a --store inside OUT failed only after the whole search (and --overwrite deleted it with the old
    output); an empty OUT meant the working folder."""
    kw = dict(optimizer="grid", steps=1, safety_data=family_data["safety"], domain_data=family_data["domain"],
              progress=False, audit=False)
    with pytest.raises(ConfigError, match=r"contains the results store .*store.sqlite; move the results store out"):
        search(task_config(tiny_family), tmp_path / "o", store=tmp_path / "o" / "store.sqlite", **kw)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="OUT is empty"):
        search(task_config(tiny_family), "", **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
