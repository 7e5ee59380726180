"""`safemerge repro`: both papers, end to end, on the testbed.

Builds (or reuses) the testbed, audits the pool, makes every model of the two papers' comparisons,
evaluates each for safety (held-out harmful prompts, keyword judge), domain accuracy (every domain),
general knowledge and L2 distance to the expert and the aligned model, and writes results.json,
report.md and report.html.

The single-expert comparisons (MergeAlign and its weightings, Slerp, TIES/DARE-TIES grid, EvoMM,
LM-Cocktail, DPO, ORPO) use the primary domain's expert (the first domain); the three-model merge uses
every domain. Every stage is cached: a model directory is reused when its recorded key (testbed, name,
settings) matches, and every evaluation is a lookup in OUT/results.sqlite once made.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.console import Console

console = Console(stderr=True)

# the work each preset does; `small` is the demo and the reproduction, `micro` a smoke test
BUDGETS: dict[str, dict[str, Any]] = {
    "micro": {"safety_limit": 48, "domain_limit": 60, "synth_n": 24, "cmaes_steps": 3, "grid_steps": 2,
              "search_limit": 24, "align_steps": 4, "align_samples": 64},
    "small": {"safety_limit": None, "domain_limit": None, "synth_n": 96, "cmaes_steps": 30, "grid_steps": 3,
              "search_limit": 96, "align_steps": None, "align_samples": 720},  # DPO/ORPO: 3 epochs, as the paper
}


@dataclass
class Repro:
    out: Path
    testbed: Path
    domains: tuple[str, ...]
    budget: dict[str, Any]
    seed: int
    progress: bool
    store: Path
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"method", "params", "path"}
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def primary(self) -> str:
        return self.domains[0]

    def family(self, name: str) -> Path:
        return self.testbed / name

    def data(self, name: str) -> Path:
        return self.testbed / "data" / name

    # -- one model, cached ----------------------------------------------------------------------------
    def make(self, name: str, method: str, params: dict, build: Callable[[Path], Any]) -> Path:
        """Run `build(path)` unless OUT/models/name already holds it for the same testbed, settings and safemerge
        code (a run resumed after an upgrade or an edit makes its models again)."""
        path = self.out / "models" / name
        # the domains in order: the first is the expert every single-expert model is made from
        key = _key({"testbed": _testbed_key(self.testbed), "domains": list(self.domains), "name": name, "method": method,
                    "params": params, "code": code_digest()})
        stamp = path / ".repro-key"
        if not (stamp.is_file() and stamp.read_text() == key):
            t0 = time.perf_counter()
            console.print(f"[bold]{name}[/]: {method} {json.dumps(params)}")
            build(path)
            stamp.write_text(key)
            self.timings[name] = round(time.perf_counter() - t0, 1)
        self.models[name] = {"method": method, "params": params, "path": path}
        return path


@functools.cache
def code_digest() -> str:
    """A hash of safemerge's own source files (its version alone does not change between commits)."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _testbed_key(testbed: Path) -> str:
    return json.loads((testbed / "world.json").read_text())["key"]


def _testbed_code(testbed: Path) -> str:
    """The hash of the testbed code and libraries the run's models were trained with (its recipe, seed apart)."""
    return json.loads((testbed / "world.json").read_text())["code_version"]


# -- the stages -------------------------------------------------------------------------------------
def _merges(r: Repro) -> None:
    from safemerge import merge, mergealign

    base, aligned, expert = r.family("base"), r.family("aligned"), r.family(f"expert-{r.primary}")
    for alpha, beta in [(1.0, 1.0), (1.0, 0.5), (0.5, 1.0), (0.8, 0.8)]:
        name = "mergealign" if (alpha, beta) == (1.0, 1.0) else f"mergealign-a{alpha:g}-b{beta:g}"
        r.make(name, "mergealign", {"alpha": alpha, "beta": beta},
               lambda p, a=alpha, b=beta: mergealign(base=base, domains=[expert], aligned=aligned, out=p, alpha=a,
                                                     beta=b, overwrite=True, progress=False))
    experts = [r.family(f"expert-{d}") for d in r.domains]
    if len(experts) > 1:
        r.make("mergealign-3model", "mergealign", {"alpha": 1.0, "beta": 1.0, "domains": list(r.domains)},
               lambda p: mergealign(base=base, domains=experts, aligned=aligned, out=p, overwrite=True, progress=False))
    # Slerp between the expert (t = 0) and the aligned model (t = 1), as in the MergeAlign paper
    for name, t in [("slerp-gradient", [0, 0.5, 1, 0.5, 0]), ("slerp-0.7-0.3", 0.3), ("slerp-0.3-0.7", 0.7)]:
        cfg = {"merge_method": "slerp", "base_model": str(expert), "models": [{"model": str(expert)}, {"model": str(aligned)}],
               "parameters": {"t": t}, "tokenizer_source": str(aligned)}
        r.make(name, "slerp", {"t": t}, lambda p, c=cfg: merge(c, p, overwrite=True, progress=False))


