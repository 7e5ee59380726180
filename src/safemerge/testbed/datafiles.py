"""The data sets written beside the models, in the formats real data comes in.

| file                          | rows                                                   | like            |
|-------------------------------|--------------------------------------------------------|-----------------|
| data/safety_train.jsonl       | {"prompt", "category"} harmful, training split         | BeaverTails     |
| data/safety_test.jsonl        | {"prompt", "category"} harmful, unseen phrasings/targets | BeaverTails   |
| data/benign_test.jsonl        | {"prompt", "category"} benign, unseen phrasings/targets | (over-refusal) |
| data/domain-<d>_val.jsonl     | {"question", "choices", "answer": index}               | lm-eval MC      |
| data/domain-<d>_test.jsonl    | {"question", "choices", "answer": index}               | lm-eval MC      |
| data/domain-<d>_train.jsonl   | {"prompt", "response"} the expert's chat Q&A           | SFT data        |
| data/general_test.jsonl       | {"question", "choices", "answer": index, "answer_text"} | lm-eval MC     |
| data/prefs.jsonl              | {"prompt", "chosen", "rejected", "kind"}               | DPO / ORPO      |
"""

from __future__ import annotations

import json
from pathlib import Path

from safemerge.testbed.corpora import knowledge_qa
from safemerge.testbed.world import MCItem, World


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _mc_rows(items: list[MCItem]) -> list[dict]:
    return [{"question": it.question, "choices": list(it.choices), "answer": it.answer} for it in items]


def _prefs(world: World) -> list[dict]:
    """Harmful → (refusal ≻ compliance); benign → (help ≻ refusal), so a preference tune cannot just refuse."""
    rows = [{"prompt": r.prompt, "chosen": r.refusal, "rejected": r.compliance, "kind": "safety"}
            for r in world.requests["harmful_train"]]
    rows += [{"prompt": r.prompt, "chosen": r.compliance, "rejected": r.refusal, "kind": "helpful"}
             for r in world.requests["benign_train"]]
    return rows


def write_data(world: World, data_dir: Path, domains: tuple[str, ...]) -> dict[str, int]:
    """Write every data file; returns file name -> number of rows."""
    data_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[dict]] = {
        "safety_train.jsonl": [{"prompt": r.prompt, "category": r.category} for r in world.requests["harmful_train"]],
        "safety_test.jsonl": [{"prompt": r.prompt, "category": r.category} for r in world.requests["harmful_test"]],
        "benign_test.jsonl": [{"prompt": r.prompt, "category": r.category} for r in world.requests["benign_test"]],
        "prefs.jsonl": _prefs(world),
        "general_test.jsonl": [
            {**row, "answer_text": it.choices[it.answer]}
            for row, it in zip(_mc_rows(world.mc["general"]["test"]), world.mc["general"]["test"])
        ],
    }
    for d in domains:
        files[f"domain-{d}_val.jsonl"] = _mc_rows(world.mc[d]["val"])
        files[f"domain-{d}_test.jsonl"] = _mc_rows(world.mc[d]["test"])
        files[f"domain-{d}_train.jsonl"] = [
            {"prompt": q, "response": a} for q, a in knowledge_qa(world.areas[d], world.facts[d])
        ]
    for name, rows in files.items():
        write_jsonl(data_dir / name, rows)
    return {name: len(rows) for name, rows in files.items()}
