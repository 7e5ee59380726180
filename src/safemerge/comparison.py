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
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from safemerge._args import as_list, check_arguments
from safemerge._signals import note_finished
from safemerge.errors import CheckpointError, ConfigError, OutputExistsError, did_you_mean
from safemerge.naming import file_stem, first_repeat, named_item, task_columns, unique_columns

if TYPE_CHECKING:
    import torch

RESULTS = "results.json"


def parse_models(specs: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """Name -> model reference from `NAME=PATH` or `PATH` items (the name is then the folder's name; for a
    `model+adapter` reference, the adapter's), or from a mapping. Duplicate names are an error."""
    if isinstance(specs, Mapping):
        pairs = [(str(k), str(v)) for k, v in specs.items()]
    else:
        pairs = [named_item(spec, default=lambda ref: Path(ref.rstrip("/\\")).name) for spec in map(str, specs)]
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


def _align_method(run: Path) -> tuple[str, dict[str, Any]]:
    """DPO / ORPO and the settings that tell runs apart, from an align run record (max_steps where it cut a run short
    of its epochs)."""
    settings = _read_json(run).get("settings", {})
    keys = ("lr", "epochs", "max_steps", "sft_weight")
    return str(settings.get("method", "align")), {k: settings[k] for k in keys if settings.get(k) is not None}


def infer_method(ref: str, name: str) -> tuple[str, dict[str, Any]]:
    """The report's method and parameters of a model, from what safemerge wrote beside its weights (search.json,
    an align run record, mergekit_config.yml), else from its name (`base`, `aligned`, `expert-<d>`, ...)."""
    if "+" in str(ref) and not Path(str(ref)).expanduser().exists():  # model+adapter: an align run's adapter folder
        from safemerge.config import split_reference                    # says what made it; others say nothing

        run = Path(split_reference(str(ref))[1]).expanduser() / "align_run.json"
        return _align_method(run) if run.is_file() else (_method_from_name(name), {})
    folder = Path(str(ref)).expanduser()
    search = folder / "search.json"
    if search.is_file():
        s = _read_json(search)
        optimizer = s.get("optimizer")
        method = {"cmaes": "evomm", "cocktail": "cocktail"}.get(optimizer) or s.get("config", {}).get("merge_method", "search")
        return method, {"optimizer": optimizer, "lambda": s.get("lambda"), **s.get("best", {}).get("params", {})}
    run = folder / "adapter" / "align_run.json"
    if run.is_file():
        return _align_method(run)
    config = folder / "mergekit_config.yml"
    if config.is_file():
        import yaml

        try:
            cfg = yaml.safe_load(config.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError):
            cfg = {}
        if isinstance(cfg, dict) and isinstance(cfg.get("merge_method"), str):
            return _merge_method(cfg)
    return _method_from_name(name), {}


def _method_from_name(name: str) -> str:
    """The report's method for a model known only by its name: `base` is the pre-trained model, and a name that
    begins with a method of the papers (`aligned`, `expert-<d>`, `mergealign-…`, `dpo-…`) is that method; any other
    name (`Llama-3-8B-Instruct`) is a plain `model`."""
    from safemerge.report.results import METHOD_ORDER, _guess_method

    method = _guess_method(name)
    return method if method in METHOD_ORDER else "model"


def _merge_method(cfg: dict) -> tuple[str, dict[str, Any]]:
    models = cfg.get("models") if isinstance(cfg.get("models"), list) else []
    weights = [(m.get("model"), m["parameters"].get("weight")) for m in models
               if isinstance(m, dict) and isinstance(m.get("parameters"), dict)]
    if cfg.get("name") == "mergealign" and weights:
        return "mergealign", {"alpha": weights[0][1], "beta": weights[-1][1]}
    params = cfg.get("parameters") if isinstance(cfg.get("parameters"), dict) else {}
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
    expert: str | os.PathLike | None = None,
    aligned: str | os.PathLike | None = None,
    judge: Any = "keyword",
    judge_model: Any = None,
    limit: int | None = None,
    domain_limit: int | None = None,
    max_new_tokens: int = 256,
    format: str = "plain",
    batch_size: int | None = None,
    device: str = "auto",
    dtype: "str | torch.dtype" = "auto",
    store: Any = None,
    cache: bool = True,
    progress: bool = False,
    echo: Callable[[str, dict], None] | None = None,
) -> dict[str, dict]:
    """results.json's `models`: for each name -> {"path", "method", "params"}, its safe rate per safety set
    (name -> prompts), accuracy per task (name -> multiple-choice source), general accuracy and L2 distances to
    `expert` and `aligned` (model references). `batch_size` None keeps each evaluation's own default.
    `echo(name, row)` is called after each model."""
    from safemerge.evaluate import evaluate_domain, evaluate_safety
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
                row["l2"] = _l2(entry["path"], expert, aligned, db, cache)
            results[name] = row
            if echo:
                echo(name, row)
    finally:
        if hasattr(judge_obj, "release"):
            judge_obj.release()
    return results


