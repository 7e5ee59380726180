"""A `results.json` as typed objects, and the two numbers every table, figure and claim is built on.

Schema (issue 7), every field but `models` optional:

    {"meta":   {"seed", "preset", "domains": [d, ...], "primary_domain": d, "timings": {stage: seconds},
                "created", ...},
     "models": {name: {"method": str, "params": {...},
                       "safety":  {set_name: rate},      # share of safe answers, in [0, 1]
                       "domain":  {task_name: acc},      # accuracy, in [0, 1]
                       "general": acc,
                       "l2":      {"expert": d, "aligned": d}}}}

The two summary numbers (docs/report.md):

- **knowledge(m)** = mean over the *knowledge domains* d of m's accuracy on d's task(s), the x of the
  knowledge-safety figure. The knowledge domains are `meta.primary_domain` (a name or a list) where it
  is given, since `safemerge repro` makes the single-expert models (MergeAlign, Slerp, EvoMM, DPO, ...)
  from the primary domain's expert; else all the study's domains. The study's domains are
  `meta.domains`, else the `<d>` of every `expert-<d>` model, else each task is its own domain. A task
  belongs to domain d when d is one of the words of its name (`medicine`, `domain-medicine_test` and
  `medicine-mc` all belong to `medicine`); several tasks of one domain are averaged first, so every
  domain weighs the same.
- **safety(m)** = mean of m's rates over its safety sets, the y of the figure.

A missing or non-finite value (None, NaN) counts as not measured and is left out of every mean.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from safemerge.errors import SafemergeError

FAMILY_ORDER = ("pretrained", "aligned", "expert")
METHOD_ORDER = ("pretrained", "aligned", "expert", "mergealign", "slerp", "ties", "dare_ties", "evomm",
                "cocktail", "dpo", "orpo")


class ResultsError(SafemergeError, ValueError):
    """A results.json that does not follow the schema."""


@dataclass(frozen=True)
class ModelResult:
    """One evaluated model. Every mapping is name -> value in [0, 1] (l2: reference -> distance >= 0)."""

    name: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    safety: dict[str, float] = field(default_factory=dict)
    domain: dict[str, float] = field(default_factory=dict)
    general: float | None = None
    l2: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Results:
    """All models in report order (the family first, then by method), the metadata and the domain map."""

    models: dict[str, ModelResult]
    meta: dict[str, Any]
    domains: dict[str, list[str]]      # domain -> its tasks (in the order first seen)
    other_tasks: list[str]             # tasks that belong to no domain: shown, never averaged in
    focus: list[str]                   # the knowledge domains: meta.primary_domain, else every domain

    def get(self, name: str) -> ModelResult | None:
        return self.models.get(name)

    def by_method(self, method: str) -> list[ModelResult]:
        return [m for m in self.models.values() if m.method == method]

    @property
    def safety_sets(self) -> list[str]:
        return _union(m.safety for m in self.models.values())

    @property
    def tasks(self) -> list[str]:
        return [t for ts in self.domains.values() for t in ts] + self.other_tasks


# ---- loading and validation --------------------------------------------------------------------------

def results_file(path: str | os.PathLike) -> Path:
    """The results.json a path names: itself, or the one in a run's folder (as `seeds` takes it)."""
    p = Path(path)
    return p / "results.json" if p.is_dir() and (p / "results.json").is_file() else p


