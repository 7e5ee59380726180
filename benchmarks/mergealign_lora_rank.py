"""MergeAlign with a task vector shipped as a LoRA adapter: how much rank does it need?

For each rank r, `safemerge extract-lora` factors one fine-tune's change from the base (the aligned model's: the
alignment vector τ_a; or the expert's: τ_d) into a rank-r adapter; then MergeAlign (task arithmetic, α = β = 1)
merges the base, the other model as a folder and the `base+adapter` reference, and both the adapter model on its
own and the merge are evaluated as `safemerge repro` evaluates them (held-out harmful prompts, greedy 32 tokens,
keyword judge; the domain's multiple-choice test). A row "full" is the folder itself.

    python benchmarks/mergealign_lora_rank.py runs/s0/testbed --ranks 4,16,64,128 [--vector alignment|domain]
        [--domain medicine] [--svd exact|randomized] [--embed-lora] [--out DIR]

Prints one JSON line per rank. docs/methods.md ("LoRA extraction") has the figures.
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
    ap.add_argument("--ranks", default="4,16,64,128")
    ap.add_argument("--vector", choices=["alignment", "domain"], default="alignment",
                    help="which task vector goes through the adapter (the other model stays a folder)")
    ap.add_argument("--domain", default="medicine")
    ap.add_argument("--svd", choices=["exact", "randomized"], default="exact")
    ap.add_argument("--embed-lora", action="store_true", help="factor the embeddings and lm_head too (default: whole)")
    ap.add_argument("--out", type=Path, default=None, help="keep the adapters and merges here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    import safemerge
    from safemerge.evaluate import evaluate_domain, evaluate_safety

    tb = args.testbed
    base, aligned, expert = tb / "base", tb / "aligned", tb / f"expert-{args.domain}"
    lora_of, folder = (aligned, expert) if args.vector == "alignment" else (expert, aligned)
    out = args.out or Path(tempfile.mkdtemp(prefix="safemerge-lora-rank-"))
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.sqlite"

    def scores(model: str | Path) -> dict:
        s = evaluate_safety(model, prompts=tb / "data" / "safety_test.jsonl", judge="keyword", max_new_tokens=32,
                            store=store)
        d = evaluate_domain(model, task=tb / "data" / f"domain-{args.domain}_test.jsonl", store=store)
        return {"safety": s["safe_rate"], args.domain: d["acc"]}

    for rank in [r for r in args.ranks.split(",") if r] + ["full"]:
        t0 = time.time()
        row: dict = {"vector": args.vector, "rank": rank, "embed_lora": args.embed_lora}
        if rank == "full":
            ref = str(lora_of)
        else:
            adapter = out / f"{lora_of.name}-r{rank}"
            ext = safemerge.extract_lora(lora_of, base, adapter, rank=int(rank), svd=args.svd,
                                         embed_lora=args.embed_lora, overwrite=True, progress=False)
            ref = f"{base}+{adapter}"
            row |= {"relative_error": round(ext.total_error, 4),
                    "adapter_MB": round(sum(f.stat().st_size for f in adapter.iterdir()) / 1e6, 2)}
        row["model"] = scores(ref)
        merged = out / f"mergealign-{args.vector}-r{rank}"
        safemerge.merge({"merge_method": "task_arithmetic", "base_model": str(base), "tokenizer_source": str(aligned),
                         "models": [{"model": str(folder), "parameters": {"weight": 1.0}},
                                    {"model": ref, "parameters": {"weight": 1.0}}]},
                        merged, overwrite=True, progress=False)
        row["mergealign"] = scores(merged)
        row["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
