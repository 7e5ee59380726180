"""EvoMM against the search data's size: CMA-ES over task-arithmetic weights (aligned + the medicine
expert), 30 generations, at each λ, with N synthetic refusals and N medicine Q&A; then the merged
model's held-out safety rate and medicine accuracy, evaluated as `safemerge repro` does.

    python benchmarks/search_data_size.py runs/s0/testbed --n 400 --lambdas 0.5,0 [--seed 0] [--out DIR]

The data are made as `safemerge repro` makes them (`safemerge.repro.write_search_data`): the pool's
refusals to the first N training harmful prompts, kept where the keyword judge sees a refusal, and the
first N rows of the testbed's medicine training Q&A. Prints one JSON line
per λ. docs/search.md ("Data size") has the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("testbed", type=Path)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--lambdas", default="0.5,0")
    ap.add_argument("--seed", type=int, default=None, help="search and sampling seed (default: the testbed's)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None, help="keep the data, journals and models here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from safemerge.evaluate import evaluate_domain, evaluate_safety
    from safemerge.repro import write_search_data
    from safemerge.search import search

    tb = args.testbed
    seed = args.seed if args.seed is not None else json.loads((tb / "world.json").read_text())["seed"]
    out = args.out or Path(tempfile.mkdtemp(prefix="safemerge-datasize-"))
    out.mkdir(parents=True, exist_ok=True)
    safety, domain = out / f"safety-n{args.n}.jsonl", out / f"domain-n{args.n}.jsonl"
    write_search_data(tb, "medicine", n=args.n, seed=seed, safety=safety, domain=domain)  # as `safemerge repro`
    kept = sum(1 for line in safety.read_text().splitlines() if line.strip())
    cfg = {"merge_method": "task_arithmetic", "base_model": str(tb / "base"), "tokenizer_source": str(tb / "aligned"),
           "models": [{"model": str(tb / "expert-medicine"), "parameters": {"weight": 1.0}},
                      {"model": str(tb / "aligned"), "parameters": {"weight": 1.0}}]}
    for lam in (float(x) for x in args.lambdas.split(",")):
        t0 = time.time()
        model = out / f"n{args.n}-lambda{lam}"
        search(cfg, model, optimizer="cmaes", safety_data=safety if lam > 0 else None, domain_data=domain,
               lambda_=lam, steps=args.steps, seed=seed, overwrite=True, progress=False,
               journal=out / f"n{args.n}-lambda{lam}.sqlite", audit=False)  # measures the search alone
        best = json.loads((model / "search.json").read_text())["best"]
        store = out / "results.sqlite"
        s = evaluate_safety(model, prompts=tb / "data" / "safety_test.jsonl", judge="keyword", max_new_tokens=32,
                            store=store)
        d = evaluate_domain(model, task=tb / "data" / "domain-medicine_test.jsonl", store=store)
        print(json.dumps({"seed": seed, "n": args.n, "refusals_kept": kept, "lambda": lam, "params": best["params"],
                          "safety": s["safe_rate"], "medicine": d["acc"],
                          "minutes": round((time.time() - t0) / 60, 1)}), flush=True)


if __name__ == "__main__":
    main()
