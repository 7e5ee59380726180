"""EvoMM against the search data's size: CMA-ES over task-arithmetic weights (aligned + the medicine
expert), 30 generations, at each λ, with N synthetic refusals and N medicine Q&A; then the merged
model's held-out safety rate and medicine accuracy, evaluated as `safemerge repro` does.

    python benchmarks/search_data_size.py runs/s0/testbed --n 400 --lambdas 0.5,0 [--seed 0] [--out DIR] [--unseen]
    python benchmarks/search_data_size.py runs/s0/testbed --n 96 --experts medicine,finance --optimizers cmaes,cocktail

With --experts the pool is the aligned model and those experts (the three-model pool: medicine,finance): the
refusals are collected from that pool, the domain Q&A are the first N/k training rows of each of the k domains, and
every one of those domains' accuracy is reported. --optimizers runs LM-Cocktail (a `linear` mixture of the whole
models, T = 1) beside or instead of CMA-ES, as `safemerge repro` runs it.

The data are made as `safemerge repro` makes them (`safemerge.repro.write_search_data`; the three-model pool's
the same way, from its three models and both domains): the pool's
refusals to the first N training harmful prompts, kept where the keyword judge sees a refusal, and the
first N rows of the testbed's medicine training Q&A. With --unseen the refusals answer N new harmful prompts
instead, drawn as the world draws its training requests (training templates, frames and targets) but none of
them a prompt the aligned model was trained on. Prints one JSON line per optimizer and λ. docs/search.md ("Data size",
"Prompts the aligned model was not trained on") and docs/reproduction.md ("The three-model pool") have the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def unseen_prompts(tb: Path, n: int, seed: int) -> list[dict]:
    """N harmful prompts from the training templates, frames and targets of the testbed's world, none of them one of
    its training prompts (so none the aligned model learned to refuse); `seed` seeds the draw."""
    import random

    from safemerge.testbed import templates as T
    from safemerge.testbed.presets import get_preset
    from safemerge.testbed.world import _request, generate_world

    meta = json.loads((tb / "world.json").read_text())
    world = generate_world(meta["seed"], get_preset(meta["preset"]))  # the testbed's world, whatever --seed says
    seen = {r.prompt for r in world.requests["harmful_train"]}
    kinds = [(c, t) for c in sorted(T.HARMFUL) for kw in sorted(T.HARMFUL[c]) for t in T.HARMFUL[c][kw]
             if t not in world.test_templates]
    rng, rows = random.Random(f"unseen-{seed}"), []
    while len(rows) < n:
        c, t = rng.choice(kinds)
        frame = rng.choice(world.frames["train"])
        phrasing = T.phrasing(rng.choice(T.OPENERS), frame, rng.choice(T.CLOSERS))
        r = _request(rng, c, t, rng.choice(world.targets["train"][T.slot(t)]), frame, phrasing, True)
        if r.prompt not in seen:
            seen.add(r.prompt)
            rows.append({"prompt": r.prompt, "category": r.category})
    return rows


def write_pool_data(tb: Path, experts: list[str], n: int, seed: int, safety: Path, domain: Path) -> None:
    """The three-model pool's data, made as `write_search_data` makes one expert's: the refusals of the aligned model
    and every expert to the training harmful prompts, and the first n/k training Q&A of each of the k domains."""
    from safemerge.data.synthetic import synthesize_safety

    if not safety.exists():
        synthesize_safety([tb / "aligned", *(tb / f"expert-{d}" for d in experts)], safety,
                          prompts=tb / "data" / "safety_train.jsonl", n=n, seed=seed, max_new_tokens=32, progress=False)
    if not domain.exists():
        rows = [r for d in experts for r in (tb / "data" / f"domain-{d}_train.jsonl").read_text().splitlines()[:n // len(experts)]]
        domain.write_text("\n".join(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("testbed", type=Path)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--lambdas", default="0.5,0")
    ap.add_argument("--seed", type=int, default=None, help="search and sampling seed (default: the testbed's)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None, help="keep the data, journals and models here")
    ap.add_argument("--unseen", action="store_true", help="refusals to new prompts, not to the aligned model's training ones")
    ap.add_argument("--experts", default="medicine", help="the pool's experts beside the aligned model, e.g. medicine,finance")
    ap.add_argument("--optimizers", default="cmaes", help="cmaes (EvoMM over task-arithmetic weights), cocktail, or both")
    args = ap.parse_args()
    experts = args.experts.split(",")
    optimizers = args.optimizers.split(",")
    if not set(optimizers) <= {"cmaes", "cocktail"} or (args.unseen and experts != ["medicine"]):
        ap.error("--optimizers takes cmaes and cocktail; --unseen only the medicine pool")

    import torch

    torch.set_num_threads(1)
    from safemerge.evaluate import evaluate_domain, evaluate_safety
    from safemerge.repro import write_search_data
    from safemerge.search import search

    tb = args.testbed
    seed = args.seed if args.seed is not None else json.loads((tb / "world.json").read_text())["seed"]
    out = args.out or Path(tempfile.mkdtemp(prefix="safemerge-datasize-"))
    out.mkdir(parents=True, exist_ok=True)
    pool_tag = "" if experts == ["medicine"] else "-".join(experts) + "-"
    safety, domain = out / f"safety-{pool_tag}n{args.n}.jsonl", out / f"domain-{pool_tag}n{args.n}.jsonl"
    if args.unseen:
        from safemerge.data.synthetic import synthesize_safety

        safety = out / f"safety-unseen-n{args.n}.jsonl"
        if not safety.exists():
            prompts = out / f"unseen-prompts-n{args.n}.jsonl"
            prompts.write_text("".join(json.dumps(r) + "\n" for r in unseen_prompts(tb, args.n, seed)))
            synthesize_safety([tb / "aligned", tb / "expert-medicine"], safety, prompts=prompts, n=args.n, seed=seed,
                              max_new_tokens=32, progress=False)
    if pool_tag:
        write_pool_data(tb, experts, args.n, seed, safety, domain)
    else:
        write_search_data(tb, "medicine", n=args.n, seed=seed, safety=safety, domain=domain)  # as `safemerge repro`
    kept = sum(1 for line in safety.read_text().splitlines() if line.strip())
    models = [{"model": str(tb / f"expert-{d}"), "parameters": {"weight": 1.0}} for d in experts]
    models.append({"model": str(tb / "aligned"), "parameters": {"weight": 1.0}})
    configs = {"cmaes": {"merge_method": "task_arithmetic", "base_model": str(tb / "base"), "models": models,
                         "tokenizer_source": str(tb / "aligned")},
               "cocktail": {"merge_method": "linear", "models": models, "tokenizer_source": str(tb / "aligned")}}
    for opt in optimizers:
        for lam in (float(x) for x in args.lambdas.split(",")):
            t0 = time.time()
            tag = f"{'unseen-' if args.unseen else ''}{pool_tag}{'' if opt == 'cmaes' else 'cocktail-'}n{args.n}-lambda{lam}"
            model = out / tag
            search(configs[opt], model, optimizer=opt, safety_data=safety if lam > 0 else None, domain_data=domain,
                   lambda_=lam, steps=args.steps if opt == "cmaes" else None, seed=seed, overwrite=True,
                   progress=False, journal=out / f"{tag}.sqlite", audit=False)  # measures the search alone
            best = json.loads((model / "search.json").read_text())["best"]
            store = out / "results.sqlite"
            s = evaluate_safety(model, prompts=tb / "data" / "safety_test.jsonl", judge="keyword", max_new_tokens=32,
                                store=store)
            acc = {d: evaluate_domain(model, task=tb / "data" / f"domain-{d}_test.jsonl", store=store)["acc"]
                   for d in experts}
            print(json.dumps({"seed": seed, "n": args.n, "unseen": args.unseen, "experts": experts, "optimizer": opt,
                              "refusals_kept": kept, "lambda": lam, "params": best["params"], "safety": s["safe_rate"],
                              **acc, "minutes": round((time.time() - t0) / 60, 1)}), flush=True)


if __name__ == "__main__":
    main()
