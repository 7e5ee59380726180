"""Reports: a results.json as report.md and a self-contained report.html with the papers' tables, figures
and a PASS/FAIL/SKIPPED verdict per claim (issue 7; docs/report.md).

    write_report(results, out_dir, *, title=..., claims=None, overwrite=False) -> dict
    check_claims(results, *, ratio=0.9) -> list[Claim]
    load_results(results) -> Results          # validated, typed; errors name the field

Modules: results (schema, knowledge/safety), claims, tables, figures, assemble (Markdown + HTML).
"""

from __future__ import annotations

from safemerge.report.assemble import write_report
from safemerge.report.claims import Claim, check_claims
from safemerge.report.figures import pareto_frontier
from safemerge.report.results import ModelResult, Results, ResultsError, load_results

__all__ = ["Claim", "ModelResult", "Results", "ResultsError", "check_claims", "load_results", "pareto_frontier",
           "write_report"]