def _search_data(r: Repro) -> tuple[Path, Path]:
    """The search's data files under the run folder (see `write_search_data`), named by their settings."""
    folder = r.out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    n = r.budget["synth_n"]
    key = _key({"testbed": _testbed_key(r.testbed), "n": n, "seed": r.seed})
    safety, domain = folder / f"safety-{key}.jsonl", folder / f"domain-{r.primary}-{key}.jsonl"
    t0 = time.perf_counter()
    write_search_data(r.testbed, r.primary, n=n, seed=r.seed, safety=safety, domain=domain, progress=r.progress)
    r.timings["search data"] = round(time.perf_counter() - t0, 1)
    return safety, domain


def write_search_data(testbed: Path, primary: str, *, n: int, seed: int, safety: Path, domain: Path,
                      progress: bool = False) -> None:
    """Synthetic safety data (the pool's refusals to the first `n` training harmful prompts, kept where the
    keyword judge sees a refusal) and the primary domain's Q&A (its first `n` rows); a file that exists
    is kept.

    The domain Q&A is the testbed's own training Q&A: the papers have each expert question itself, but
    the testbed's experts are too small to write usable questions (`safemerge data domain` runs on them,
    and its questions are gibberish), so the reproduction does not pretend otherwise.
    """
    from safemerge.data.synthetic import synthesize_safety

    if not safety.exists():
        pool = [testbed / "aligned", testbed / f"expert-{primary}"]
        synthesize_safety(pool, safety, prompts=testbed / "data" / "safety_train.jsonl", n=n, seed=seed,
                          max_new_tokens=32, progress=progress)
    if not domain.exists():
        rows = (testbed / "data" / f"domain-{primary}_train.jsonl").read_text().splitlines()[:n]
        domain.write_text("\n".join(rows) + "\n")


def _searches(r: Repro) -> None:
    from safemerge.search import search

    safety, domain = _search_data(r)
    base, aligned, expert = r.family("base"), r.family("aligned"), r.family(f"expert-{r.primary}")
    b = r.budget

    def pool(method: str, **per_model) -> dict:
        return {"merge_method": method, "base_model": str(base), "tokenizer_source": str(aligned),
                "models": [{"model": str(expert), "parameters": {"weight": 1.0, **per_model}},
                           {"model": str(aligned), "parameters": {"weight": 1.0, **per_model}}]}

    runs = [
        ("ties-grid", "ties", "grid", 0.5, pool("ties", density=0.5), b["grid_steps"]),
        ("dare_ties-grid", "dare_ties", "grid", 0.5, pool("dare_ties", density=0.5), b["grid_steps"]),
        ("evomm-safe", "evomm", "cmaes", 0.5, pool("task_arithmetic"), b["cmaes_steps"]),
        ("evomm-unsafe", "evomm", "cmaes", 0.0, pool("task_arithmetic"), b["cmaes_steps"]),
        ("cocktail-safe", "cocktail", "cocktail", 0.5, {**pool("linear"), "base_model": None}, None),
        ("cocktail-unsafe", "cocktail", "cocktail", 0.0, {**pool("linear"), "base_model": None}, None),
    ]
    for name, method, optimizer, lam, cfg, steps in runs:
        cfg = {k: v for k, v in cfg.items() if v is not None}

        def run(path: Path, cfg=cfg, optimizer=optimizer, lam=lam, steps=steps) -> None:
            journal = r.out / "journals" / f"{path.name}.sqlite"
            journal.parent.mkdir(parents=True, exist_ok=True)
            journal.unlink(missing_ok=True)  # the settings changed: start afresh
            search(cfg, path, optimizer=optimizer, safety_data=safety, domain_data=domain, lambda_=lam, steps=steps,
                   seed=r.seed if optimizer == "cmaes" else 0,  # the others use none (and would warn of it)
                   limit=b["search_limit"], overwrite=True, progress=r.progress, journal=journal,
                   audit=False)  # the reproduction audits the pool itself, on the held-out prompts

        path = r.make(name, method, {"optimizer": optimizer, "lambda": lam, "steps": steps}, run)
        r.models[name]["params"] = {"optimizer": optimizer, "lambda": lam,
                                    **json.loads((path / "search.json").read_text())["best"]["params"]}


def _alignment(r: Repro) -> None:
    from safemerge.align import align

    b = r.budget
    expert = r.family(f"expert-{r.primary}")
    common = {"max_steps": b["align_steps"], "max_samples": b["align_samples"], "lr": 5e-4, "warmup_steps": 0}
    # plain DPO and ORPO as in the paper; "dpo-sft" adds an NLL term on the chosen answers to DPO's loss
    for name, method, extra in (("dpo", "dpo", {}), ("dpo-sft", "dpo", {"sft_weight": 1.0}), ("orpo", "orpo", {})):
        settings = {**common, **extra}
        r.make(name, method, settings,
               lambda p, m=method, s=settings: align(expert, data=r.data("prefs.jsonl"), out=p, method=m, seed=r.seed,
                                                    overwrite=True, progress=r.progress, **s))


