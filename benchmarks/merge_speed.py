"""Merge speed and peak memory: safemerge vs mergekit 0.1.5 vs an I/O floor, in one run.

    benchmarks/setup_mergekit.sh                      # once: .bench-venv with mergekit 0.1.5
    .venv/bin/python benchmarks/merge_speed.py        # ~0.85B bf16 Llama family, all three tools
    .venv/bin/python benchmarks/merge_speed.py --scale 4   # safemerge at 1x and 4x (73 layers): RSS growth
    ... --json                                        # machine-readable figures on stdout

The family (base, expert, instruct; hidden 2048, 16 layers, vocab 32000, intermediate 5632, 32 query /
4 key-value heads, bf16, random weights, relatives = base + 0.1·std deltas, 1 GiB shards) is written
once to ``--cache`` (default ``.cache/bench`` in the repo, git-ignored) and reused.

Each tool runs as its own subprocess, so wall time and memory are its own: peak RSS is the child's
``VmHWM`` (its high-water RSS, counting file pages mapped from the inputs as well as anonymous memory),
polled from ``/proc/<pid>/status`` every 50 ms with the anonymous / file-backed split. The page cache
cannot be dropped without root, so every input file is read once before each timed run (warm cache
for every tool alike); each output is flushed (``sync``, untimed) and deleted before the next run.

Tools: ``safemerge merge CONFIG OUT --no-progress`` (the CLI of this checkout's environment); ``mergekit-yaml
CONFIG OUT --quiet --no-copy-tokenizer`` with mergekit's default CPU settings otherwise (no --cuda,
no --lazy-unpickle: it only affects pickle inputs; default -j, shard size and synchronous writes);
``io_floor``: read every input tensor's bytes once (plain ``readinto``) and write one output of the
same size (the base's shards), no arithmetic: the least any merge has to do, single-threaded.
``--device cuda`` gives safemerge ``--device cuda`` and mergekit ``--cuda`` (both read and write on the
CPU side, and compute on the GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _family  # noqa: E402
from _measure import GIB, Run, io_floor_cmd, machine, measure, output_bytes, warm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARD_BYTES = GIB
DELTA_SCALE = 0.1
ROLES = ("base", "expert", "instruct")
SLERP_T = [0, 0.5, 1, 0.5, 0]

# expert and instruct, weight 1 and density 0.5 each (configs are copied before they are changed or written)
HALF_DENSE = [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in ("expert", "instruct")]
HALF_WEIGHTS = [{"model": m, "parameters": {"weight": 0.5}} for m in ("expert", "instruct")]
TWO = [{"model": "expert"}, {"model": "instruct"}]


def _on_base(method: str, models: list, **params) -> dict:
    """A bf16 config of `method` over `models` with `base` as base_model."""
    return {"merge_method": method, "base_model": "base", "models": models,
            **({"parameters": params} if params else {}), "dtype": "bfloat16"}


BASE_EXPERT = [{"model": "base"}, {"model": "expert"}]
CONFIGS = {  # issue 2's three measured merges, mergekit YAML
    "task_arithmetic": _on_base("task_arithmetic", [{"model": "expert", "parameters": {"weight": 1.0}},  # MergeAlign
                                                    {"model": "instruct", "parameters": {"weight": 1.0}}]),
    "ties": _on_base("ties", HALF_DENSE),
    "slerp": _on_base("slerp", BASE_EXPERT, t=SLERP_T),
    # beyond issue 2's three: mergekit's other common methods (not run unless named in --methods)
    "della": _on_base("della", HALF_DENSE, epsilon=0.15),
    "nuslerp": _on_base("nuslerp", HALF_WEIGHTS),
    "sce": _on_base("sce", TWO, select_topk=0.5),
    "multislerp": _on_base("multislerp", HALF_WEIGHTS),
    "karcher": {"merge_method": "karcher", "models": TWO, "dtype": "bfloat16"},
    "nearswap": _on_base("nearswap", BASE_EXPERT, t=0.001),
    "arcee_fusion": _on_base("arcee_fusion", BASE_EXPERT),
    "ram": _on_base("ram", TWO),
    "ramplus_tl": _on_base("ramplus_tl", TWO),
    # MergeAlign with the expert as a LoRA adapter on the base (a `model+adapter` reference; the adapter is made
    # once with peft: r 16, α 32, every projection of every layer)
    "lora": _on_base("task_arithmetic", [{"model": "base+expert-lora", "parameters": {"weight": 1.0}},
                                                     {"model": "instruct", "parameters": {"weight": 1.0}}]),
    # a frankenmerge: layers 0-11 of the expert on layers 4-15 of the instruct model (24 layers out of 16)
    "passthrough": {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "expert", "layer_range": [0, 12]}]},
                   {"sources": [{"model": "instruct", "layer_range": [4, 16]}]}],
        "dtype": "bfloat16",
    },
}
ISSUE_METHODS = ("task_arithmetic", "ties", "slerp")
# Issue 2's targets: safemerge time / mergekit time, safemerge time / I/O floor, peak RSS.
TARGETS = {
    "task_arithmetic": {"vs_mergekit": 0.25, "vs_io_floor": 1.3},
    "ties": {"vs_mergekit": 0.10},
    "slerp": {"vs_mergekit": 0.33},
}
RSS_TARGET_GIB = 1.5
RSS_GROWTH_TARGET = 0.20


# ---------------------------------------------------------------- the family on disk

def family_dir(cache: Path, scale: int) -> Path:
    spec = scaled_spec(scale)
    return cache / f"llama-h{spec.hidden_size}-l{spec.num_hidden_layers}-bf16"


def scaled_spec(scale: int) -> _family.LlamaSpec:
    """``scale``× the parameters of the layer stack: more layers, same tensor shapes."""
    base = _family.BENCH_SPEC
    if scale == 1:
        return base
    per_layer = (_family.num_params(replace(base, num_hidden_layers=1))
                 - _family.num_params(replace(base, num_hidden_layers=0)))
    target = scale * _family.num_params(base) - _family.num_params(replace(base, num_hidden_layers=0))
    return replace(base, num_hidden_layers=round(target / per_layer))


def ensure_family(cache: Path, scale: int, *, log) -> Path:
    root = family_dir(cache, scale)
    spec = scaled_spec(scale)
    recipe = {"spec": _family.spec_dict(spec), "roles": ROLES, "seed": 0, "dtype": "bfloat16",
              "delta_scale": DELTA_SCALE, "shard_bytes": SHARD_BYTES}
    stamp = root / "recipe.json"
    if stamp.exists() and json.loads(stamp.read_text()) == json.loads(json.dumps(recipe)):
        return root
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    free = shutil.disk_usage(root).free
    need = 5 * _family.num_params(spec) * 2  # 3 inputs + an output from two tools, bf16
    if free < need:
        raise SystemExit(f"{root}: {free / GIB:.1f} GiB free, need ~{need / GIB:.1f} GiB; pass --cache elsewhere")
    log(f"writing the {_family.num_params(spec) / 1e9:.2f}B-parameter family to {root} (once) ...")
    t0 = time.perf_counter()
    _family.write_family(root, spec=spec, roles=ROLES, seed=0, dtype="bfloat16",
                         delta_scale=DELTA_SCALE, shard_bytes=SHARD_BYTES)
    stamp.write_text(json.dumps(recipe, indent=1) + "\n")
    log(f"  done in {time.perf_counter() - t0:.0f} s")
    return root


def write_configs(root: Path, out_dir: Path) -> dict[str, Path]:
    """Each config with absolute model paths (mergekit looks relative names up on the Hub)."""
    import yaml

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, cfg in CONFIGS.items():
        cfg = json.loads(json.dumps(cfg))
        if "base_model" in cfg:
            cfg["base_model"] = str(root / cfg["base_model"])
        for m in _sources(cfg):
            m["model"] = "+".join(str(root / part) for part in m["model"].split("+"))
        paths[name] = out_dir / f"{name}.yml"
        paths[name].write_text(yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None))
    return paths


def _sources(cfg: dict) -> list[dict]:
    """The config's model entries: `models`, or every slice's sources."""
    return cfg.get("models") or [src for piece in cfg["slices"] for src in piece["sources"]]


def input_models(method: str) -> list[str]:
    """The folders the method's config reads (both parts of a `model+adapter` reference)."""
    cfg = CONFIGS[method]
    refs = [*([cfg["base_model"]] if "base_model" in cfg else []), *(m["model"] for m in _sources(cfg))]
    return sorted({part for ref in refs for part in ref.split("+")})


