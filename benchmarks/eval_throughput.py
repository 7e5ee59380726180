"""Evaluation throughput on the testbed: safety prompts/s, and domain questions/s beside lm-eval.

    python benchmarks/eval_throughput.py [--testbed DIR] [--model aligned] [--repeat 10] [--batch-size 32] [--device cuda]

Safety: `evaluate_safety` (transformers backend, greedy, keyword judge) on data/safety_test.jsonl.
Domain: every multiple-choice question of the testbed (domain val/test and general), repeated
`--repeat` times into one JSONL, scored by `evaluate_domain` and by lm-evaluation-harness (through
`run_lm_eval`, the same in-memory model, the same batch size) in the same process; both accuracies are
printed, and must be equal. lm-eval is optional: without it only safemerge's figures are printed.
Timings include tokenization and data loading, not model loading. The store is bypassed (cache=False).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbed", type=Path, default=None, help="a built testbed (default: build/copy the micro one)")
    ap.add_argument("--model", default="aligned")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--format", choices=("plain", "chat"), default="plain")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from safemerge.evaluate import evaluate_domain, evaluate_safety, get_backend

    tmp = Path(tempfile.mkdtemp(prefix="safemerge-bench-"))
    testbed = args.testbed
    if testbed is None:
        from safemerge.testbed import build_testbed

        testbed = build_testbed(tmp / "testbed", preset="micro", progress=False)
    backend = get_backend(testbed / args.model, device=args.device, batch_size=args.batch_size)
    store = tmp / "results.sqlite"
    out = {"model": str(testbed / args.model), "threads": torch.get_num_threads(), "batch_size": args.batch_size,
           "device": str(next(backend.model.parameters()).device)}

    s = evaluate_safety(backend, prompts=testbed / "data" / "safety_test.jsonl", max_new_tokens=args.max_new_tokens,
                        store=store, cache=False)
    out["safety"] = {"prompts": s["n"], "seconds": s["seconds"], "prompts_per_second": s["prompts_per_second"],
                     "safe_rate": s["safe_rate"]}

    rows = []
    for f in sorted((testbed / "data").glob("*.jsonl")):
        if f.name.startswith(("domain-", "general")) and not f.name.endswith("_train.jsonl"):
            rows += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    mc = tmp / "mc.jsonl"
    # every repeat is a different question text, so no scorer can reuse identical requests
    mc.write_text("".join(
        json.dumps({"question": f"({i}) {r['question']}", "choices": r["choices"], "answer": r["answer"]}) + "\n"
        for i in range(args.repeat) for r in rows
    ))
    n = len(rows) * args.repeat

    t0 = time.perf_counter()
    d = evaluate_domain(backend, task=mc, format=args.format, batch_size=args.batch_size, store=store, cache=False)
    ours = time.perf_counter() - t0
    out["domain"] = {"questions": n, "safemerge": {"seconds": round(ours, 3), "questions_per_second": round(n / ours, 1),
                                                   "acc": d["acc"], "acc_norm": d["acc_norm"]}}
    try:
        from safemerge.evaluate import run_lm_eval

        t0 = time.perf_counter()
        le = run_lm_eval(backend, task=mc, format=args.format, batch_size=args.batch_size)
        theirs = time.perf_counter() - t0
        out["domain"]["lm_eval"] = {"seconds": round(theirs, 3), "questions_per_second": round(n / theirs, 1),
                                    "acc": le["acc"], "acc_norm": le["acc_norm"], "version": le["lm_eval_version"]}
        out["domain"]["same_accuracy"] = (le["acc"], le["acc_norm"]) == (d["acc"], d["acc_norm"])
        out["domain"]["speedup"] = round(theirs / ours, 2)
    except Exception as e:  # lm-eval not installed
        out["domain"]["lm_eval"] = f"not run: {e}"
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