def _l2(model: str, expert: str, aligned: str, db: Any, cache: bool) -> dict[str, float]:
    """‖θ_model − θ_expert‖ and ‖θ_model − θ_aligned‖, stored under the three weight fingerprints."""
    from safemerge.evaluate import similarity
    from safemerge.store import result_key

    fp, *refs = (db.fingerprint(str(m)) for m in (model, expert, aligned))
    data = ":".join(refs)
    key = result_key("l2", model=fp, data=data)
    hit = db.get(key) if cache else None
    if hit is not None:
        return hit
    pairs = similarity([model, expert, aligned])["pairs"]
    result = {"expert": pairs[0]["l2"], "aligned": pairs[1]["l2"]}
    db.put(key, result, kind="l2", model=fp, data=data)
    return result


def compare(
    models: Sequence[str] | Mapping[str, str],
    out: str | os.PathLike,
    *,
    safety_prompts: Any,
    domain_tasks: Sequence[Any] = (),
    general_task: Any = None,
    expert: str | os.PathLike | None = None,
    aligned: str | os.PathLike | None = None,
    knowledge: Sequence[str] | str | None = None,
    judge: Any = "keyword",
    judge_model: Any = None,
    limit: int | None = None,
    domain_limit: int | None = None,
    max_new_tokens: int = 256,
    format: str = "plain",
    batch_size: int | None = None,
    device: str = "auto",
    dtype: "str | torch.dtype" = "auto",
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
    check_arguments(compare, locals())
    models, domain_tasks = as_list(models), as_list(domain_tasks)
    from safemerge.checkpoint import check_output_folder
    from safemerge.data.loaders import load_multiple_choice, load_prompts
    from safemerge.evaluate.domain import FORMATS
    from safemerge.evaluate.judges import get_judge
    from safemerge.evaluate.loading import check_batch_size, resolve_device, resolve_dtype
    from safemerge.evaluate.similarity import check_comparable
    from safemerge.report import write_report
    from safemerge.report.assemble import FIGURES, HTML, MARKDOWN

    start = time.perf_counter()
    refs = parse_models(models)
    for role, given in (("expert", expert), ("aligned", aligned)):
        bare = isinstance(given, str) and not any(c in given for c in "/\\+")  # a name, not a path or model+adapter
        if bare and given not in refs and not Path(given).expanduser().exists():
            raise ConfigError(f"--{role} {given}: no model of that name (the names are {', '.join(refs)}) and no folder "
                              f"of that name here{did_you_mean(given, refs)}")
    roles = {role: (refs.get(given, given) if given is not None else None)
             for role, given in (("expert", expert), ("aligned", aligned))}
    if (roles["expert"] is None) != (roles["aligned"] is None):
        raise ConfigError("L2 distances need both --expert and --aligned (a model's name or a path); give both or neither")
    where = {ref: _check_model(ref) for ref in list(refs.values()) + [r for r in roles.values() if r is not None]}
    # (a trailing slash, another spelling of the path: the table would list it twice)
    if twice := first_repeat(list(refs.items()), lambda item: where[item[1]]):
        (name, ref), (other, earlier) = twice
        raise ConfigError(f"{name}={ref}: the same model as {other}={earlier}; compare each model once")
    if roles["expert"] is not None:  # each model's L2 distances are measured after its evaluations: checked first
        for name, ref in refs.items():
            try:
                check_comparable([ref, roles["expert"], roles["aligned"]])
            except CheckpointError as e:
                raise CheckpointError(f"{e}. The L2 distances compare {name} with --expert and --aligned tensor by "
                                      "tensor; leave out --expert and --aligned to compare without them") from None
    sets = [safety_prompts] if isinstance(safety_prompts, (str, os.PathLike)) else list(safety_prompts)
    if not sets:
        raise ConfigError("compare needs harmful prompts: pass --safety-prompts FILE")
    safety = unique_columns([(file_stem(s), s) for s in sets], "safety prompt files", "rename one of the files",
                            lambda s: load_prompts(s, limit=limit))
    keyed = task_columns(domain_tasks)
    domain = unique_columns([(key, src) for key, _, src in keyed], "domain tasks",
                            "rename one of the files (or, for FILE items, name their domains with DOMAIN=FILE)",
                            lambda src: load_multiple_choice(src, limit=domain_limit))
    general = load_multiple_choice(general_task, limit=domain_limit) if general_task is not None else None
    domains = _domains([(key, d) for key, d, _ in keyed], list(refs))
    _warn_role_names(refs, expert=expert)
    picked = [knowledge] if isinstance(knowledge, str) else list(knowledge or [])
    unknown = [k for k in picked if k not in domains]
    if unknown:
        raise ConfigError(f"--knowledge {', '.join(unknown)}: no domain task of that name; the domains are "
                          f"{', '.join(domains) or 'none (give --domain-task)'} (name a task's domain with DOMAIN=FILE)")
    if format not in FORMATS:
        raise ConfigError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    resolve_device(device)
    resolve_dtype(dtype)
    get_judge(judge, judge_model=judge_model)  # an unknown judge, or a guard without its checkpoint, fails now
    if batch_size is not None:
        check_batch_size(batch_size=batch_size)
    out = Path(out).expanduser().absolute()
    check_output_folder(out, "--out names a folder")
    inside = next((m for m, _ in where.values() if out.resolve() == Path(m) or Path(m) in out.resolve().parents), None)
    if inside is not None:
        raise OutputExistsError(f"--out {out}: lies in the model folder {inside}; write the report elsewhere")
    targets = [out / RESULTS, out / MARKDOWN, out / HTML] + [out / f for f, _ in FIGURES.values()]
    existing = [p for p in targets if p.exists()]
    if any(not p.is_file() for p in existing):
        raise OutputExistsError(f"{next(p for p in existing if not p.is_file())}: is a folder where compare writes a "
                                "file; move it away or choose another --out")
    if existing and not overwrite:
        raise OutputExistsError(f"{existing[0]}: already exists; pass --overwrite (in Python: overwrite=True) or choose another --out")
    entries = {}
    for name, ref in refs.items():
        method, params = infer_method(ref, name)
        if roles["aligned"] is not None and where[ref] == where[roles["aligned"]]:
            method = "aligned"
        elif roles["expert"] is not None and where[ref] == where[roles["expert"]]:
            method = "expert"
        entries[name] = {"path": ref, "method": method, "params": params}
    rows = evaluate_models(entries, safety=safety, domain=domain, general=general, expert=roles["expert"],
                           aligned=roles["aligned"], judge=judge, judge_model=judge_model, limit=limit,
                           domain_limit=domain_limit, max_new_tokens=max_new_tokens, format=format,
                           batch_size=batch_size, device=device, dtype=dtype, store=store, cache=cache,
                           progress=progress, echo=echo)
    meta: dict[str, Any] = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "judge": str(judge),
                            **({"judge_model": str(judge_model)} if judge_model is not None else {}),
                            "max_new_tokens": max_new_tokens, "format": format,  # what the figures were measured with
                            "safety_prompts": ", ".join(str(s) for s in sets),
                            "safety_prompts_used": "; ".join(f"{key}: {len(ps.prompts)}" for key, ps in safety.items()),
                            "timings": {"evaluation": round(time.perf_counter() - start, 1)}}
    if domain:
        meta["domain_task_files"] = "; ".join(f"{key}: {qs.source}" for key, qs in domain.items())
        meta["domain_questions_used"] = "; ".join(f"{key}: {len(qs.questions)}" for key, qs in domain.items())
    if general is not None:
        meta["general_task_file"] = general.source
        meta["general_questions_used"] = len(general.questions)
    if domains:
        meta["domains"] = domains
    if picked:
        meta["primary_domain"] = picked
    doc = {"meta": meta, "models": {name: {**row, "path": str(entries[name]["path"])} for name, row in rows.items()}}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{RESULTS}.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    try:
        report = write_report(doc, out, title=title, overwrite=overwrite, record=False)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out / RESULTS)
    note_finished(out)
    return {"results": out / RESULTS, "report": report, "models": doc["models"],
            "seconds": round(time.perf_counter() - start, 1)}