def ensure_adapter(root: Path, *, log) -> Path:
    """root/expert-lora: a LoRA adapter of the base (peft; r 16, α 32, every projection), made once."""
    out = root / "expert-lora"
    if (out / "adapter_model.safetensors").is_file():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    log(f"writing a LoRA adapter to {out} (once) ...")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero
                p.normal_(std=0.01)
    peft_model.save_pretrained(out)
    return out


# ---------------------------------------------------------------- the three tools

def safemerge_cmd(config: Path, out: Path, device: str = "cpu") -> list[str]:
    exe = Path(sys.executable).with_name("safemerge")
    head = [str(exe)] if exe.exists() else [sys.executable, "-c", "from safemerge.cli import main; main()"]
    return [*head, "merge", str(config), str(out), "--no-progress", *(["--device", device] if device != "cpu" else [])]


def mergekit_flags(device: str = "cpu") -> list[str]:
    return ["--quiet", "--no-copy-tokenizer", *(["--cuda"] if device != "cpu" else [])]


def mergekit_cmd(mergekit: str, config: Path, out: Path, device: str = "cpu") -> list[str]:
    return [mergekit, str(config), str(out), *mergekit_flags(device)]


def run_tool(tool: str, method: str, *, root: Path, config: Path, work: Path, mergekit: str, log,
             keep: bool = False, device: str = "cpu") -> Run:
    """Warm the inputs, run one tool on one method, flush and (unless ``keep``) delete its output."""
    models = [root / m for m in input_models(method)]
    out = work / f"{tool}-{method}"
    if out.exists():
        shutil.rmtree(out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if tool == "safemerge":
        cmd = safemerge_cmd(config, out, device)
    elif tool == "mergekit":
        cmd = mergekit_cmd(mergekit, config, out, device)
        if any("+" in m.get("model", "") for m in _sources(CONFIGS[method])):  # it merges the adapter into a copy
            cache = work / "mergekit-lora-cache"  # first: emptied, so every run pays for that copy
            shutil.rmtree(cache, ignore_errors=True)
            cmd += ["--lora-merge-cache", str(cache)]
    else:  # the model folders (an adapter's weights are read by the merges, but are not a model to copy)
        cmd = io_floor_cmd([m for m in models if (m / "config.json").is_file()], out)
    warm(models)
    run = measure(cmd, tool=tool, method=method, env=env)
    run.output_gib = output_bytes(out) / GIB
    os.sync()
    if out.exists() and not keep:
        shutil.rmtree(out)
        os.sync()
    flag = "" if run.rc == 0 else f"  FAILED rc={run.rc}: {run.error.strip().splitlines()[-1] if run.error.strip() else ''}"
    log(f"  {method:16s} {tool:10s} {run.wall_s:7.1f} s  peak RSS {run.peak_rss_gib:5.2f} GiB "
        f"(anon {run.peak_anon_gib:.2f}, file {run.peak_file_gib:.2f})  cpu {run.cpu_s:6.1f} s  "
        f"load {run.load_1m:.1f}{flag}")
    return run


# ---------------------------------------------------------------- report

def compare_outputs(a: Path, b: Path) -> dict:
    """max |a − b| over every tensor, and the share of elements more than one bf16 ulp apart.

    One tensor at a time, so this process stays small (its RSS would otherwise leak into the
    children's ``ru_maxrss``; see _measure.measure)."""
    import torch
    from safetensors import safe_open

    def where(d: Path) -> dict[str, Path]:
        out = {}
        for f in _family.safetensors_files(d):
            with safe_open(str(f), framework="pt") as h:
                out.update(dict.fromkeys(h.keys(), f))
        return out

    fa, fb = where(a), where(b)
    worst, beyond, total = 0.0, 0, 0
    for name in sorted(set(fa) & set(fb)):
        with safe_open(str(fa[name]), framework="pt") as ha, safe_open(str(fb[name]), framework="pt") as hb:
            x, y = ha.get_tensor(name).float(), hb.get_tensor(name).float()
        d = (x - y).abs_()
        ulp = torch.exp2(torch.floor(torch.log2(y.abs_().clamp_min_(1e-30))) - 7)  # bf16 spacing at |y|
        worst = max(worst, float(d.max()))
        beyond += int((d > ulp).sum())
        total += d.numel()
        del x, y, d, ulp
    return {"max_abs_diff": worst, "share_beyond_1ulp": beyond / max(total, 1),
            "names_differ": sorted(set(fa) ^ set(fb))}


def versions(mergekit: str) -> dict:
    import torch

    v = {"torch": torch.__version__}
    try:
        import safemerge

        v["safemerge"] = safemerge.__version__
    except ImportError:
        v["safemerge"] = None
    py = Path(mergekit).parent / "python"
    if py.exists():
        v["mergekit"] = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                                       capture_output=True, text=True).stdout.strip() or None
    return v


