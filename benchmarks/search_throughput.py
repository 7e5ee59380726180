"""Search throughput: candidates scored per minute in memory versus on disk, and workers over serial.

    python benchmarks/search_throughput.py TESTBED [--n 20] [--examples 32] [--method ties] [--workers 2] [--ray] [--device cuda]
        [--batch-size 16] [--trim-memo-gib G] [--random-family H,L,I]

The same candidates (a fixed, seeded set of TIES configs over aligned + expert-medicine) are scored
three ways, in one run, with the same objective (λ = 0.5, `--examples` rows of each data file):

  in memory   safemerge.search: the pool read once, each candidate written into one model in place
  on disk     each candidate merged to a directory by safemerge.merge on the same device, loaded with
              from_pretrained, then scored (what a search without in-memory candidates does)
  workers     the in-memory scorer in N worker processes (and on N Ray actors with --ray)

Each way scores one candidate untimed first (first-call costs; the workers' is their warm-up). Prints one JSON
object: candidates per minute of each way and the ratios.

`--random-family HIDDEN,LAYERS,INTERMEDIATE` measures the same on larger models than the testbed's: a random Llama
family of that shape (base; aligned and expert-medicine = base + 0.1·std deltas; float32; benchmarks/_family.py) with
the testbed's tokenizer and vocabulary, written to a temporary folder, scored on the testbed's data. The losses of
random models mean nothing; the time to build and score a candidate is what is measured.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def configs(testbed: Path, n: int, method: str, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def params() -> dict:
        p = {"weight": rng.uniform(0.2, 1.0)}
        if method != "task_arithmetic":
            p["density"] = rng.uniform(0.2, 1.0)
        return p

    out = []
    for _ in range(n):
        models = [{"model": str(testbed / m), "parameters": params()} for m in ("aligned", "expert-medicine")]
        out.append({"merge_method": method, "base_model": str(testbed / "base"), "models": models})
    return out


def random_family(testbed: Path, shape: str, root: Path) -> Path:
    """base, aligned and expert-medicine of the given shape, random, with the testbed's tokenizer."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _family import LlamaSpec, write_family

    hidden, layers, inter = (int(x) for x in shape.split(","))
    vocab = json.loads((testbed / "base" / "config.json").read_text())["vocab_size"]
    heads = max(1, hidden // 64)
    spec = LlamaSpec(hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab, intermediate_size=inter,
                     num_attention_heads=heads, num_key_value_heads=heads)
    dirs = write_family(root, spec=spec, roles=("base", "aligned", "expert-medicine"), seed=0, dtype="float32",
                        delta_scale=0.1)
    for d in dirs.values():
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copy(testbed / "base" / f, d / f)
    return root


def data_files(testbed: Path, examples: int, tmp: Path) -> tuple[Path, Path]:
    """Safety: harmful training prompts with a fixed refusal; domain: the testbed's Q&A (first N rows)."""
    safety = tmp / "safety.jsonl"
    rows = [json.loads(line) for line in (testbed / "data" / "safety_train.jsonl").read_text().splitlines()[:examples]]
    safety.write_text("".join(json.dumps({"prompt": r["prompt"], "response": "I'm sorry, but I can't help with that."}) + "\n"
                              for r in rows))
    domain = tmp / "domain.jsonl"
    domain.write_text("\n".join((testbed / "data" / "domain-medicine_train.jsonl").read_text().splitlines()[:examples]) + "\n")
    return safety, domain


def through_disk(config: dict, out: Path, device: str):
    """The on-disk way's candidate: merged to `out` by safemerge.merge on the scoring device (DARE's draws depend on
    it), loaded with from_pretrained onto that device; the folder is removed again."""
    from transformers import AutoModelForCausalLM

    import safemerge

    safemerge.merge(config, out, progress=False, device=device)
    model = AutoModelForCausalLM.from_pretrained(out).to(device).eval()
    shutil.rmtree(out)
    return model


def in_memory(cfgs, spec) -> tuple[float, list[float], int]:
    """Seconds, objectives, and the TIES / DARE memo's budget in bytes (the default's, where the spec sets none)."""
    from safemerge.search.scoring import SerialScorer

    scorer = SerialScorer(spec)  # built once: not counted, as in a search
    scorer.score_one(cfgs[0])  # warm-up (first-call costs), as the parallel way's workers get one
    start = time.perf_counter()
    scores = [scorer.score_one(c)[0].objective for c in cfgs]
    return time.perf_counter() - start, scores, scorer.candidate._memo.budget


def materialise_only(cfgs, spec, tmp: Path) -> tuple[float, float, float]:
    """Seconds to put every candidate's weights into a model, without scoring: in place vs merge + load; and the in-place
    way's first load (untimed in the rates, as the scored ways' warm-up)."""
    from safemerge.search.candidates import CandidateModel

    cm = CandidateModel(cfgs[0], device=spec.device, trim_memo_bytes=spec.trim_memo_bytes)
    start = time.perf_counter()
    cm.load(cfgs[0])  # untimed below, as in_memory's warm-up: first-call costs and the TIES / DARE memo's build
    first = time.perf_counter() - start
    start = time.perf_counter()
    for c in cfgs:
        cm.load(c)
    mem = time.perf_counter() - start
    start = time.perf_counter()
    for i, c in enumerate(cfgs):
        through_disk(c, tmp / f"m-{i}", spec.device)
    return mem, time.perf_counter() - start, first


def on_disk(cfgs, spec, tmp: Path) -> tuple[float, list[float]]:
    from transformers import AutoTokenizer

    from safemerge.search.objective import Objective, load_pairs

    tok = AutoTokenizer.from_pretrained(cfgs[0]["base_model"])
    objective = Objective(tok, safety=load_pairs(spec.safety_data), domain=load_pairs(spec.domain_data), lambda_=spec.lambda_,
                          batch_size=spec.batch_size)

    def score(i: int, c: dict) -> float:
        return objective(through_disk(c, tmp / f"cand-{i}", spec.device)).objective

    score(-1, cfgs[0])  # warm-up, as the in-memory way gets one
    start = time.perf_counter()
    scores = [score(i, c) for i, c in enumerate(cfgs)]
    return time.perf_counter() - start, scores


def parallel(cfgs, spec, workers: int, ray_address: str | None) -> float:
    from safemerge.search.parallel import make_scorer

    scorer = make_scorer(replace(spec, threads=1), workers=workers, ray_address=ray_address)
    list(scorer.score(cfgs[:workers]))  # warm-up: every worker has built its scorer
    start = time.perf_counter()
    list(scorer.score(cfgs))
    seconds = time.perf_counter() - start
    scorer.close()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("testbed", type=Path)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--method", default="ties")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--ray", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the serial runs (default: torch's)")
    ap.add_argument("--batch-size", type=int, default=16, help="examples per forward pass when scoring, both ways")
    ap.add_argument("--trim-memo-gib", type=float, default=None,
                    help="the in-memory way's TIES / DARE memo budget in GiB (default: the library's, 1 on the CPU and "
                         "an eighth of the free memory on a GPU; 0: no memo)")
    ap.add_argument("--device", default="cpu", help="where candidates are built and scored, both ways (cpu or cuda)")
    ap.add_argument("--random-family", default=None, metavar="H,L,I",
                    help="score a random Llama family of hidden size H, L layers, MLP size I instead of the testbed's models")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from safemerge.checkpoint import Checkpoint
    from safemerge.search.scoring import ScorerSpec

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        models = random_family(args.testbed, args.random_family, tmp / "family") if args.random_family else args.testbed
        cfgs = configs(models, args.n, args.method)
        safety, domain = data_files(args.testbed, args.examples, tmp)
        spec = ScorerSpec(config=cfgs[0], safety_data=str(safety), domain_data=str(domain), lambda_=0.5,
                          device=args.device, batch_size=args.batch_size)
        if args.trim_memo_gib is not None:
            spec = replace(spec, trim_memo_bytes=int(args.trim_memo_gib * 2**30))
        mem_s, mem_scores, memo_bytes = in_memory(cfgs, spec)
        disk_s, disk_scores = on_disk(cfgs, spec, tmp)
        mat_mem, mat_disk, first_load = materialise_only(cfgs, spec, tmp)
        result = {
            "testbed": str(args.testbed), "random_family": args.random_family, "parameters": Checkpoint(models / "base").num_params(),
            "method": args.method, "candidates": args.n, "examples_per_set": args.examples, "batch_size": args.batch_size,
            "trim_memo_bytes": memo_bytes,
            "torch_threads": torch.get_num_threads(), "device": args.device,
            "in_memory_per_min": round(60 * args.n / mem_s, 1), "on_disk_per_min": round(60 * args.n / disk_s, 1),
            "in_memory_over_on_disk": round(disk_s / mem_s, 2),
            "max_objective_difference": max(abs(a - b) for a, b in zip(mem_scores, disk_scores)),
            "weights_only_in_memory_per_min": round(60 * args.n / mat_mem, 1),
            "weights_only_on_disk_per_min": round(60 * args.n / mat_disk, 1),
            "weights_only_ratio": round(mat_disk / mat_mem, 2),
            "first_in_memory_load_seconds": round(first_load, 3),  # once per search, not in the rates above
        }
        if args.workers > 1:
            torch.set_num_threads(1)
            serial_1t, _, _ = in_memory(cfgs, spec)
            result["serial_1_thread_per_min"] = round(60 * args.n / serial_1t, 1)
            w = parallel(cfgs, spec, args.workers, None)
            result[f"processes_{args.workers}_per_min"] = round(60 * args.n / w, 1)
            result[f"processes_{args.workers}_over_serial_1_thread"] = round(serial_1t / w, 2)
            if args.ray:
                r = parallel(cfgs, spec, args.workers, "local")
                result[f"ray_{args.workers}_per_min"] = round(60 * args.n / r, 1)
                result[f"ray_{args.workers}_over_serial_1_thread"] = round(serial_1t / r, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
