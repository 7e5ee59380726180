"""The report's tables as data (`Table`), and their Markdown and HTML renderings.

Shaped like the papers': (1) domain accuracy per task and safety per set for every model (MergeAlign,
Tables 1-2), (2) the weighting table (MergeAlign α/β variants, Slerp weightings), (3) safety-aware vs
safety-unaware search (EvoMM, LM-Cocktail: with and without safety data, λ; "One Bad Model Spoils the
Bunch"), (4) L2 distances. Accuracies and rates are shown in percent with one decimal, the best value of
each score column in bold; a value that was not measured is "—".
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from safemerge.report.claims import Claim
from safemerge.report.results import ModelResult, Results, knowledge, safety, safety_aware

MISSING = "—"
METHOD_LABELS = {"pretrained": "pre-trained", "mergealign": "MergeAlign", "slerp": "Slerp", "ties": "TIES",
                 "dare_ties": "DARE-TIES", "evomm": "EvoMM", "cocktail": "LM-Cocktail", "dpo": "DPO",
                 "orpo": "ORPO"}
_GREEK = {"alpha": "α", "beta": "β", "lambda": "λ", "lambda_": "λ", "lam": "λ"}


@dataclass(frozen=True)
class Cell:
    text: str
    bold: bool = False
    numeric: bool = False


@dataclass(frozen=True)
class Table:
    """A titled grid of cells; `note` says how to read it (what the numbers are)."""

    title: str
    columns: list[str]
    rows: list[list[Cell]]
    note: str = ""
    numeric: list[bool] = field(default_factory=list)   # per column: right-aligned
    groups: list[tuple[str, int]] = field(default_factory=list)  # HTML: a header row of (label, column span)


# ---- formatting -------------------------------------------------------------------------------------

def pct(x: float | None) -> str:
    return MISSING if x is None else f"{100 * x:.1f}"


def fmt_l2(v: float) -> str:
    return f"{v:.3f}" if v < 100 else f"{v:.1f}"


def knowledge_label(res: Results) -> str:
    """'knowledge' when it is the mean over every domain, else 'knowledge (medicine)'."""
    return "knowledge" if res.focus == list(res.domains) else f"knowledge ({', '.join(res.focus)})"


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def format_params(params: dict) -> str:
    """{'alpha': 1, 'beta': 0.5} -> 'α=1, β=0.5'; lists compact, nested objects as JSON."""
    def value(v) -> str:
        if isinstance(v, float):
            return f"{v:g}"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, (dict, tuple)):
            return json.dumps(v, separators=(",", ":"), default=str)
        return str(v)
    return ", ".join(f"{_GREEK.get(k, k)}={value(v)}" for k, v in params.items()) or MISSING


# ---- building the tables ------------------------------------------------------------------------------

Column = tuple[str, str, Callable[[ModelResult], float | None]]   # (group, header, value)
DOMAIN_GROUP, GENERAL_GROUP, SAFETY_GROUP = "domain accuracy (%)", "general (%)", "safety (%)"


def _score_columns(res: Results, models: Sequence[ModelResult]) -> list[Column]:
    """One column per domain task and per safety set, with means where there are several.

    A domain's only task is headed by the domain's name (the report lists the task names).
    """
    cols: list[Column] = []
    for d, tasks in res.domains.items():
        for t in tasks:
            cols.append((DOMAIN_GROUP, d if len(tasks) == 1 else t, lambda m, t=t: m.domain.get(t)))
    for t in res.other_tasks:
        cols.append((DOMAIN_GROUP, t, lambda m, t=t: m.domain.get(t)))
    if len(res.focus) > 1 or any(len(res.domains[d]) > 1 for d in res.focus):   # else it repeats a column
        cols.append((DOMAIN_GROUP, knowledge_label(res), lambda m: knowledge(m, res)))
    if any(m.general is not None for m in models):
        cols.append((GENERAL_GROUP, "general", lambda m: m.general))
    sets = [s for s in res.safety_sets if any(s in m.safety for m in models)]
    cols += [(SAFETY_GROUP, s, lambda m, s=s: m.safety.get(s)) for s in sets]
    if len(sets) > 1:
        cols.append((SAFETY_GROUP, "safety", lambda m: safety(m)))
    return cols


def _table(title: str, models: Sequence[ModelResult], lead: list[tuple[str, Callable[[ModelResult], str]]],
           scores: list[Column], note: str) -> Table:
    values = [[f(m) for _, _, f in scores] for m in models]
    best = [_best([pct(v[j]) for v in values]) for j in range(len(scores))]  # bold what is shown: 90.0 and 90.0 tie
    rows = [[Cell(f(m)) for _, f in lead]
            + [Cell(pct(v), bold=v is not None and pct(v) == best[j], numeric=True)
               for j, v in enumerate(vals)]
            for m, vals in zip(models, values)]
    groups = [("", len(lead))]
    for g, _, _ in scores:
        if groups[-1][0] == g:
            groups[-1] = (g, groups[-1][1] + 1)
        else:
            groups.append((g, 1))
    return Table(title, [c for c, _ in lead] + [h for _, h, _ in scores], rows, note,
                 [False] * len(lead) + [True] * len(scores), groups)


def _best(shown: list[str]) -> str | None:
    """The column's largest value as shown, or None when there is nothing to single out (fewer than two distinct
    shown values)."""
    present = {v for v in shown if v != MISSING}
    return max(present, key=float) if len(present) > 1 else None


def _name_cols() -> list[tuple[str, Callable[[ModelResult], str]]]:
    return [("model", lambda m: m.name), ("method", lambda m: method_label(m.method))]


def main_table(res: Results) -> Table:
    models = list(res.models.values())
    return _table("domain accuracy and safety of every model", models, _name_cols(),
                  _score_columns(res, models),
                  "Accuracy (%) on each domain's task, general knowledge, and safe-answer rate (%) per safety "
                  "set; best of each column in bold. knowledge = mean accuracy over the knowledge domains; "
                  "safety = mean over the safety sets.")


def weighting_table(res: Results) -> Table | None:
    models = res.by_method("mergealign") + res.by_method("slerp")
    if not models:
        return None
    return _table("weightings (MergeAlign α/β, Slerp t)", models,
                  _name_cols() + [("weights", lambda m: format_params(m.params))], _score_columns(res, models),
                  "MergeAlign: θ + α·Σ_d τ_d + β·τ_aligned. Slerp: t = 0 is the first model; a list is a "
                  "gradient over the layers. Scores in %.")


def safety_data_table(res: Results) -> Table | None:
    models = res.by_method("evomm") + res.by_method("cocktail")
    if not models:
        return None

    def aware(m: ModelResult) -> str:
        return {True: "yes", False: "no", None: MISSING}[safety_aware(m)]

    def lam(m: ModelResult) -> str:
        v = next((m.params[k] for k in ("lambda", "lambda_", "lam") if k in m.params), None)
        return MISSING if v is None else f"{v:g}" if isinstance(v, (int, float)) else str(v)

    lead = _name_cols() + [("safety data", aware), ("λ", lam)]
    return _table("safety-aware vs safety-unaware merge search", models, lead,
                  _score_columns(res, models),
                  "EvoMM (CMA-ES) and LM-Cocktail searched with (λ > 0) and without (λ = 0) safety data in "
                  "the objective. Scores in %.")


def l2_table(res: Results) -> Table | None:
    models = [m for m in res.models.values() if m.l2]
    if not models:
        return None
    refs = list(dict.fromkeys(k for m in models for k in m.l2))
    rows = [[Cell(m.name), Cell(method_label(m.method))]
            + [Cell(MISSING if r not in m.l2 else fmt_l2(m.l2[r]), numeric=True) for r in refs] for m in models]
    return Table("L2 distance to the expert and to the aligned model", ["model", "method"]
                 + [f"L2 to {r}" for r in refs], rows,
                 "‖θ_model − θ_reference‖₂ over all parameters.", [False, False] + [True] * len(refs))


def claims_table(claims: Sequence[Claim]) -> Table:
    rows = [[Cell(c.verdict, bold=True), Cell(c.text), Cell(c.detail)] for c in claims]
    return Table("", ["verdict", "claim", "figures"], rows)


def report_tables(res: Results) -> dict[str, Table]:
    """The score tables in report order, by key; those without any model to show are left out."""
    tables = {"main": main_table(res), "weighting": weighting_table(res), "safety_data": safety_data_table(res),
              "l2": l2_table(res)}
    shown = {k: t for k, t in tables.items() if t is not None}
    return {k: replace(t, title=f"Table {i}: {t.title}") for i, (k, t) in enumerate(shown.items(), 1)}  # no gaps


# ---- rendering ----------------------------------------------------------------------------------------

def markdown_table(table: Table) -> str:
    """A GitHub-flavoured Markdown table: a bold title line, the grid, then the note in italics."""
    def cell(c: Cell) -> str:
        text = c.text.replace("|", "\\|").replace("\n", " ")
        return f"**{text}**" if c.bold else text
    aligns = [("---:" if n else "---") for n in (table.numeric or [False] * len(table.columns))]
    lines = ([f"**{table.title}**", ""] if table.title else []) + ["| " + " | ".join(h.replace("|", "\\|") for h in table.columns) + " |",
             "|" + "|".join(aligns) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table.rows]
    if table.note:
        lines += ["", f"*{table.note}*"]
    return "\n".join(lines) + "\n"


def html_table(table: Table, *, css_class: str = "scores") -> str:
    """An HTML <table> with a <caption> (escaped text, numeric columns right-aligned)."""
    numeric = table.numeric or [False] * len(table.columns)

    def td(c: Cell, num: bool, tag: str = "td") -> str:
        text = html.escape(c.text)
        klass = ' class="num"' if num else ""
        return f"<{tag}{klass}>{'<strong>' + text + '</strong>' if c.bold else text}</{tag}>"

    head = "".join(td(Cell(h), n, "th") for h, n in zip(table.columns, numeric))
    if table.groups and any(g for g, _ in table.groups):
        top = "".join(f'<th colspan="{span}" class="group">{html.escape(g)}</th>' for g, span in table.groups)
        head = f"{top}</tr>\n<tr>{head}"
    body = "\n".join("<tr>" + "".join(td(c, n) for c, n in zip(row, numeric)) + "</tr>" for row in table.rows)
    note = f'<p class="note">{html.escape(table.note)}</p>' if table.note else ""
    caption = f"<caption>{html.escape(table.title)}</caption>\n" if table.title else ""
    return (f'<table class="{css_class}">\n{caption}'
            f"<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>\n{note}\n")
