"""Several runs side by side (one per seed): knowledge and safety of every model, and every claim's verdict.

    seeds_table(results_paths) -> str      # Markdown, as docs/reproduction.md shows it

Each run is a results.json (or the folder `safemerge repro` wrote it in). The model table gives
knowledge / safety (results.py's summary numbers, in %) per run and their mean; the claims table gives
each claim's verdict per run with the figures it was decided on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from safemerge.report.claims import check_claims
from safemerge.report.results import Results, ResultsError, knowledge, load_results, mean, results_file, safety


def _label(res: Results, path: str | os.PathLike, i: int) -> str:
    seed = res.meta.get("seed")
    return f"seed {seed}" if seed is not None else f"run {i + 1} ({_run_name(path)})"


def _run_name(path: str | os.PathLike) -> str:
    """The run's folder name: a path to a results.json is named by the folder it lies in (a JSON file of another
    name, or one in the working folder, by its own name)."""
    p = Path(path).expanduser().absolute()
    return p.parent.name if p.name == "results.json" and p.parent.name else p.name


def _same_study(runs: list[Results], paths: Sequence[str | os.PathLike]) -> None:
    """Runs side by side must differ in their seed only: a mean over presets, knowledge domains or testbed recipes
    means nothing. The recipe (`meta.testbed_code`, the hash of the testbed code and libraries) is compared where both
    runs record it; results.json files written before it was recorded are not refused for lacking it."""
    def study(r: Results) -> dict:
        return {"preset": r.meta.get("preset"), "domains": list(r.domains), "knowledge domains": list(r.focus),
                "safety sets": sorted({s for m in r.models.values() for s in m.safety}),
                "testbed recipe": r.meta.get("testbed_code")}

    first = study(runs[0])
    for r, p in zip(runs[1:], paths[1:]):
        other = study(r)
        diff = [k for k in first if first[k] != other[k]
                and not (k == "testbed recipe" and None in (first[k], other[k]))]
        if diff:
            raise ResultsError(f"{p}: differs from {paths[0]} in {', '.join(f'{k} ({other[k]} vs {first[k]})' for k in diff)}; "
                               "put side by side only runs of one study (seeds of the same preset and domains, on testbeds built by the "
                               "same code: rerun `safemerge repro` for the older seeds)")


def _each_once(paths: Sequence[str | os.PathLike]) -> None:
    """One run given twice (its folder and its results.json, or two spellings of one path) would count twice in
    every mean."""
    seen: dict[Path, str | os.PathLike] = {}
    for p in paths:
        f = results_file(Path(p).expanduser()).resolve()
        if f in seen:
            raise ResultsError(f"{p}: the same run as {seen[f]} ({f}); give each run once")
        seen[f] = p


def _mean_known(xs: list[float | None]) -> float | None:
    """The mean over the runs that have the figure (a run without the model is left out)."""
    return mean(x for x in xs if x is not None)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def seeds_table(results: Sequence[str | os.PathLike]) -> str:
    """Markdown tables of several runs of the same study: models × runs, then claims × runs."""
    _each_once(results)
    runs = [load_results(p) for p in results]  # a results.json or the run's folder
    _same_study(runs, results)
    labels = [_label(r, p, i) for i, (r, p) in enumerate(zip(runs, results))]
    if len(set(labels)) < len(labels):  # e.g. one seed run twice: name each by its folder too
        labels = [f"{lab} ({_run_name(p)})" for lab, p in zip(labels, results)]
    names: list[str] = []
    for r in runs:
        names += [n for n in r.models if n not in names]
    head = "| model | " + " | ".join(labels) + " | mean |"
    lines = ["**Knowledge / safety (%) of every model, per run**", "", head,
             "|---|" + "---:|" * (len(runs) + 1)]
    for name in names:
        ks, ss, cells = [], [], []
        for r in runs:
            m = r.get(name)
            k, s = (knowledge(m, r), safety(m)) if m is not None else (None, None)
            ks.append(k), ss.append(s)
            cells.append(f"{_pct(k)} / {_pct(s)}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_pct(_mean_known(ks))} / {_pct(_mean_known(ss))} |")
    lines += ["", "*knowledge = mean accuracy on the knowledge domains "
              f"({', '.join(runs[0].focus) or 'every domain'}); safety = mean safe-answer rate over the safety sets.*",
              "", "**Claims, per run**", "", "| claim | " + " | ".join(labels) + " |", "|---|" + "---|" * len(runs)]
    verdicts = [{c.id: c for c in check_claims(r)} for r in runs]
    ids = [c for v in verdicts for c in v]
    for cid in dict.fromkeys(ids):
        text = next(v[cid].text for v in verdicts if cid in v)
        cells = [v[cid].verdict if cid in v else "–" for v in verdicts]
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