def _evaluate(r: Repro, names: Sequence[str]) -> dict[str, dict]:
    from safemerge.comparison import evaluate_models

    def echo(name: str, row: dict) -> None:
        console.print(f"  {name:<22} safety {row['safety']['testbed-harmful']:.2f}  " +
                      "  ".join(f"{d} {a:.2f}" for d, a in row["domain"].items()) + f"  general {row['general']:.2f}")

    b = r.budget
    t0 = time.perf_counter()
    results = evaluate_models(
        {name: r.models[name] for name in names}, safety={"testbed-harmful": r.data("safety_test.jsonl")},
        domain={d: r.data(f"domain-{d}_test.jsonl") for d in r.domains}, general=r.data("general_test.jsonl"),
        expert=r.family(f"expert-{r.primary}"), aligned=r.family("aligned"), limit=b["safety_limit"],
        domain_limit=b["domain_limit"], max_new_tokens=32, store=r.store, progress=r.progress, echo=echo)
    r.timings["evaluation"] = round(r.timings.get("evaluation", 0.0) + time.perf_counter() - t0, 1)  # audit + the rest
    return results


# -- the entry point ----------------------------------------------------------------------------------
def repro(*, out: str | os.PathLike = "runs/repro", seed: int = 0, preset: str = "small",
          domains: Sequence[str] = ("medicine", "finance"), skip: Sequence[str] = (), progress: bool = True) -> dict:
    """Reproduce both papers on the testbed; returns {"results", "report", "seconds"}.

    `skip` leaves out stages by name: "search", "align". A second run with the same arguments reuses
    every model and evaluation.
    """
    from safemerge._args import as_list, check_arguments
    from safemerge._hf import quiet_transformers

    check_arguments(repro, locals())
    with quiet_transformers():  # one bar per model load would drown the stage output
        return _repro(out=out, seed=int(seed), preset=preset, domains=domains, skip=as_list(skip), progress=progress)


def _repro(*, out, seed, preset, domains, skip, progress) -> dict:
    from safemerge.checkpoint import check_output_folder
    from safemerge.errors import ConfigError
    from safemerge.report import write_report
    from safemerge.testbed import build_testbed
    from safemerge.testbed.build import ordered_domains

    if preset not in BUDGETS:
        raise ConfigError(f"preset {preset!r} is unknown; choose {', '.join(BUDGETS)}")
    domains = ordered_domains(domains)  # the first is the primary expert
    unknown = sorted(set(skip) - set(STAGES))
    if unknown:
        raise ConfigError(f"--skip {', '.join(unknown)}: the stages that can be skipped are {', '.join(STAGES)}")
    t_start = time.perf_counter()
    out = Path(out).expanduser().absolute()
    check_output_folder(out, "--out names the folder of the reproduction")
    out.mkdir(parents=True, exist_ok=True)
    testbed = out / "testbed"
    t0 = time.perf_counter()
    if not _testbed_matches(testbed, seed=seed, preset=preset, domains=domains):
        build_testbed(testbed, seed=seed, preset=preset, domains=domains, overwrite=True, progress=progress)
    r = Repro(out=out, testbed=testbed, domains=tuple(domains), budget=BUDGETS[preset], seed=seed, progress=progress,
              store=out / "results.sqlite", timings={"testbed": round(time.perf_counter() - t0, 1)})
    for name in ["base", "aligned"] + [f"expert-{d}" for d in r.domains]:
        method = {"base": "pretrained", "aligned": "aligned"}.get(name, "expert")
        r.models[name] = {"method": method, "params": {}, "path": r.family(name)}
    console.rule("audit of the pool")
    results = _evaluate(r, list(r.models))
    console.rule("merges")
    _merges(r)
    if "search" not in skip:
        console.rule("safety-aware search")
        _searches(r)
    if "align" not in skip:
        console.rule("preference alignment (DPO, ORPO)")
        _alignment(r)
    console.rule("evaluation")
    results.update(_evaluate(r, [n for n in r.models if n not in results]))
    doc = {"meta": {"seed": seed, "preset": preset, "domains": list(r.domains), "primary_domain": r.primary,
                    "testbed_code": _testbed_code(testbed), "timings": r.timings, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "seconds": round(time.perf_counter() - t_start, 1)},
           "models": results}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    report = write_report(doc, out, title=f"safemerge reproduction (seed {seed}, {preset})", overwrite=True)
    return {"results": str(out / "results.json"), "report": report, "seconds": doc["meta"]["seconds"]}


STAGES = ("search", "align")


def _testbed_matches(testbed: Path, *, seed: int, preset: str, domains: Sequence[str]) -> bool:
    """Whether OUT/testbed is the build these arguments (and this code) would make."""
    from safemerge.testbed.build import cache_key, canonical_domains

    try:
        return _testbed_key(testbed) == cache_key(seed=seed, preset=preset, domains=canonical_domains(domains))
    except (OSError, KeyError, json.JSONDecodeError):
        return False
