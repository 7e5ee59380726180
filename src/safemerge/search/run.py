"""`search()`: a data-driven merge of a pool, resumable, written out as an ordinary merged checkpoint.

    config (pool, base, method) ─► optimizer (cmaes | cocktail | grid) ─► candidates
        ─► Evaluations (journal: replay or score) ─► Scorer (serial | processes | Ray)
            ─► CandidateModel (weights in place) + Objective (λ·CE_safety + (1−λ)·CE_domain)
    best candidate ─► safemerge.merge ─► OUT (checkpoint, mergekit_config.yml, search.json)

The journal lives beside OUT (`OUT.journal.sqlite` unless `journal=` names another file), so a killed
run keeps it; `resume=True` replays it and continues.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import yaml

from safemerge._args import check_arguments
from safemerge._progress import transient_progress
from safemerge.checkpoint import Checkpoint, atomic_output, check_existing_output, check_folder
from safemerge.config import MergeConfig, load_config
from safemerge.engine import check_apart, check_copied_files, check_device, input_dirs, tokenizer_dirs
from safemerge.errors import ConfigError
from safemerge.lora import open_model
from safemerge.search.candidates import check_architecture
from safemerge.search.cmaes import DEFAULT_SIGMA0, DEFAULT_STEPS, cmaes, default_popsize
from safemerge.search.cocktail import DEFAULT_TEMPERATURE, check_cocktail_pool, cocktail, cocktail_members
from safemerge.search.evaluations import Candidate, Evaluations
from safemerge.search.grid import DEFAULT_POINTS, grid, grid_points
from safemerge.search.journal import Journal
from safemerge.search.objective import DEFAULT_LAMBDA, Score, check_lambda, load_pairs
from safemerge.search.pool_audit import AUDIT_LIMIT, AUDIT_MAX_NEW_TOKENS, AUDIT_THRESHOLD, audit_pool
from safemerge.search.scoring import ScorerSpec, effective_max_length
from safemerge.search.space import SearchSpace

if TYPE_CHECKING:
    from safemerge.data.loaders import PromptSet

OPTIMIZERS = ("cmaes", "cocktail", "grid")
JOURNAL_VERSION = 1


@dataclass
class SearchResult:
    """What a search found and where it wrote it."""

    out: Path
    journal: Path
    optimizer: str
    lambda_: float
    best_index: int
    params: dict[str, float]
    config: MergeConfig
    score: Score
    candidates: int  # candidates in the whole run
    scored: int  # scored by this call (the rest were replayed from the journal)
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    audit: dict[str, Any] | None = None  # the pool's safety audit (safemerge.evaluate.audit's result), if one ran
    device: str = "cpu"  # where the candidates were scored ("auto" resolved)

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "journal": str(self.journal), "optimizer": self.optimizer, "lambda": self.lambda_,
                "best": {"index": self.best_index, "params": self.params, **self.score.as_dict()},
                "config": self.config.to_yaml_dict(), "candidates": self.candidates, "scored": self.scored,
                "replayed": self.candidates - self.scored, "seconds": round(self.seconds, 3), "device": self.device,
                "audit": self.audit}


def search(
    config: str | os.PathLike | dict | MergeConfig,
    out: str | os.PathLike,
    *,
    optimizer: str = "cmaes",
    safety_data: str | os.PathLike | None = None,
    domain_data: str | os.PathLike | None = None,
    lambda_: float = DEFAULT_LAMBDA,
    steps: int | None = None,
    seed: int = 0,
    resume: bool = False,
    workers: int = 1,
    ray_address: str | None = None,
    overwrite: bool = False,
    journal: str | os.PathLike | None = None,
    popsize: int | None = None,
    sigma0: float = DEFAULT_SIGMA0,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = 16,
    max_length: int | None = 512,
    limit: int | None = None,
    device: str = "auto",
    threads: int | None = None,
    memo_gib: float | None = None,
    audit: bool = True,
    audit_prompts: "str | os.PathLike | Sequence[str] | PromptSet | None" = None,
    audit_limit: int | None = AUDIT_LIMIT,
    audit_threshold: float = AUDIT_THRESHOLD,
    audit_max_new_tokens: int = AUDIT_MAX_NEW_TOKENS,
    judge: Any = "keyword",
    judge_model: Any = None,
    store: Any = None,
    cache: bool = True,
    ignore_unknown: bool = False,
    progress: bool = True,
    on_result: Callable[[int, Candidate, Score, bool], None] | None = None,
) -> SearchResult:
    """Search the numbers of a merge config that minimise λ·CE(safety) + (1−λ)·CE(domain), and write the
    best merge to `out` (a complete HF checkpoint whose `mergekit_config.yml` reproduces it).

    `steps`: CMA-ES generations (default 100), grid points per axis (default 5); unused by cocktail.
    `device`: where candidates are built and scored; "auto" (the default) is the GPU where torch sees one, else the
    CPU, and the journal records which (a run resumes on the same kind of device).
    `limit` keeps the first N examples of each data file. `threads` sets torch's threads for scoring
    (default: torch's own in a serial run, 1 per worker). `memo_gib` bounds the memory of each scorer's memo of the
    TIES / DARE trims (sorted |τ| and DARE's draws; the same masks either way, only faster): by default 1 GiB on the CPU
    and in each worker, and an eighth of the free GPU memory in a serial run on a GPU; 0 keeps none. A size given is
    taken as it is, not checked against the free memory. `on_result(index, candidate, score, replayed)` is called
    after every candidate (tests use it to interrupt a run). `ignore_unknown`: config keys safemerge does not know are
    left out with a warning, as mergekit ignores them (safemerge.config.parse_config).

    Before the search, the pool is audited for safety (`audit=False` skips it): every model the merge mixes
    answers the first `audit_limit` prompts of `audit_prompts` (default: the safety data's prompts; greedy, at most
    `audit_max_new_tokens` tokens), `judge` judges the answers, and a model whose safe rate is below
    `audit_threshold` is flagged, with a warning when λ = 0 (the safety-unaware search a misaligned model spoils)
    or when no model is safe. The figures are kept in the results `store` (a repeated or resumed search looks them
    up; `cache=False` audits afresh), in `SearchResult.audit`, search.json and the model card.
    """
    check_arguments(search, locals())
    start = time.perf_counter()
    cfg = load_config(config, ignore_unknown=ignore_unknown).require_whole_models("the search")
    lam = check_lambda(lambda_)
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer {optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
    if not str(out).strip():  # Path("") is the working folder, which --overwrite would empty
        raise ConfigError("OUT is empty; name the folder the best merge is written to")
    out = Path(out).expanduser().absolute()
    also = (" (with --resume, --overwrite keeps the journal and replaces the output with the resumed search's best; "
            "that is how a finished CMA-ES run goes on with more --steps)" if resume else "")
    check_existing_output(out, overwrite=overwrite, also=also)
    check_folder(out)  # what stands at OUT is checked now, not when the best merge is written after the search
    if workers < 1:
        raise ConfigError(f"--workers {workers}: give at least one worker")
    _check_options(seed=seed, steps=steps, popsize=popsize, sigma0=sigma0, temperature=temperature, batch_size=batch_size,
                   max_length=max_length, limit=limit, threads=threads, audit_limit=audit_limit if audit else None,
                   audit_max_new_tokens=audit_max_new_tokens if audit else None, memo_gib=memo_gib)
    device = check_device(device)
    pool = {m: open_model(m) for m in cfg.input_models()}
    check_architecture(pool)  # before any model is loaded
    reference = pool[cfg.base_model or cfg.models[0].model]
    inputs = input_dirs(pool.values()) + tokenizer_dirs(cfg)
    check_copied_files(cfg, reference.path)  # the best merge copies them at the end
    files = _input_files(config, safety_data, domain_data, audit_prompts)
    check_apart(out, inputs)
    check_apart(out, files, kind="input file")  # --overwrite would delete a data file kept in OUT
    if isinstance(store, (str, os.PathLike)):  # found at the end (the output folder holds other files), or deleted
        check_apart(out, [Path(store).expanduser()], kind="results store")
    data = _data(safety_data, domain_data, lam, limit)
    audit_from = _audit_source(audit, audit_prompts, safety_data, audit_limit, audit_threshold, judge, judge_model)
    space = SearchSpace(cfg) if optimizer != "cocktail" else None
    if optimizer == "cocktail":
        check_cocktail_pool(cfg)
        _cocktail_notes(cfg)
    _ignored_options(optimizer, steps=steps, popsize=popsize, seed=seed, sigma0=sigma0, temperature=temperature)
    steps = _steps(optimizer, steps)
    journal_path = Path(journal).expanduser() if journal else out.with_name(out.name + ".journal.sqlite")
    check_apart(journal_path, inputs, what="the journal")
    check_folder(journal_path)
    if journal_path.absolute() == out or out in journal_path.absolute().parents:
        raise ConfigError(f"--journal {journal_path}: the journal would lie in the output {out}, which is written at the "
                          "end (and replaced with --overwrite); put it beside the output")
    spec = ScorerSpec(config=cfg.to_yaml_dict(), safety_data=data["safety"]["path"], domain_data=data["domain"]["path"],
                      lambda_=lam, batch_size=batch_size, max_length=effective_max_length(max_length, reference.config),
                      limit=limit, device=device,
                      threads=threads or (1 if (workers > 1 or ray_address) else None),
                      trim_memo_bytes=None if memo_gib is None else int(memo_gib * 2**30))
    identity = _identity(cfg, pool, optimizer=optimizer, lam=lam, seed=seed, steps=steps, popsize=popsize, sigma0=sigma0,
                         temperature=temperature, data=data, spec=spec)
    total = _expected(optimizer, space, cfg, steps, popsize)
    scorer = _LazyScorer(spec, workers=workers, ray_address=ray_address)
    with Journal.open(journal_path, identity=identity, resume=resume, overwrite=overwrite,
                      # the grid and LM-Cocktail ignore the seed and --popsize (journals before 2026-11-25 held them)
                      free=("steps",) if optimizer == "cmaes" else ("seed", "popsize")) as jr:
        # the audit runs once the journal is known to fit (a resume of another run fails before any answer is generated)
        pool_audit = (audit_pool(cfg, members=cocktail_members(cfg) if optimizer == "cocktail" else None,
                                 prompts=audit_from, lambda_=lam, limit=audit_limit, threshold=audit_threshold,
                                 max_new_tokens=audit_max_new_tokens,
                                 judge=judge, judge_model=judge_model, batch_size=batch_size, device=device, store=store,
                                 cache=cache, progress=progress) if audit else None)

        with _progress(progress, total, optimizer) as report:
            def notify(idx: int, cand: Candidate, score: Score, replayed: bool) -> None:
                report(score)
                if on_result:
                    on_result(idx, cand, score, replayed)

            evals = Evaluations(jr, scorer, on_result=notify)
            try:
                best = _optimize(optimizer, cfg, space, evals, steps=steps, seed=seed, popsize=popsize, sigma0=sigma0,
                                 temperature=temperature)
            finally:
                scorer.close()
        history = [{"index": e.idx, "params": e.params, **e.score.as_dict(), "seconds": round(e.seconds, 4)}
                   for e in jr.entries() if e.idx < evals.next]  # this run's (a journal of a longer run holds more)
    idx, cand, score = best
    result = SearchResult(out, journal_path, optimizer, lam, idx, cand.params, cand.config, score, evals.next, evals.scored,
                          time.perf_counter() - start, history, pool_audit, device)  # the search itself; writing the best merge follows
    _write(result, data=data, overwrite=overwrite, progress=progress)
    return result


# -- helpers ----------------------------------------------------------------------------------------
def _optimize(optimizer: str, cfg: MergeConfig, space: SearchSpace | None, evals: Evaluations, *, steps, seed, popsize,
              sigma0, temperature) -> tuple[int, Candidate, Score]:
    if optimizer == "cmaes":
        return cmaes(space, evals, steps=steps, seed=seed, popsize=popsize, sigma0=sigma0)
    if optimizer == "grid":
        return grid(space, evals, points=steps)
    return cocktail(cfg, evals, temperature=temperature)


def _identity(cfg: MergeConfig, pool: dict[str, Checkpoint], *, optimizer, lam, seed, steps, popsize, sigma0, temperature, data, spec) -> dict:
    """What defines a run's sequence of candidates and scores (the journal checks it on resume).

    Not included: workers, Ray and threads, which do not change the scores."""
    from safemerge.evaluate.loading import side_files_digest

    used = _USES[optimizer]  # what an optimizer ignores must not block a resume
    return {
        "version": JOURNAL_VERSION, "config": cfg.to_yaml_dict(), "optimizer": optimizer, "lambda": lam,
        "seed": seed if "seed" in used else None, "steps": steps, "popsize": popsize if "popsize" in used else None,
        "sigma0": sigma0 if "sigma0" in used else None, "temperature": temperature if "temperature" in used else None,
        "data": {k: v["fingerprint"] for k, v in data.items()}, "limit": spec.limit, "batch_size": spec.batch_size,
        "max_length": spec.max_length, "device": spec.device,
        "models": {m: pool[m].fingerprint() for m in cfg.input_models()},
        # the config.json the candidates are built as (an edited rms_norm_eps changes every score)
        "model_config": side_files_digest(pool[cfg.base_model or cfg.models[0].model].path, ("config.json",)),
        "tokenizer": _tokenizer_identity(cfg, pool),
    }



def _tokenizer_identity(cfg: MergeConfig, pool: dict[str, Checkpoint]) -> str:
    """A hash of the tokenizer files the scorer reads (the tokenizer source's, else the reference model's) and of the
    chat template it applies: an edited template changes every example's tokens, so a journal scored with the
    old one must not be resumed (the weights' fingerprints do not cover these files)."""
    from safemerge import chat_templates
    from safemerge.evaluate.loading import side_files_digest, text_hash
    from safemerge.writer import TOKENIZER_FILES

    folder = next(iter(tokenizer_dirs(cfg)), pool[cfg.base_model or cfg.models[0].model].path)
    template = chat_templates.resolve(cfg.chat_template, [c.path for c in pool.values()])
    return f"{side_files_digest(folder, TOKENIZER_FILES)}:{text_hash(template)}"


def _input_files(config, safety_data, domain_data, audit_prompts) -> list[Path]:
    """The files the search reads beside the models: the config (when given as a file), the data files and the audit's
    prompts (when a local path)."""
    given = [x for x in (config, safety_data, domain_data, audit_prompts) if isinstance(x, (str, os.PathLike))]
    return [Path(x).expanduser() for x in given if Path(x).expanduser().exists()]


def _data(safety, domain, lam: float, limit: int | None) -> dict[str, dict[str, Any]]:
    """Validate the data files now (before any model is loaded); path and fingerprint of each."""
    if safety is None and lam > 0:
        raise ConfigError(f"λ = {lam} weighs safety data, but none was given; pass --safety-data FILE (or --lambda 0)")
    if domain is None and lam < 1:
        raise ConfigError(f"λ = {lam} weighs domain data, but none was given; pass --domain-data FILE (or --lambda 1)")
    out = {}
    for key, path in (("safety", safety), ("domain", domain)):
        if path is None:
            out[key] = {"path": None, "fingerprint": None, "examples": 0}
        else:
            ps = load_pairs(path, limit=limit)
            out[key] = {"path": str(Path(path).expanduser().absolute()), "fingerprint": ps.fingerprint, "examples": len(ps)}
    return out


def _audit_source(audit: bool, prompts, safety_data, limit: int | None, threshold: float, judge, judge_model):
    """The harmful prompts the pool's audit reads, read and checked now (before any model is loaded), or None."""
    if not audit:
        return None
    from safemerge.data.loaders import load_prompts
    from safemerge.evaluate.judges import get_judge

    if not 0 <= threshold <= 1:
        raise ConfigError(f"--audit-threshold {threshold}: a safety rate in [0, 1]")
    get_judge(judge, judge_model=judge_model)  # an unknown judge, or a guard without its checkpoint, fails here
    source = prompts if prompts is not None else safety_data
    return load_prompts(source, limit=limit) if source is not None else None


MAX_MEMO_GIB = 1 << 20  # 1 PiB, more than any machine has: a larger size is a typo (1e308 GiB would overflow as bytes)


def _check_options(**given: float | None) -> None:
    """The numeric options, before anything is loaded or written: a clear error instead of one from deep in
    cma or the scorer (or a silently ignored value)."""
    least = {"seed": 0, "steps": 1, "popsize": 2, "batch_size": 1, "max_length": 1, "limit": 1, "threads": 1, "audit_limit": 1,
             "audit_max_new_tokens": 1}
    for key, value in given.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if key in least and value < least[key]:
            raise ConfigError(f"{flag} {value}: must be at least {least[key]}")
        if key in ("sigma0", "temperature") and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} {value}: must be a positive number")
        if key == "memo_gib" and not (math.isfinite(value) and 0 <= value <= MAX_MEMO_GIB):
            raise ConfigError(f"{flag} {value}: a size in GiB from 0 (no memo) to {MAX_MEMO_GIB}")


def _steps(optimizer: str, steps: int | None) -> int | None:
    if optimizer == "cmaes":
        return DEFAULT_STEPS if steps is None else steps
    if optimizer == "grid":
        return DEFAULT_POINTS if steps is None else steps
    return None


def _expected(optimizer: str, space: SearchSpace | None, cfg: MergeConfig, steps: int | None, popsize: int | None) -> int:
    if optimizer == "cmaes":
        return 1 + steps * (popsize or default_popsize(len(space.dims)))  # the start, then each generation
    if optimizer == "grid":
        return len(grid_points(space, steps))
    return len(cfg.models) + 1


class _LazyScorer:
    """Builds the scorer on first use, so a fully replayed resume loads no model."""

    def __init__(self, spec: ScorerSpec, *, workers: int, ray_address: str | None):
        self.spec, self.workers, self.ray_address = spec, workers, ray_address
        self._scorer = None

    def score(self, configs):
        if self._scorer is None:
            from safemerge.search.parallel import make_scorer

            self._scorer = make_scorer(self.spec, workers=self.workers, ray_address=self.ray_address)
        return self._scorer.score(configs)

    def close(self) -> None:
        if self._scorer is not None:
            self._scorer.close()


def _device_card(result: SearchResult) -> str:
    """A note where the merge cannot be redone with `safemerge merge`'s default device: a random method's masks (DARE,
    DELLA) are drawn by a generator of the device the candidates were scored on."""
    from safemerge.methods import get_method

    device = str(result.device)
    if device == "cpu" or not get_method(result.config.merge_method).random:
        return ""
    return (f"\n\nScored and written on {device}: {result.config.merge_method}'s random masks depend on the device, so "
            f"`safemerge merge mergekit_config.yml OUT --device {device}` makes this model again (the default cpu does not).")


def _write(result: SearchResult, *, data: dict, overwrite: bool, progress: bool) -> None:
    """The best merge as a checkpoint at result.out, with search.json beside the weights."""
    from safemerge.engine import merge

    s = result.score
    card = (f"## Search\n\nFound by `safemerge search --optimizer {result.optimizer} --lambda {result.lambda_}`: "
            f"candidate {result.best_index} of {result.candidates}, objective {s.objective:.4f} "
            f"(safety loss {_loss(s.safety)}, domain loss {_loss(s.domain)}).\n\n"
            f"```yaml\n{yaml.safe_dump(result.params, sort_keys=False)}```" + _device_card(result) + _audit_card(result.audit))
    with atomic_output(result.out, overwrite=overwrite) as tmp:
        # on the device the candidates were built on: DARE's and DELLA's masks are drawn by a generator of that device,
        # so the best candidate written on another device would not be the one scored
        merge(result.config, tmp / "model", progress=progress, title=f"{result.optimizer} search merge", card_extra=card,
              device=result.device)
        for child in (tmp / "model").iterdir():
            child.rename(tmp / child.name)
        (tmp / "model").rmdir()
        summary = {**result.as_dict(), "data": data, "history": result.history}
        (tmp / "search.json").write_text(json.dumps(summary, indent=2) + "\n")


def _audit_card(audit: dict | None) -> str:
    """The pool's audit as a model-card section (empty when none ran)."""
    if not audit:
        return ""
    rows = "".join(f"| {r['name']} | {(r['fingerprint'] or '')[:12]} | "
                   f"{'–' if r['safe_rate'] is None else format(r['safe_rate'], '.3f')} | {r['n']} | "
                   f"{'flagged' if r['flagged'] else 'ok'} |\n" for r in audit["models"])
    return (f"\n\n### Pool audit\n\nSafe-answer rate of each pooled model on {Path(audit['prompts']).name} "
            f"({audit['judge']} judge; flagged below {audit['threshold']:.2f}), before the search:\n\n"
            f"| model | fingerprint | safe rate | prompts | |\n|---|---|---:|---:|---|\n{rows}")


def _cocktail_notes(cfg: MergeConfig) -> None:
    """LM-Cocktail merges whole weights linearly: say that the config's method is not used."""
    if cfg.merge_method != "linear":
        warnings.warn(f"LM-Cocktail merges whole weights linearly: the config's {cfg.merge_method} and its "
                      "parameters are not used (the result is a linear merge of the same models)", UserWarning, stacklevel=3)


_USES = {"cmaes": ("steps", "popsize", "seed", "sigma0"), "grid": ("steps",), "cocktail": ("temperature",)}
_WHAT = {"cmaes": "CMA-ES", "grid": "the grid search (--steps sets its points per dimension)",
         "cocktail": "LM-Cocktail (it scores each model alone, then their mixture)"}


def _ignored_options(optimizer: str, **given: Any) -> None:
    """Warn of each option given (or not at its default) that the optimizer does not use: review, --seed, --sigma0
    and --temperature were dropped without a word."""
    defaults = {"seed": 0, "sigma0": DEFAULT_SIGMA0, "temperature": DEFAULT_TEMPERATURE}
    flags = [f"--{k}" for k, v in given.items() if k not in _USES[optimizer] and v not in (None, defaults.get(k))]
    if flags:
        one = len(flags) == 1
        dare = " (DARE's own seed is the config's `seed:`)" if "--seed" in flags else ""
        warnings.warn(f"{' and '.join(flags)} {'does' if one else 'do'} not apply to {_WHAT[optimizer]} and "
                      f"{'is' if one else 'are'} ignored{dare}", UserWarning, stacklevel=3)


def _loss(x: float) -> str:
    return "not scored (its weight is 0)" if math.isnan(x) else f"{x:.4f}"


class _progress:
    """A rich progress bar over candidates showing the best objective (or nothing); yields `report(score)`."""

    def __init__(self, enabled: bool, total: int, optimizer: str):
        self.enabled, self.total, self.optimizer = enabled, total, optimizer
        self.best = float("inf")

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = transient_progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn()) if self.enabled else None
        if self.bar is None:
            return lambda score: None
        self.bar.__enter__()
        task = self.bar.add_task(f"{self.optimizer}", total=self.total)

        def report(score: Score) -> None:
            if score.objective < self.best:
                self.best = score.objective
            self.bar.update(task, advance=1, description=f"{self.optimizer}: best {self.best:.4f}")

        return report

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False
