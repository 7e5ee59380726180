"""Hand-made results dicts for the report tests (numbers invented, shaped like `safemerge repro`'s)."""

from __future__ import annotations

import copy

import pytest


def _model(method: str, med: float, fin: float, safe: float, *, params=None, general=0.5, l2=None) -> dict:
    return {"method": method, "params": params or {},
            "safety": {"safety_test": safe, "advbench_like": min(1.0, safe + 0.02)},
            "domain": {"domain-medicine_test": med, "domain-finance_test": fin},
            "general": general, "l2": l2 or {"expert": 10.0, "aligned": 10.0}}


FULL = {
    "meta": {"seed": 0, "preset": "small", "domains": ["medicine", "finance"], "created": "2025-01-01T00:00:00Z",
             "timings": {"testbed": 42.0, "merges": 75.5, "evaluate": 301.2}},
    "models": {
        "base": _model("pretrained", 0.30, 0.28, 0.10, l2={"expert": 8.0, "aligned": 7.0}),
        "aligned": _model("aligned", 0.32, 0.30, 0.95, l2={"expert": 9.0, "aligned": 0.0}),
        "expert-medicine": _model("expert", 0.80, 0.30, 0.15, l2={"expert": 0.0, "aligned": 9.0}),
        "expert-finance": _model("expert", 0.30, 0.76, 0.12, l2={"expert": 0.0, "aligned": 9.5}),
        "mergealign": _model("mergealign", 0.78, 0.72, 0.90, params={"alpha": 1, "beta": 1},
                             l2={"expert": 5.0, "aligned": 6.0}),
        "mergealign-a1-b0.5": _model("mergealign", 0.79, 0.74, 0.60, params={"alpha": 1, "beta": 0.5}),
        "mergealign-a0.5-b1": _model("mergealign", 0.60, 0.55, 0.93, params={"alpha": 0.5, "beta": 1}),
        "slerp-gradient": _model("slerp", 0.70, 0.65, 0.55, params={"t": [0, 0.5, 1, 0.5, 0]}),
        "slerp-0.7-0.3": _model("slerp", 0.72, 0.66, 0.45, params={"t": 0.3}),
        "ties-grid": _model("ties", 0.74, 0.70, 0.70, params={"density": 0.5, "weight": 1.0}),
        "evomm-safe": _model("evomm", 0.70, 0.66, 0.85, params={"lambda": 0.5}),
        "evomm-unsafe": _model("evomm", 0.76, 0.70, 0.40, params={"lambda": 0}),
        "cocktail-safe": _model("cocktail", 0.68, 0.62, 0.80, params={"lambda": 0.5}),
        "cocktail-unsafe": _model("cocktail", 0.74, 0.69, 0.35, params={"lambda": 0}),
        "dpo": _model("dpo", 0.74, 0.68, 0.80),
        "orpo": _model("orpo", 0.72, 0.66, 0.85),
    },
}


@pytest.fixture
def full() -> dict:
    """Every claim's models present; every claim passes."""
    return copy.deepcopy(FULL)


@pytest.fixture(scope="session")
def full_report(tmp_path_factory) -> dict:
    """write_report's answer for FULL, written once per session (figures take ~1 s to draw)."""
    from safemerge.report import write_report

    return write_report(copy.deepcopy(FULL), tmp_path_factory.mktemp("report"))