def _check_model(ref: str) -> tuple[str, str | None]:
    """That `ref` is a model (a folder with weights, or `model+adapter`), before anything is evaluated; its resolved
    (model, adapter) folders, which say whether two references name the same model."""
    from safemerge.evaluate.loading import same_model_key
    from safemerge.lora import open_model

    key = same_model_key(ref)  # refuses a single weights file
    open_model(f"{key[0]}+{key[1]}" if key[1] is not None else key[0])
    return key


def _warn_role_names(refs: dict[str, str], *, expert: str | None) -> None:
    """--expert names a model the knowledge claim will not find: it compares MergeAlign with `expert-<d>` by name
    (the aligned model is found by its method too, which compare gives the --aligned model)."""
    import warnings

    name = expert if expert in refs else next((n for n, r in refs.items() if r == expert), None)
    if name is not None and not name.startswith("expert-"):
        warnings.warn(f"--expert {expert}: used for the L2 distances, but the knowledge claim compares MergeAlign with "
                      "the model named expert-<domain>; to check it, name the expert so (expert-<domain>=PATH)",
                      UserWarning, stacklevel=3)


def _domains(columns: list[tuple[str, str | None]], models: list[str]) -> list[str]:
    """The study's domains, one per task column: the domain a task was given (DOMAIN=FILE); else the <d> of an
    `expert-<d>` model when d is a word of the task's name; else the task itself. An expert whose domain has no task
    gets a warning (the knowledge claim compares MergeAlign with expert-<d> on d's task)."""
    import warnings

    from safemerge.report.results import _is_word_of

    experts = [m[len("expert-"):] for m in models if m.startswith("expert-")]
    out = [given or next((e for e in experts if _is_word_of(e, key)), key) for key, given in columns]
    missing = [e for e in experts if e not in out]
    if columns and missing:
        warnings.warn(f"{', '.join('expert-' + e for e in missing)}: no domain task belongs to "
                      f"{', '.join(missing)}, so the knowledge claim cannot compare with it; name the expert's task "
                      f"with --domain-task {missing[0]}=FILE", UserWarning, stacklevel=3)
    return list(dict.fromkeys(out))