def ratios(runs: list[Run]) -> dict:
    """safemerge vs the others per method; with --repeat, the fastest run of each (tool, method)
    and the largest peak RSS."""
    by: dict[tuple[str, str], Run] = {}
    for r in runs:
        if r.rc != 0:
            continue
        key = (r.tool, r.method)
        if key in by:
            by[key] = replace(by[key], wall_s=min(by[key].wall_s, r.wall_s),
                              peak_rss_gib=max(by[key].peak_rss_gib, r.peak_rss_gib))
        else:
            by[key] = r
    out = {}
    for method in dict.fromkeys(r.method for r in runs):  # every measured method; issue 2's have targets
        targets = TARGETS.get(method, {})
        sm = by.get(("safemerge", method))
        if sm is None:
            continue
        entry = {}
        for key, tool in (("vs_mergekit", "mergekit"), ("vs_io_floor", "io_floor")):
            other = by.get((tool, method))
            if other is not None:
                value = sm.wall_s / other.wall_s
                target = targets.get(key)
                entry[key] = {"ratio": round(value, 3), "target": target,
                              "met": None if target is None else value <= target}
        entry["peak_rss"] = {"gib": round(sm.peak_rss_gib, 3), "target": RSS_TARGET_GIB,
                             "met": sm.peak_rss_gib <= RSS_TARGET_GIB}
        out[method] = entry
    return out


