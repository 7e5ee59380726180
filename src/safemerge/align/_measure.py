"""The issue-6 measurement: DPO and ORPO of each testbed expert beside MergeAlign, before and after.

    python -m safemerge.align._measure TESTBED OUT [--domains medicine,finance] [--threads 1]
        [--max-samples N] [--epochs E] [--lr LR] [--warmup-steps W] [--tag NAME]

For each domain d: DPO(expert-d) and ORPO(expert-d) with `align`'s defaults (the paper's, unless
overridden), and MergeAlign(base, expert-d, aligned) with α = β = 1. Every model (base, aligned,
expert-d and the three made from it) is evaluated on the testbed's own data:

  safety     safe rate (keyword judge) of greedy chat completions of data/safety_test.jsonl
  over-ref.  refusal rate on data/benign_test.jsonl (the same judge: a refusal counts as "safe")
  domain     lm-eval `acc` on data/domain-d_test.jsonl, plain and chat formats
  general    lm-eval `acc` on data/general_test.jsonl (plain)

Writes OUT/results.json and prints a markdown table. Evaluations go to OUT/results.sqlite.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def evaluate(model: Path, tb: Path, domain: str, *, store: Path) -> dict:
    from safemerge.evaluate import evaluate_domain, evaluate_safety

    data = tb / "data"
    safety = evaluate_safety(model, prompts=data / "safety_test.jsonl", max_new_tokens=48, device="cpu", store=store)
    benign = evaluate_safety(model, prompts=data / "benign_test.jsonl", max_new_tokens=48, device="cpu", store=store)
    task = data / f"domain-{domain}_test.jsonl"
    return {
        "safety": safety["safe_rate"],
        "benign_refusal": benign["safe_rate"],
        "domain_acc": evaluate_domain(model, task=task, format="plain", device="cpu", store=store)["acc"],
        "domain_acc_chat": evaluate_domain(model, task=task, format="chat", device="cpu", store=store)["acc"],
        "general_acc": evaluate_domain(model, task=data / "general_test.jsonl", device="cpu", store=store)["acc"],
    }


def measure(tb: Path, out: Path, *, domains: list[str], overrides: dict, tag: str) -> dict:
    import safemerge
    from safemerge.align import align, load_run

    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.sqlite"
    results: dict = {"testbed": str(tb), "settings": overrides, "domains": {}}
    for d in domains:
        expert = tb / f"expert-{d}"
        row: dict = {"base": evaluate(tb / "base", tb, d, store=store),
                     "aligned": evaluate(tb / "aligned", tb, d, store=store),
                     "expert": evaluate(expert, tb, d, store=store)}
        for method in ("dpo", "orpo"):
            path = out / f"{method}{tag}-{d}"
            if not path.exists():
                align(expert, data=tb / "data" / "prefs.jsonl", out=path, method=method, device="cpu", **overrides)
            run = load_run(path)["training"]
            row[method] = evaluate(path, tb, d, store=store) | {
                "wall_s": run["wall_s"], "steps": run["steps"], "last_loss": run["last_loss"]}
        path, timing = out / f"mergealign-{d}", {}
        if not path.exists():  # shared by every run in OUT (it has no training settings)
            t0 = time.perf_counter()
            safemerge.mergealign(base=tb / "base", domains=[expert], aligned=tb / "aligned", out=path, progress=False)
            timing = {"wall_s": round(time.perf_counter() - t0, 2)}
        row["mergealign"] = evaluate(path, tb, d, store=store) | timing
        results["domains"][d] = row
        (out / f"results{tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def table(results: dict) -> str:
    lines = ["| domain | model | safety ↑ | benign refusal ↓ | domain acc (plain) | domain acc (chat) | general acc | time |",
             "|---|---|---|---|---|---|---|---|"]
    for d, row in results["domains"].items():
        for name, r in row.items():
            t = f"{r['wall_s']:.0f} s" if "wall_s" in r else ""
            lines.append(f"| {d} | {name} | {r['safety']:.3f} | {r['benign_refusal']:.3f} | {r['domain_acc']:.3f} | "
                         f"{r['domain_acc_chat']:.3f} | {r['general_acc']:.3f} | {t} |")
    return "\n".join(lines)


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("testbed", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--domains", default="medicine,finance")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    p.add_argument("--tag", default="", help="suffix of the output names, for runs with other settings")
    for opt, typ in (("max-samples", int), ("epochs", float), ("lr", float), ("warmup-steps", int), ("max-steps", int)):
        p.add_argument(f"--{opt}", type=typ)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    overrides = {k: v for k, v in {"max_samples": a.max_samples, "epochs": a.epochs, "lr": a.lr,
                                   "warmup_steps": a.warmup_steps, "max_steps": a.max_steps}.items() if v is not None}
    results = measure(a.testbed, a.out, domains=a.domains.split(","), overrides=overrides | {"progress": False},
                      tag=a.tag)
    print(table(results))


if __name__ == "__main__":
    main()
