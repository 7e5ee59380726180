"""`write_report`: results.json -> report.md (+ PNG figures beside it) and a self-contained report.html.

The HTML has no script and loads nothing: CSS inline, figures as base64 `data:` PNGs, and a
Content-Security-Policy that forbids every other source, so it reads the same offline.
"""

from __future__ import annotations

import base64
import html
import math
import os
import shutil
from pathlib import Path
from typing import Sequence

from safemerge._signals import note_finished
from safemerge.errors import OutputExistsError
from safemerge.report.claims import Claim, check_claims
from safemerge.report.figures import knowledge_safety_figure, l2_figure
from safemerge.report.results import Results, load_results
from safemerge.report.tables import Table, claims_table, html_table, markdown_table, report_tables

MARKDOWN, HTML = "report.md", "report.html"
FIGURES = {"knowledge_safety": ("report-knowledge-safety.png", "Knowledge vs safety of every model, with the "
                                "Pareto frontier ringed (like MergeAlign's Figure 2)"),
           "l2": ("report-l2.png", "L2 distance of each model to the expert and to the aligned model "
                  "(like MergeAlign's Figure 3)")}
DEFAULT_TITLE = "safemerge: reproduction of MergeAlign and safety-aware merging"


def write_report(results: dict | str | os.PathLike, out_dir: str | os.PathLike, *, title: str = DEFAULT_TITLE,
                 claims: Sequence[Claim] | None = None, overwrite: bool = False, record: bool = True) -> dict:
    """Write OUT/report.md, OUT/report.html and the figures' PNGs; return their paths and the verdicts.

    `results` is the results dict or the path of results.json; `claims` defaults to `check_claims(results)`.
    Existing report files are replaced only with `overwrite=True`. All files are drawn and rendered first,
    written to a temporary directory inside `out_dir`, then each renamed into place: no file is ever
    half-written, and a failure before the renames leaves the previous report untouched. `record`: note the report as
    the command's output (for an interrupt's message; compare notes its folder once results.json is there too).

    Returns {"markdown": Path, "html": Path, "figures": {key: Path}, "claims": [claim dicts],
    "verdicts": {"PASS": n, "FAIL": n, "SKIPPED": n}}.
    """
    res = load_results(results)
    claims = list(check_claims(res) if claims is None else claims)
    out = Path(out_dir).expanduser().absolute()
    targets = [out / MARKDOWN, out / HTML] + [out / f for f, _ in FIGURES.values()]
    existing = [p for p in targets if p.exists()]
    folders = [p for p in existing if not p.is_file()]
    if folders:
        raise OutputExistsError(f"{folders[0]}: is a folder where the report writes a file; move it away or choose "
                                "another --out")
    if existing and not overwrite:
        raise OutputExistsError(f"{existing[0]}: already exists; pass --overwrite (in Python: overwrite=True) to replace "
                                "the report, or choose another --out")
    figures = {k: png for k, png in (("knowledge_safety", knowledge_safety_figure(res)), ("l2", l2_figure(res)))
               if png is not None}
    tables = report_tables(res)
    files = {MARKDOWN: render_markdown(res, tables, figures, claims, title=title).encode(),
             HTML: render_html(res, tables, figures, claims, title=title).encode()}
    files.update({FIGURES[k][0]: png for k, png in figures.items()})
    _write_all(out, files, stale=[p for p in existing if p.name not in files])
    if record:
        note_finished(out)
    verdicts = {v: sum(c.verdict == v for c in claims) for v in ("PASS", "FAIL", "SKIPPED")}
    return {"markdown": out / MARKDOWN, "html": out / HTML,
            "figures": {k: out / FIGURES[k][0] for k in figures},
            "claims": [c.to_dict() for c in claims], "verdicts": verdicts}


def _write_all(out: Path, files: dict[str, bytes], *, stale: list[Path]) -> None:
    from safemerge._signals import signals_held
    from safemerge.checkpoint import check_output_folder

    check_output_folder(out, "the report is written into a folder")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".report.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        with signals_held():  # Ctrl-C or kill waits until every file is in place: never half old, half new
            for name in files:
                os.replace(tmp / name, out / name)
            for p in stale:              # a figure of an earlier report that this one no longer has
                p.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- shared pieces ----------------------------------------------------------------------------------

def _summary(res: Results, claims: Sequence[Claim]) -> str:
    counts = {v: sum(c.verdict == v for c in claims) for v in ("PASS", "FAIL", "SKIPPED")}
    return f"{len(res.models)} models; claims: {counts['PASS']} PASS, {counts['FAIL']} FAIL, " \
           f"{counts['SKIPPED']} SKIPPED (verdicts at the end)."


def _meta_rows(res: Results) -> list[tuple[str, str]]:
    rows = [(k.replace("_", " "), ", ".join(map(str, v)) if isinstance(v, list) else str(v))
            for k, v in res.meta.items() if k != "timings" and not isinstance(v, dict)]
    if res.domains and any(ts != [d] for d, ts in res.domains.items()):  # (a domain with one task of its own name: no news)
        rows.append(("domain tasks", "; ".join(f"{d}: {', '.join(ts)}" for d, ts in res.domains.items())))
        rows.append(("knowledge domains", ", ".join(res.focus)))
    return rows


def _timings(res: Results) -> list[tuple[str, str]]:
    timings = res.meta.get("timings")
    if not isinstance(timings, dict):
        return []
    return [(str(k), _timing(v)) for k, v in timings.items()]


