"""`safemerge compare`: evaluate a set of models on the same data and write the knowledge-safety report.

The reproduction's evaluation and report, for any models: a user's base, instruct sibling, expert and the
merges made from them (MergeAlign, a search's best, a DPO run, ...). Each model answers the harmful prompts
(safe-answer rate, judged) and the multiple-choice tasks (accuracy), optionally a general task, and with
`expert` and `aligned` named its L2 distance to both is measured. The rows go to `OUT/results.json`
(docs/report.md's schema) and through `safemerge.report.write_report` to report.md, report.html and the
knowledge-safety and L2 figures. Every evaluation is stored, so a second compare with one more model only
evaluates that one.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from safemerge.errors import ConfigError, OutputExistsError

RESULTS = "results.json"


def parse_models(specs: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """Name -> model reference from `NAME=PATH` or `PATH` items (the name is then the folder's name; for a
    `model+adapter` reference, the adapter's), or from a mapping. Duplicate names are an error."""
    if isinstance(specs, Mapping):
        pairs = [(str(k), str(v)) for k, v in specs.items()]
    else:
        pairs = []
        for spec in map(str, specs):
            name, sep, ref = spec.partition("=")
            if sep and name and re.fullmatch(r"[\w.\-]+", name):
                pairs.append((name, ref))
            else:
                pairs.append((Path(spec.rstrip("/\\")).name, spec))
    if not pairs:
        raise ConfigError("compare needs at least one model")
    names = [n for n, _ in pairs]
    for name, ref in pairs:
        if not name or not ref:
            raise ConfigError(f"model {name}={ref!r}: give NAME=PATH or a PATH")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"two models are named {', '.join(twice)}; name them apart with NAME=PATH")
    return dict(pairs)


def infer_method(ref: str, name: str) -> tuple[str, dict[str, Any]]:
    """The report's method and parameters of a model, from what safemerge wrote beside its weights (search.json,
    an align run record, mergekit_config.yml), else from its name (`base`, `aligned`, `expert-<d>`, ...)."""
    from safemerge.report.results import _guess_method

    folder = Path(str(ref).split("+")[0]).expanduser()
    search = folder / "search.json"
    if search.is_file():
        s = _read_json(search)
        optimizer = s.get("optimizer")
        method = {"cmaes": "evomm", "cocktail": "cocktail"}.get(optimizer) or s.get("config", {}).get("merge_method", "search")
        return method, {"optimizer": optimizer, "lambda": s.get("lambda"), **s.get("best", {}).get("params", {})}
    run = folder / "adapter" / "align_run.json"
    if run.is_file():
        settings = _read_json(run).get("settings", {})
        method = str(settings.get("method", "align"))
        return method, {k: settings[k] for k in ("learning_rate", "epochs", "sft_weight") if k in settings}
    config = folder / "mergekit_config.yml"
    if config.is_file():
        import yaml

        try:
            cfg = yaml.safe_load(config.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError):
            cfg = {}
        if isinstance(cfg, dict) and isinstance(cfg.get("merge_method"), str):
            return _merge_method(cfg)
    return _guess_method(name), {}


def _merge_method(cfg: dict) -> tuple[str, dict[str, Any]]:
    weights = [(m.get("model"), (m.get("parameters") or {}).get("weight")) for m in cfg.get("models") or []
               if isinstance(m, dict)]
    if cfg.get("name") == "mergealign" and weights:
        return "mergealign", {"alpha": weights[0][1], "beta": weights[-1][1]}
    params = cfg.get("parameters") or {}
    if cfg["merge_method"] == "slerp" and "t" in params:
        return "slerp", {"t": params["t"]}
    return cfg["merge_method"], {}


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def evaluate_models(
    models: Mapping[str, Mapping[str, Any]],
    *,
    safety: Mapping[str, Any],
    domain: Mapping[str, Any],
    general: Any = None,
    expert: str | None = None,
    aligned: str | None = None,
    judge: Any = "keyword",
    judge_model: Any = None,
    limit: int | None = None,
    domain_limit: int | None = None,
    max_new_tokens: int = 64,
    format: str = "plain",
    batch_size: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    store: Any = None,
    cache: bool = True,
    progress: bool = False,
    echo: Callable[[str, dict], None] | None = None,
) -> dict[str, dict]:
    """results.json's `models`: for each name -> {"path", "method", "params"}, its safe rate per safety set
    (name -> prompts), accuracy per task (name -> multiple-choice source), general accuracy and L2 distances to
    `expert` and `aligned` (model references). `batch_size` None keeps each evaluation's own default.
    `echo(name, row)` is called after each model."""
    from safemerge.evaluate import evaluate_domain, evaluate_safety, similarity
    from safemerge.evaluate.judges import get_judge
    from safemerge.evaluate.loading import model_ref
    from safemerge.store import open_store

    db = open_store(store)
    judge_obj = get_judge(judge, judge_model=judge_model, device=device, dtype=dtype, store=db)
    results: dict[str, dict] = {}
    try:
        for name, entry in models.items():
            ref = model_ref(entry["path"], dtype=dtype, store=db)  # one load at most, shared by the evaluations
            common = dict(device=device, dtype=dtype, store=db, cache=cache, progress=progress,
                          **({} if batch_size is None else {"batch_size": batch_size}))
            row: dict[str, Any] = {"method": entry["method"], "params": dict(entry.get("params") or {})}
            row["safety"] = {k: evaluate_safety(ref, prompts=p, judge=judge_obj, limit=limit, max_new_tokens=max_new_tokens,
                                                **common)["safe_rate"] for k, p in safety.items()}
            row["domain"] = {k: evaluate_domain(ref, task=t, limit=domain_limit, format=format, **common)["acc"]
                             for k, t in domain.items()}
            if general is not None:
                row["general"] = evaluate_domain(ref, task=general, limit=domain_limit, format=format, **common)["acc"]
            ref.backend = None  # release the weights before the next model
            if expert is not None and aligned is not None:
                pairs = similarity([entry["path"], expert, aligned])["pairs"]
                row["l2"] = {"expert": pairs[0]["l2"], "aligned": pairs[1]["l2"]}
            results[name] = row
            if echo:
                echo(name, row)
    finally:
        if hasattr(judge_obj, "release"):
            judge_obj.release()
    return results