def load_results(results: dict | str | Path) -> Results:
    """Parse and validate a results dict or a path to results.json; errors name the offending field."""
    src = "results"
    if not isinstance(results, dict):
        path = results_file(results)
        src = str(path)
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ResultsError(f"{path}: no such file; pass the results.json that `safemerge repro` wrote") from None
        except IsADirectoryError:
            raise ResultsError(f"{path}: is a folder without results.json; pass the results.json that `safemerge repro` wrote") from None
        except UnicodeDecodeError:
            raise ResultsError(f"{path}: not a UTF-8 text file; pass the results.json that `safemerge repro` wrote") from None
        except json.JSONDecodeError as e:
            raise ResultsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(results, dict) or not isinstance(results.get("models"), dict):
        raise ResultsError(f"{src}: expected an object with a 'models' object of name -> results")
    meta = results.get("meta") or {}
    if not isinstance(meta, dict):
        raise ResultsError(f"{src}: 'meta' must be an object, got {type(meta).__name__}")
    for key in ("domains", "primary_domain"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, str) or
                                      (isinstance(value, list) and all(isinstance(d, str) for d in value))):
            raise ResultsError(f"{src}: meta.{key} must be a name, \"a,b\" or a list of names, got {value!r}")
    models = [_model(name, raw, f"{src}: models.{name}") for name, raw in results["models"].items()]
    models.sort(key=_order_key)
    tasks = _union(m.domain for m in models)
    domains, other = map_domains(tasks, study_domains(meta, [m.name for m in models]))
    return Results(models={m.name: m for m in models}, meta=meta, domains=domains, other_tasks=other,
                   focus=knowledge_domains(meta, domains, src=src))


MODEL_KEYS = ("method", "params", "safety", "domain", "general", "l2", "path")  # what compare and repro write


def _model(name: str, raw: Any, where: str) -> ModelResult:
    if not isinstance(raw, dict):
        raise ResultsError(f"{where}: expected an object, got {type(raw).__name__}")
    unknown = [k for k in raw if k not in MODEL_KEYS]
    if unknown:  # a misnamed field ("safety_rate") would leave the model without figures, and every claim SKIPPED
        raise ResultsError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; a model entry has "
                           f"{', '.join(MODEL_KEYS)}")
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise ResultsError(f"{where}.params: expected an object, got {type(params).__name__}")
    return ModelResult(
        name=name,
        method=str(raw.get("method") or _guess_method(name)),
        params=params,
        safety=_rates(raw.get("safety"), f"{where}.safety", upper=1.0),
        domain=_rates(raw.get("domain"), f"{where}.domain", upper=1.0),
        general=_number(raw.get("general"), f"{where}.general", upper=1.0),
        l2=_rates(raw.get("l2"), f"{where}.l2", upper=math.inf),
    )


def _rates(raw: Any, where: str, *, upper: float) -> dict[str, float]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ResultsError(f"{where}: expected an object of name -> number, got {type(raw).__name__}")
    values = {str(k): _number(v, f"{where}.{k}", upper=upper) for k, v in raw.items()}
    return {k: v for k, v in values.items() if v is not None}


def _number(raw: Any, where: str, *, upper: float) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ResultsError(f"{where}: expected a number, got {raw!r}")
    value = float(raw)
    if math.isnan(value) or (math.isinf(value) and upper == math.inf):  # not measured (an infinite rate is out of
        return None  # range below, not hidden as "—")
    if not 0.0 <= value <= upper:
        hint = "rates and accuracies are fractions in [0, 1], not percentages" if upper == 1.0 else "distances are >= 0"
        raise ResultsError(f"{where} = {raw}: out of range; {hint}")
    return value


def _guess_method(name: str) -> str:
    if name == "base":
        return "pretrained"
    head = name.split("-")[0]
    return {"expert": "expert", "aligned": "aligned"}.get(head, head)


def _order_key(m: ModelResult) -> tuple:
    """By method (the papers' order, then unknown methods by name); within a method, as given (stable sort)."""
    rank = METHOD_ORDER.index(m.method) if m.method in METHOD_ORDER else len(METHOD_ORDER)
    return (rank, "" if rank < len(METHOD_ORDER) else m.method)