def _timing(v) -> str:
    """Seconds as a duration; None or a non-finite number (NaN) is "not measured"; anything else as written."""
    if isinstance(v, (int, float)) and math.isfinite(v):
        return _duration(v)
    return "not measured" if v is None or isinstance(v, float) else str(v)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:04.1f} s"


_READING = ("knowledge = mean accuracy over the knowledge domains (meta.primary_domain where given, else "
            "every domain), each on its own task(s); safety = mean safe-answer rate over the safety sets. "
            "MergeAlign = the model named mergealign (α = β = 1). The claims compare two models only on what "
            "both were measured on; the knowledge claim compares, for each knowledge domain d, MergeAlign's "
            "accuracy on d's task with expert-d's, and averages over those domains.")


# ---- Markdown ---------------------------------------------------------------------------------------

def render_markdown(res: Results, tables: dict[str, Table], figures: dict[str, bytes], claims: Sequence[Claim],
                    *, title: str) -> str:
    parts = [f"# {title}", "", _summary(res, claims), ""]
    parts += [f"- **{k}**: {v}" for k, v in _meta_rows(res)] + [""]
    if "knowledge_safety" in figures:
        parts += _md_figure("knowledge_safety")
    for key, t in tables.items():
        parts += [markdown_table(t)]
        if key == "l2" and "l2" in figures:       # the figure follows its table
            parts += _md_figure("l2")
    parts += ["## How to read it", "", _READING, ""]
    if timings := _timings(res):
        parts += ["## Timings", "", "| stage | time |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in timings] + [""]
    parts += ["## Claims", "", markdown_table(claims_table(claims)) if claims else "No claims were checked.", ""]
    return "\n".join(parts)


def _md_figure(key: str) -> list[str]:
    name, caption = FIGURES[key]
    return [f"![{caption}]({name})", "", f"*{caption}.*", ""]


# ---- HTML -------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:0;
  color:#1d1d1f;background:#fafafa;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.2em;margin:32px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.summary{font-size:1.05em;margin:6px 0 14px}.summary .badge{min-width:0;margin:0 2px}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:0 0 10px;font-size:.92em}
dl.meta dt{color:#666}dl.meta dd{margin:0}
.wrap{overflow-x:auto;margin:14px 0 4px}
table{border-collapse:collapse;font-size:.84em;background:#fff;box-shadow:0 0 0 1px #ddd}
caption{text-align:left;font-weight:600;padding:0 0 6px;font-size:1.05em;white-space:nowrap}
th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;white-space:nowrap}
th{background:#f0f0f3;font-weight:600}th.group{text-align:center;border-left:2px solid #fff;color:#444;font-weight:500}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#fafafc}
p.note{color:#555;font-size:.85em;margin:4px 0 18px}
figure{margin:18px 0;background:#fff;box-shadow:0 0 0 1px #ddd;padding:10px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{color:#444;font-size:.9em;margin-top:6px}
ul.claims{list-style:none;padding:0}
ul.claims li{background:#fff;box-shadow:0 0 0 1px #ddd;margin:8px 0;padding:8px 12px;display:flex;gap:12px}
.badge{display:inline-block;min-width:5.2em;text-align:center;font-weight:700;border-radius:4px;padding:2px 6px;
  color:#fff;align-self:flex-start;font-size:.85em}
.PASS{background:#1a7f37}.FAIL{background:#cf222e}.SKIPPED{background:#6e7781}
.claim-text{font-weight:600}.claim-detail{color:#444;font-size:.9em;font-variant-numeric:tabular-nums}
"""
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def render_html(res: Results, tables: dict[str, Table], figures: dict[str, bytes], claims: Sequence[Claim],
                *, title: str) -> str:
    esc = html.escape
    counts = " ".join(f'<span class="badge {v}">{sum(c.verdict == v for c in claims)} {v}</span>'
                      for v in ("PASS", "FAIL", "SKIPPED"))
    body = [f"<h1>{esc(title)}</h1>", f'<p class="summary">{len(res.models)} models. Claims: {counts} '
            '<a href="#claims">(verdicts at the end)</a></p>']
    if meta := _meta_rows(res):
        body.append('<dl class="meta">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in meta) + "</dl>")
    if "knowledge_safety" in figures:
        body.append(_html_figure("knowledge_safety", figures["knowledge_safety"]))
    for key, t in tables.items():
        body.append(f'<div class="wrap">{html_table(t)}</div>')
        if key == "l2" and "l2" in figures:
            body.append(_html_figure("l2", figures["l2"]))
    body.append(f"<h2>How to read it</h2><p>{esc(_READING)}</p>")
    if timings := _timings(res):
        rows = "".join(f'<tr><td>{esc(k)}</td><td class="num">{esc(v)}</td></tr>' for k, v in timings)
        body.append(f'<h2>Timings</h2><table class="timings"><thead><tr><th>stage</th><th class="num">time</th>'
                    f"</tr></thead><tbody>{rows}</tbody></table>")
    body.append('<h2 id="claims">Claims</h2>' + (_html_claims(claims) if claims else "<p>No claims were checked.</p>"))
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(body) + "\n</main>\n</body>\n</html>\n")


def _html_figure(key: str, png: bytes) -> str:
    name, caption = FIGURES[key]
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="{key}"><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}.</figcaption></figure>")


def _html_claims(claims: Sequence[Claim]) -> str:
    items = "".join(f'<li data-claim="{html.escape(c.id)}"><span class="badge {c.verdict}">{c.verdict}</span>'
                    f'<div><div class="claim-text">{html.escape(c.text)}</div>'
                    f'<div class="claim-detail">{html.escape(c.detail)}</div></div></li>' for c in claims)
    return f'<ul class="claims">{items}</ul>'
