"""LoRA extraction speed, peak memory and fidelity: `safemerge extract-lora` against `mergekit-extract-lora`.

    benchmarks/setup_mergekit.sh                     # once: .bench-venv with mergekit 0.1.5
    .venv/bin/python benchmarks/extract_lora.py [--rank 32] [--svd exact,randomized] [--device cpu]

The fine-tune is the benchmark family's `expert` (0.84B parameters, bf16; base + noise on every tensor, so
every layer changes and its change has a flat spectrum: the slowest and least compressible case), the base its
`base`, as benchmarks/merge_speed.py builds them (once, under --cache). Each tool runs as its own subprocess
(wall time, peak RSS of the child). Fidelity: for every layer both tools factor, the relative error of the
stored update against the true change, ‖Δ − B·A‖_F / ‖Δ‖_F (Δ in float32), summed over layers, and the largest
difference between the two tools' products B·A relative to the change.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _measure import GIB, machine, measure, warm  # noqa: E402
from merge_speed import ensure_family  # noqa: E402


def _factors(adapter: Path) -> dict[str, tuple[str, str]]:
    """module -> (A key, B key) of its low-rank update."""
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): (k, k.replace("lora_A", "lora_B"))
                for k in f.keys() if k.endswith(".lora_A.weight")}


def _product(adapter: Path, keys: tuple[str, str]) -> torch.Tensor:
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return f.get_tensor(keys[1]).float() @ f.get_tensor(keys[0]).float()


def fidelity(root: Path, adapters: dict[str, Path]) -> dict[str, dict]:
    """Per tool, the relative error over the layers every tool factored, and the largest gap to mergekit's B·A;
    one layer in memory at a time."""
    from safemerge.checkpoint import Checkpoint

    fine, base = Checkpoint(root / "expert"), Checkpoint(root / "base")
    keys = {tool: _factors(a) for tool, a in adapters.items()}
    common = sorted(set.intersection(*(set(k) for k in keys.values())))
    err2 = dict.fromkeys(adapters, 0.0)
    gap = dict.fromkeys(adapters, 0.0)
    norm2 = 0.0
    for m in common:
        delta = fine.get(m + ".weight").float() - base.get(m + ".weight").float()
        norm2 += float(delta.pow(2).sum())
        prods = {tool: _product(adapters[tool], keys[tool][m]) for tool in adapters}
        for tool, p in prods.items():
            err2[tool] += float((delta - p).pow(2).sum())
            if MERGEKIT in prods:
                gap[tool] = max(gap[tool], float((p - prods[MERGEKIT]).abs().max() / delta.abs().max()))
    return {tool: {"layers": len(common), "relative_error": round(math.sqrt(err2[tool] / norm2), 6),
                   **({"max_gap_to_mergekit": gap[tool]} if MERGEKIT in adapters and tool != MERGEKIT else {})}
            for tool in adapters}


MERGEKIT = "mergekit 0.1.5"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--svd", default="exact,randomized", help="safemerge's SVD ways to run (comma-separated)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mergekit", default=str(REPO / ".bench-venv" / "bin" / "mergekit-extract-lora"))
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    root = ensure_family(args.cache, 1, log=print)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    safemerge_cli = str(Path(sys.executable).with_name("safemerge"))
    print(json.dumps(machine()))
    results = {}
    with tempfile.TemporaryDirectory(dir=args.cache) as work:
        work = Path(work)
        runs = {f"safemerge ({way})": [safemerge_cli, "extract-lora", str(root / "expert"), "OUT", "--base",
                                       str(root / "base"), "--rank", str(args.rank), "--svd", way, "--no-progress",
                                       "--device", args.device] for way in args.svd.split(",")}
        runs[MERGEKIT] = [args.mergekit, "--model", str(root / "expert"), "--base-model", str(root / "base"),
                                  "--out-path", "OUT", "--max-rank", str(args.rank), "--quiet",
                                  *(["--cuda"] if args.device != "cpu" else [])]
        adapters = {}
        for tool, cmd in runs.items():
            out = work / tool.replace(" ", "_").replace("(", "").replace(")", "")
            warm([root / "expert", root / "base"])
            run = measure([str(out) if c == "OUT" else c for c in cmd], tool=tool, method="extract", env=env)
            if run.rc != 0:
                print(f"{tool}: FAILED rc={run.rc}\n{run.error[-2000:]}")
                continue
            size = sum(f.stat().st_size for f in out.iterdir()) / GIB
            adapters[tool] = out
            results[tool] = {"wall_s": round(run.wall_s, 1), "cpu_s": round(run.cpu_s, 1),
                             "peak_rss_gib": round(run.peak_rss_gib, 2), "adapter_gib": round(size, 3)}
            print(f"{tool:24s} {run.wall_s:7.1f} s  cpu {run.cpu_s:7.1f} s  peak RSS {run.peak_rss_gib:5.2f} GiB  "
                  f"adapter {size:.3f} GiB  load {run.load_1m:.1f}", flush=True)
        for tool, fid in fidelity(root, adapters).items():
            results[tool].update(fid)
            print(f"{tool:24s} relative error over {fid['layers']} layers: {fid['relative_error']:.6f}"
                  + (f"; largest |B·A − mergekit's B·A| / max|Δ|: {fid['max_gap_to_mergekit']:.2e}"
                     if "max_gap_to_mergekit" in fid else ""))
    if args.json:
        args.json.write_text(json.dumps({"rank": args.rank, "device": args.device, "results": results}, indent=1))


if __name__ == "__main__":
    main()
