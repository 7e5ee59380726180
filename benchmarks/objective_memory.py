"""Memory and time of the search objective on a large vocabulary, beside transformers' own loss.

    python benchmarks/objective_memory.py [--vocab 128256] [--batch-size 16] [--prompt 480] [--answer 32] [--device cuda]

A randomly initialised Llama (hidden 256, 2 layers) with Llama-3's vocabulary size scores one batch of
long prompts with short answers, the shape of search data (a refusal or a domain answer after a long
question). Two ways, each in its own process so that peak memory is its own:

  safemerge   `answer_ce`: logits only from the earliest answer position on (`logits_to_keep`)
  transformers  `model(input_ids, attention_mask, labels=labels).loss`: logits of every position

Both give the mean cross-entropy over the answer tokens; the script prints both values (they must agree
to float32 rounding), the seconds per batch and the peak memory (the process's peak RSS on the CPU, the
allocator's peak on CUDA) above the peak after building the model, as one JSON object. On the CPU that peak is a
running maximum: where building the model peaked above its resident size, the figure understates scoring's memory
by that excess, alike for both ways.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def one(way: str, args: argparse.Namespace) -> dict:
    import resource
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from safemerge.search.objective import IGNORE, Batches, answer_ce

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).to(args.device).eval()
    b, t = args.batch_size, args.prompt + args.answer
    ids = torch.randint(0, args.vocab, (b, t))
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, IGNORE)
    labels[:, args.prompt:] = ids[:, args.prompt:]
    batches = Batches([(ids, mask, labels)], n_tokens=b * args.answer, n_examples=b)
    cuda = args.device.startswith("cuda")

    def run() -> float:
        if way == "safemerge":
            return answer_ce(model, batches)
        with torch.inference_mode():
            out = model(input_ids=ids.to(args.device), attention_mask=mask.to(args.device), labels=labels.to(args.device))
        return float(out.loss)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    value = run()
    for _ in range(args.repeat - 1):
        run()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"loss": value, "seconds_per_batch": round((time.perf_counter() - start) / args.repeat, 4),
            "peak_above_model_mib": round((peak - before) / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=128256, help="vocabulary size (Llama-3's by default)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=480, help="prompt tokens per example")
    ap.add_argument("--answer", type=int, default=32, help="answer tokens per example")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--way", choices=("safemerge", "transformers"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.way:
        print(json.dumps(one(args.way, args)))
        return
    result = {"vocab": args.vocab, "batch": args.batch_size, "prompt_tokens": args.prompt, "answer_tokens": args.answer,
              "device": args.device}
    for way in ("safemerge", "transformers"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--way", way], check=True,
                             capture_output=True, text=True).stdout
        result[way] = json.loads(out.strip().splitlines()[-1])
    result["memory_ratio"] = round(result["transformers"]["peak_above_model_mib"]
                                   / max(result["safemerge"]["peak_above_model_mib"], 0.1), 1)
    result["loss_difference"] = abs(result["safemerge"]["loss"] - result["transformers"]["loss"])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