def rss_growth(runs: list[dict], methods: list[str], scale: int) -> dict | None:
    """safemerge's peak RSS at ``scale``× against 1×, per method; ``growth`` is the worst method's."""
    sm = {(r["scale"], r["method"]): r for r in runs if r["tool"] == "safemerge" and r["rc"] == 0}
    pairs = [(sm[(1, m)], sm[(scale, m)]) for m in methods if (1, m) in sm and (scale, m) in sm]
    if not pairs:
        return None
    per = {a["method"]: round(b["peak_rss_gib"] / a["peak_rss_gib"] - 1, 4) for a, b in pairs}
    return {"scale": scale, "rss_1x_gib": round(max(a["peak_rss_gib"] for a, _ in pairs), 3),
            "rss_scaled_gib": round(max(b["peak_rss_gib"] for _, b in pairs), 3),
            "growth": max(per.values()), "met": max(per.values()) < RSS_GROWTH_TARGET, "per_method": per}


def print_summary(result: dict, log) -> None:
    log("")
    log(f"{'scale':>5s} {'method':16s} {'tool':10s} {'wall s':>8s} {'peak RSS GiB':>13s} {'anon':>6s} {'file':>6s} "
        f"{'cpu s':>7s}")
    for r in result["runs"]:
        status = "" if r["rc"] == 0 else "  FAILED"
        log(f"{r['scale']:>4d}x {r['method']:16s} {r['tool']:10s} {r['wall_s']:8.1f} {r['peak_rss_gib']:13.2f} "
            f"{r['peak_anon_gib']:6.2f} {r['peak_file_gib']:6.2f} {r['cpu_s']:7.1f}{status}")
    for method, entry in result.get("ratios", {}).items():
        parts = []
        for key, v in entry.items():
            if key == "peak_rss":
                parts.append(f"peak RSS {v['gib']:.2f} GiB (≤ {v['target']}: {'met' if v['met'] else 'MISSED'})")
            else:
                tgt = "" if v["target"] is None else f" (≤ {v['target']}: {'met' if v['met'] else 'MISSED'})"
                parts.append(f"{key} {v['ratio']:.3f}×{tgt}")
        log(f"{method:16s} " + "; ".join(parts))
    if result.get("rss_growth"):
        g = result["rss_growth"]
        log(f"peak RSS at scale {g['scale']} vs 1x: " + ", ".join(f"{m} {100 * v:+.1f}%" for m, v in g["per_method"].items())
            + f" (largest {g['rss_scaled_gib']:.2f} vs {g['rss_1x_gib']:.2f} GiB; every method < "
            f"{100 * RSS_GROWTH_TARGET:.0f}%: {'met' if g['met'] else 'MISSED'})")


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # `kill` stops the child being measured too (see _measure.measure)


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench")
    ap.add_argument("--mergekit", default=str(REPO / ".bench-venv" / "bin" / "mergekit-yaml"))
    ap.add_argument("--methods", default=",".join(ISSUE_METHODS), help="comma list of " + ",".join(CONFIGS)
                    + f" (default: issue 2's {', '.join(ISSUE_METHODS)})")
    ap.add_argument("--tools", default=None, help="comma list of io_floor,safemerge,mergekit "
                    "(default: all three; with --scale > 1: safemerge)")
    ap.add_argument("--scale", type=int, default=1, help="also measure safemerge on a SCALE× larger model "
                    "and report the peak RSS growth (the larger family is deleted afterwards unless --keep)")
    ap.add_argument("--repeat", type=int, default=1, help="run each (method, tool) N times, interleaved; "
                    "ratios use the fastest run")
    ap.add_argument("--keep", action="store_true", help="keep the --scale family on disk")
    ap.add_argument("--compare", action="store_true", help="after timing, compare safemerge's and mergekit's "
                    "outputs tensor by tensor (max |Δ|, share of elements > 1 bf16 ulp apart)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where safemerge and mergekit compute: cuda passes --device cuda / --cuda (the I/O floor "
                    "is the same either way)")
    args = ap.parse_args(argv)

    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else (lambda msg: print(msg, flush=True))
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {sorted(CONFIGS)}")
    tools = (args.tools or ("safemerge" if args.scale > 1 else "io_floor,safemerge,mergekit")).split(",")
    if "mergekit" in tools and not Path(args.mergekit).exists():
        raise SystemExit(f"{args.mergekit} not found: run benchmarks/setup_mergekit.sh first, or pass --tools")

    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), "versions": versions(args.mergekit),
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "mergekit_flags": mergekit_flags(args.device), "device": args.device,
              "scale": args.scale, "runs": []}
    if args.device == "cuda":
        import torch

        result["machine"]["gpu"] = torch.cuda.get_device_name(0)
    log(f"load average {result['machine']['loadavg']}, {result['machine']['cpus']} cpus, "
        f"{result['machine']['mem_gib']} GiB")
    scales = [1] if args.scale == 1 else [1, args.scale]
    for scale in scales:
        root = ensure_family(args.cache, scale, log=log)
        if any("+" in m["model"] for method in methods for m in _sources(CONFIGS[method])):
            ensure_adapter(root, log=log)
        configs = write_configs(root, root / "configs")
        log(f"scale {scale}: {_family.num_params(scaled_spec(scale)) / 1e9:.2f}B parameters per model ({root})")
        compare = args.compare and {"safemerge", "mergekit"} <= set(tools)
        for method in methods:
            for tool in [t for _ in range(args.repeat) for t in tools]:
                run = run_tool(tool, method, root=root, config=configs[method], work=args.cache / "work",
                               mergekit=args.mergekit, log=log, keep=compare and tool != "io_floor",
                               device=args.device)
                d = asdict(run)
                d["scale"] = scale
                result["runs"].append(d)
            if compare:
                outs = [args.cache / "work" / f"{t}-{method}" for t in ("safemerge", "mergekit")]
                if all(o.exists() for o in outs):
                    c = compare_outputs(*outs)
                    result.setdefault("agreement", {})[method] = c
                    log(f"  {method:16s} safemerge vs mergekit: max |Δ| {c['max_abs_diff']:.3g}, "
                        f"{100 * c['share_beyond_1ulp']:.4f}% of elements > 1 bf16 ulp apart"
                        + (f", names differ: {c['names_differ'][:5]}" if c["names_differ"] else ""))
                for o in outs:
                    shutil.rmtree(o, ignore_errors=True)
                os.sync()
        if scale != 1 and not args.keep:
            shutil.rmtree(root)
            log(f"removed {root}")
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["ratios"] = ratios([Run(**{k: v for k, v in r.items() if k != "scale"})
                               for r in result["runs"] if r["scale"] == 1])
    if args.scale > 1:
        result["rss_growth"] = rss_growth(result["runs"], methods, args.scale)
    print_summary(result, log)
    if args.json:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