def _union(maps: Iterable[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for m in maps:
        seen.update(dict.fromkeys(m))
    return list(seen)


# ---- domains -----------------------------------------------------------------------------------------

def study_domains(meta: dict, names: Iterable[str]) -> list[str]:
    """The study's domains: meta.domains (a list or "a,b"), else the <d> of every expert-<d> model."""
    given = meta.get("domains")
    if isinstance(given, str):
        given = [d.strip() for d in given.split(",") if d.strip()]
    if given:
        return [str(d) for d in given]
    return [n[len("expert-"):] for n in names if n.startswith("expert-")]


def knowledge_domains(meta: dict, domains: dict[str, list[str]], *, src: str = "results") -> list[str]:
    """meta.primary_domain (a name, "a,b" or a list) where those domains have tasks, else every domain."""
    given = meta.get("primary_domain")
    if isinstance(given, str):
        given = [d.strip() for d in given.split(",") if d.strip()]
    unknown = [str(d) for d in given or [] if str(d) not in domains]
    if unknown:  # the knowledge claims would silently judge another domain
        raise ResultsError(f"{src}: meta.primary_domain names {', '.join(map(repr, unknown))}, which no task of the results "
                           f"belongs to (domains: {', '.join(domains) or 'none'}); give the task that domain's name "
                           f"(compare: --domain-task {unknown[0]}=FILE) or name one of these domains (--knowledge)")
    return [str(d) for d in given or []] or list(domains)


def map_domains(tasks: list[str], domains: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Assign each task to the first domain that is one of the words of its name.

    Returns (domain -> tasks, unassigned tasks). Domains without a task are left out. Without any domain
    every task is its own domain.
    """
    if not domains:
        return {t: [t] for t in tasks}, []
    out: dict[str, list[str]] = {}
    other = []
    for t in tasks:  # a task named as a domain is that domain's, before any domain that is a word of its name
        d = t if t in domains else next((d for d in domains if _is_word_of(d, t)), None)
        if d is None:
            other.append(t)
        else:
            out.setdefault(d, []).append(t)
    return {d: out[d] for d in domains if d in out}, other


def _is_word_of(word: str, name: str) -> bool:
    """`medicine` is a word of `domain-medicine_test`, not of `biomedicine`."""
    return re.search(rf"(?<![0-9a-z]){re.escape(word.lower())}(?![0-9a-z])", name.lower()) is not None


def safety_aware(m: ModelResult) -> bool | None:
    """Whether a searched merge used safety data: params.safety_data, else a -safe/-unsafe name, else λ > 0."""
    flag = m.params.get("safety_data")
    if isinstance(flag, bool):
        return flag
    if m.name.endswith("-unsafe"):
        return False
    if m.name.endswith("-safe"):
        return True
    lam = next((m.params[k] for k in ("lambda", "lambda_", "lam") if k in m.params), None)
    return None if not isinstance(lam, (int, float)) else lam > 0


# ---- the two summary numbers ---------------------------------------------------------------------------

def mean(values: Iterable[float]) -> float | None:
    vals = list(values)
    return sum(vals) / len(vals) if vals else None


def shared_tasks(a: ModelResult, b: ModelResult, tasks: Iterable[str]) -> list[str]:
    """Those of `tasks` both models have a number for (a domain compared on what both were measured on)."""
    return [t for t in tasks if t in a.domain and t in b.domain]  # (missing and NaN values are dropped at loading)


def domain_accuracy(m: ModelResult, tasks: list[str]) -> float | None:
    """Mean accuracy of m over those of `tasks` it was evaluated on (one domain's tasks)."""
    return mean(m.domain[t] for t in tasks if t in m.domain)


def knowledge(m: ModelResult, res: Results, *, domains: Iterable[str] | None = None) -> float | None:
    """Mean over `domains` (default: the knowledge domains, `res.focus`) of m's accuracy on their tasks."""
    names = res.focus if domains is None else domains
    return mean(a for d in names if (a := domain_accuracy(m, res.domains.get(d, []))) is not None)


def safety(m: ModelResult, *, sets: Iterable[str] | None = None) -> float | None:
    """Mean of m's safety rates over `sets` (default: all of its own)."""
    names = m.safety if sets is None else sets
    return mean(m.safety[s] for s in names if s in m.safety)