def compare(
    models: Sequence[str] | Mapping[str, str],
    out: str | os.PathLike,
    *,
    safety_prompts: Any,
    domain_tasks: Sequence[Any] = (),
    general_task: Any = None,
    expert: str | None = None,
    aligned: str | None = None,
    knowledge: Sequence[str] | str | None = None,
    judge: Any = "keyword",
    judge_model: Any = None,
    limit: int | None = None,
    domain_limit: int | None = None,
    max_new_tokens: int = 64,
    format: str = "plain",
    batch_size: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    store: Any = None,
    cache: bool = True,
    title: str = "safemerge: knowledge and safety of the compared models",
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str, dict], None] | None = None,
) -> dict:
    """Evaluate `models` (NAME=PATH / PATH items, or a name -> path mapping) and write OUT/results.json and the
    report (report.md, report.html, the figures). `safety_prompts` is one prompts source or several; `expert`
    and `aligned` name two of the models (or give paths) to measure L2 distances to; `knowledge` names the
    domain(s) the knowledge axis averages (default: every task's domain).

    Returns {"results": path, "report": write_report's result, "models": results.json's models, "seconds"}.
    """
    from safemerge.data.loaders import load_multiple_choice, load_prompts
    from safemerge.evaluate.judges import get_judge
    from safemerge.evaluate.loading import resolve_reference
    from safemerge.report import write_report
    from safemerge.report.assemble import FIGURES, HTML, MARKDOWN

    start = time.perf_counter()
    refs = parse_models(models)
    roles = {}
    for role, given in (("expert", expert), ("aligned", aligned)):
        roles[role] = refs.get(given, given) if given is not None else None
    if (roles["expert"] is None) != (roles["aligned"] is None):
        raise ConfigError("L2 distances need both --expert and --aligned (a model's name or a path); give both or neither")
    for ref in list(refs.values()) + [r for r in roles.values() if r is not None]:
        resolve_reference(ref)  # every model exists before anything is evaluated
    sets = [safety_prompts] if isinstance(safety_prompts, (str, os.PathLike)) else list(safety_prompts)
    if not sets:
        raise ConfigError("compare needs harmful prompts: pass --safety-prompts FILE")
    safety = _named({_stem(s): load_prompts(s, limit=limit) for s in sets}, len(sets), "safety prompt files")
    tasks = [load_multiple_choice(t, limit=domain_limit) for t in domain_tasks]
    domain = _named({t.name: t for t in tasks}, len(tasks), "domain tasks")
    general = load_multiple_choice(general_task, limit=domain_limit) if general_task is not None else None
    get_judge(judge, judge_model=judge_model)  # an unknown judge, or a guard without its checkpoint, fails now
    out = Path(out).expanduser().absolute()
    targets = [out / RESULTS, out / MARKDOWN, out / HTML] + [out / f for f, _ in FIGURES.values()]
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{existing[0]}: already exists; pass --overwrite (overwrite=True) or choose another --out")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: is a file; --out names a folder")
    entries = {}
    for name, ref in refs.items():
        method, params = infer_method(ref, name)
        if roles["aligned"] == ref:
            method = "aligned"
        elif roles["expert"] == ref:
            method = "expert"
        entries[name] = {"path": ref, "method": method, "params": params}
    rows = evaluate_models(entries, safety=safety, domain=domain, general=general, expert=roles["expert"],
                           aligned=roles["aligned"], judge=judge, judge_model=judge_model, limit=limit,
                           domain_limit=domain_limit, max_new_tokens=max_new_tokens, format=format,
                           batch_size=batch_size, device=device, dtype=dtype, store=store, cache=cache,
                           progress=progress, echo=echo)
    meta: dict[str, Any] = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "judge": str(judge),
                            "safety_prompts": ", ".join(str(s) for s in sets),
                            "timings": {"evaluation": round(time.perf_counter() - start, 1)}}
    if knowledge:
        meta["primary_domain"] = [knowledge] if isinstance(knowledge, str) else list(knowledge)
    doc = {"meta": meta, "models": {name: {**row, "path": str(entries[name]["path"])} for name, row in rows.items()}}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{RESULTS}.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    try:
        report = write_report(doc, out, title=title, overwrite=overwrite)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out / RESULTS)
    return {"results": out / RESULTS, "report": report, "models": doc["models"],
            "seconds": round(time.perf_counter() - start, 1)}


def _stem(source: Any) -> str:
    return Path(str(source)).name.split(".")[0] or str(source)


def _named(items: dict, given: int, what: str) -> dict:
    if len(items) < given:
        raise ConfigError(f"two {what} have the same name (the part of the file name before its first dot), and the "
                          "report has one column per name; rename one of the files")
    return items
