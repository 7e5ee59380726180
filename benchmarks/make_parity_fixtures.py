"""Regenerate the mergekit parity fixtures under tests/fixtures/mergekit/.

    benchmarks/setup_mergekit.sh                   # once: .bench-venv with mergekit 0.1.5
    .venv/bin/python benchmarks/make_parity_fixtures.py [--mergekit .bench-venv/bin/mergekit-yaml] [--only CASE ...]

What is committed (well under 2 MB): one YAML per case (model paths are role names, resolved against
the directory holding the regenerated inputs), mergekit's merged tensors as ``<case>.safetensors``
(exact cases) or its output statistics (random DARE cases) and ``manifest.json`` with the recipe
of the inputs and their fingerprints. The inputs themselves are not committed:
``tests/test_mergekit_parity.py`` rebuilds them with ``benchmarks/_family.py`` from the recipe and
checks the fingerprints first, so a change in torch's RNG shows up as such, not as a merge bug.

A case whose config is a list of documents is a multi-stage merge, run with mergekit-multi (beside mergekit-yaml)
and, in the test, with `safemerge.multimerge`; its names stand for earlier stages' outputs. `--only` remakes the
cases named and keeps the others' fixtures as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _family  # noqa: E402

from safemerge.config import map_model_refs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "mergekit"

# The tiny family: GQA (4 query heads, 2 key/value heads), untied lm_head.
SPEC = _family.LlamaSpec(hidden_size=32, num_hidden_layers=4, vocab_size=64, intermediate_size=48,
                         num_attention_heads=4, num_key_value_heads=2)
ROLES = ("base", "expert_a", "expert_b", "aligned")
# Large enough relative deltas that SLERP takes its spherical branch on matrices (|cos| ~ 0.97),
# while the norm gains (~1 ± 0.1) stay collinear and exercise its linear fallback.
FAMILIES = {
    "fp32": {"seed": 0, "dtype": "float32", "delta_scale": 0.25},
    "bf16": {"seed": 1, "dtype": "bfloat16", "delta_scale": 0.25},
}
GRADIENT = [0, 0.5, 1, 0.5, 0]


def _models(**weights: dict) -> list[dict]:
    return [{"model": role, "parameters": params} if params else {"model": role}
            for role, params in weights.items()]


# name -> (family, kind, config). kind "exact": tensors compared; "stats": random (DARE) methods.
CASES: dict[str, tuple[str, str, dict | list[dict]]] = {
    "linear": ("fp32", "exact", {
        "merge_method": "linear",
        "models": _models(base={"weight": 0.6}, expert_a={"weight": 0.3}, aligned={"weight": 0.3}),
        "dtype": "float32",
    }),
    "task_arithmetic_mergealign": ("fp32", "exact", {
        "merge_method": "task_arithmetic", "base_model": "base",
        "models": _models(expert_a={"weight": 1.0}, aligned={"weight": 1.0}),
        "dtype": "float32",
    }),
    "task_arithmetic_lambda": ("fp32", "exact", {
        "merge_method": "task_arithmetic", "base_model": "base",
        "models": _models(expert_a={"weight": 0.7}, expert_b={"weight": 0.4}, aligned={"weight": 1.0}),
        "parameters": {"lambda": 0.8}, "dtype": "float32",
    }),
    "ties": ("fp32", "exact", {
        "merge_method": "ties", "base_model": "base",
        "models": _models(expert_a={"weight": 1.0, "density": 0.5}, expert_b={"weight": 0.5, "density": 0.5},
                          aligned={"weight": 1.0, "density": 0.5}),
        "dtype": "float32",
    }),
    "slerp_scalar": ("fp32", "exact", {
        "merge_method": "slerp", "base_model": "base",
        "models": _models(base={}, expert_a={}),
        "parameters": {"t": 0.3}, "dtype": "float32",
    }),
    "slerp_gradient_filters": ("fp32", "exact", {
        "merge_method": "slerp", "base_model": "base",
        "models": _models(base={}, expert_a={}),
        "parameters": {"t": [{"filter": "self_attn", "value": GRADIENT},
                             {"filter": "mlp", "value": [1, 0.5, 0, 0.5, 1]},
                             {"value": 0.4}]},
        "dtype": "float32",
    }),
    # a gradient whose ends differ (the final norm and lm_head take its first value, as embeddings do) and a
    # "*" filter (matches every tensor)
    "task_arithmetic_gradient_star": ("fp32", "exact", {
        "merge_method": "task_arithmetic", "base_model": "base",
        "models": _models(expert_a={"weight": [0.2, 1.0, 0.6, 0.9]},
                          aligned={"weight": [{"filter": "mlp", "value": 0.3}, {"filter": "*", "value": 0.8},
                                              {"value": 0.1}]}),
        "dtype": "float32",
    }),
    # mergekit's `slices` form of a whole-model merge, as most community SLERP configs are written
    "slerp_slices": ("fp32", "exact", {
        "slices": [{"sources": [{"model": "base", "layer_range": [0, 4]}, {"model": "expert_a", "layer_range": [0, 4]}]}],
        "merge_method": "slerp", "base_model": "base",
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                             {"value": 0.5}]},
        "dtype": "float32",
    }),
    # slice-level parameters between the sources' and the top level's: density 0.4 on mlp tensors from the
    # slice, elsewhere the top level's 0.6 (a filter that matches nothing falls through to the next level)
    "ties_slices_params": ("fp32", "exact", {
        "slices": [{"sources": [{"model": "base", "layer_range": [0, 4]},
                                {"model": "expert_a", "layer_range": [0, 4], "parameters": {"weight": 1.0}},
                                {"model": "aligned", "layer_range": [0, 4], "parameters": {"weight": 0.5, "density": 0.7}}],
                    "parameters": {"density": [{"filter": "mlp", "value": 0.4}]}}],
        "merge_method": "ties", "base_model": "base",
        "parameters": {"density": 0.6},
        "dtype": "float32",
    }),
    # layer surgery: a frankenmerge stacking layers 0-2 of one expert on layers 1-3 of another (6 layers out)
    "passthrough_stack": ("fp32", "exact", {
        "slices": [{"sources": [{"model": "expert_a", "layer_range": [0, 3]}]},
                   {"sources": [{"model": "expert_b", "layer_range": [1, 4]}]}],
        "merge_method": "passthrough",
        "dtype": "float32",
    }),
    # passthrough's per-source scale through a filter list (a muted o_proj, a halved down_proj in the second slice)
    "passthrough_scale": ("fp32", "exact", {
        "slices": [{"sources": [{"model": "base", "layer_range": [0, 2]}]},
                   {"sources": [{"model": "aligned", "layer_range": [2, 4],
                                 "parameters": {"scale": [{"filter": "o_proj", "value": 0.0},
                                                          {"filter": "down_proj", "value": 0.5}, {"value": 1.0}]}}]}],
        "merge_method": "passthrough",
        "dtype": "float32",
    }),
    # per-model filters match each source's own tensor names (layers.0. of the second slice's source is output
    # layer 2), global ones the output's
    "passthrough_source_filter": ("fp32", "exact", {
        "slices": [{"sources": [{"model": "expert_a", "layer_range": [0, 2]}]},
                   {"sources": [{"model": "aligned", "layer_range": [0, 2],
                                 "parameters": {"scale": [{"filter": "layers.0.", "value": 0.0}, {"value": 1.0}]}}]}],
        "merge_method": "passthrough",
        "dtype": "float32",
    }),
    # t's gradient runs over each slice on its own; a slice's t before the top level's
    "slerp_two_slices": ("fp32", "exact", {
        "slices": [{"sources": [{"model": "base", "layer_range": [0, 2]}, {"model": "expert_a", "layer_range": [0, 2]}],
                    "parameters": {"t": [{"filter": "mlp", "value": [0, 1]}]}},
                   {"sources": [{"model": "base", "layer_range": [2, 4]}, {"model": "expert_a", "layer_range": [2, 4]}]}],
        "merge_method": "slerp", "base_model": "base",
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]},
        "dtype": "float32",
    }),
    # TIES over slices whose sources sit at different depths; embeddings merged as the first slice, norm and
    # lm_head as the last
    "ties_stack": ("fp32", "exact", {
        "slices": [{"sources": [{"model": "base", "layer_range": [0, 2]},
                                {"model": "expert_a", "layer_range": [0, 2], "parameters": {"weight": 1.0, "density": 0.7}},
                                {"model": "aligned", "layer_range": [0, 2], "parameters": {"weight": 0.5, "density": 0.5}}]},
                   {"sources": [{"model": "base", "layer_range": [2, 4]},
                                {"model": "expert_a", "layer_range": [1, 3], "parameters": {"weight": 1.0, "density": 0.6}},
                                {"model": "aligned", "layer_range": [2, 4], "parameters": {"weight": 0.7, "density": 0.9}}]}],
        "merge_method": "ties", "base_model": "base",
        "dtype": "float32",
    }),
    # a linear stack without a base; a one-layer slice (t = 1)
    "linear_stack": ("fp32", "exact", {
        "slices": [{"sources": [{"model": "expert_a", "layer_range": [0, 2], "parameters": {"weight": 0.7}},
                                {"model": "expert_b", "layer_range": [0, 2], "parameters": {"weight": 0.3}}]},
                   {"sources": [{"model": "aligned", "layer_range": [3, 4], "parameters": {"weight": 1.0}},
                                {"model": "base", "layer_range": [3, 4], "parameters": {"weight": [0.5, 2.0]}}]}],
        "merge_method": "linear",
        "dtype": "float32",
    }),
    # merges of merges: a soup of the experts, SLERP of the soup toward the aligned model, TIES of that and expert_b
    "multi_stage": ("fp32", "exact", [
        {"merge_method": "ties", "base_model": "base",
         "models": _models(mid={"weight": 1.0, "density": 0.6}, expert_b={"weight": 0.5, "density": 0.5}),
         "dtype": "float32"},
        {"name": "soup", "merge_method": "linear", "models": _models(expert_a={"weight": 0.6}, expert_b={"weight": 0.4}),
         "dtype": "float32"},
        {"name": "mid", "merge_method": "slerp", "base_model": "soup", "models": _models(soup={}, aligned={}),
         "parameters": {"t": GRADIENT}, "dtype": "float32"},
    ]),
    "nearswap": ("fp32", "exact", {
        "merge_method": "nearswap", "base_model": "base",
        "models": _models(expert_a={}),
        "parameters": {"t": [0.001, 0.01, 0.1]},
        "dtype": "float32",
    }),
    "multislerp_base": ("fp32", "exact", {
        "merge_method": "multislerp", "base_model": "base",
        "models": _models(expert_a={"weight": 0.5}, expert_b={"weight": 0.3}, aligned={"weight": 0.2}),
        "dtype": "float32",
    }),
    "multislerp": ("fp32", "exact", {
        "merge_method": "multislerp",
        "models": _models(expert_a={"weight": 1.0}, aligned={"weight": 2.0}),
        "parameters": {"normalize_weights": False},
        "dtype": "float32",
    }),
    "karcher": ("fp32", "exact", {
        "merge_method": "karcher",
        "models": _models(expert_a={}, expert_b={}, aligned={}),
        "dtype": "float32",
    }),
    "karcher_base": ("fp32", "exact", {  # the base is one more point of the mean, as mergekit merges it
        "merge_method": "karcher", "base_model": "base",
        "models": _models(expert_a={}, aligned={}),
        "parameters": {"max_iter": 3},
        "dtype": "float32",
    }),
    "arcee_fusion": ("fp32", "exact", {
        "merge_method": "arcee_fusion", "base_model": "base",
        "models": _models(base={}, expert_a={}),
        "dtype": "float32",
    }),
    "breadcrumbs": ("fp32", "exact", {
        "merge_method": "breadcrumbs", "base_model": "base",
        "models": _models(expert_a={"weight": 1.0, "density": 0.8, "gamma": 0.05},
                          aligned={"weight": 0.5, "density": 0.8}),
        "dtype": "float32",
    }),
    "model_stock": ("fp32", "exact", {
        "merge_method": "model_stock", "base_model": "base",
        "models": _models(expert_a={}, expert_b={}, aligned={}),
        "dtype": "float32",
    }),
    "task_arithmetic_mergealign_bf16": ("bf16", "exact", {
        "merge_method": "task_arithmetic", "base_model": "base",
        "models": _models(expert_a={"weight": 1.0}, aligned={"weight": 1.0}),
        "dtype": "bfloat16",
    }),
    "slerp_gradient_bf16": ("bf16", "exact", {
        "merge_method": "slerp", "base_model": "base",
        "models": _models(base={}, expert_a={}),
        "parameters": {"t": GRADIENT}, "dtype": "bfloat16",
    }),
    "ties_bf16": ("bf16", "exact", {
        "merge_method": "ties", "base_model": "base",
        "models": _models(expert_a={"weight": 1.0, "density": 0.5}, aligned={"weight": 1.0, "density": 0.5}),
        "dtype": "bfloat16",
    }),
    # mergekit's `rescale` on the magnitude-trimmed methods: each trimmed τ rescaled to keep its L1 norm
    "ties_rescale": ("fp32", "exact", {
        "merge_method": "ties", "base_model": "base",
        "models": _models(expert_a={"weight": 1.0, "density": 0.5}, aligned={"weight": 0.5, "density": 0.3}),
        "parameters": {"rescale": True}, "dtype": "float32",
    }),
    "breadcrumbs_ties_rescale": ("fp32", "exact", {
        "merge_method": "breadcrumbs_ties", "base_model": "base",
        "models": _models(expert_a={"weight": 1.0, "density": 0.7, "gamma": 0.05},
                          expert_b={"weight": 0.6, "density": 0.5}, aligned={"weight": 0.8, "density": 0.6}),
        "parameters": {"rescale": True}, "dtype": "float32",
    }),
    "nuslerp_base": ("fp32", "exact", {
        "merge_method": "nuslerp", "base_model": "base",
        "models": _models(expert_a={"weight": 0.4}, aligned={"weight": 0.6}),
        "dtype": "float32",
    }),
    "nuslerp_rows": ("fp32", "exact", {
        "merge_method": "nuslerp",
        "models": _models(expert_a={"weight": 1.0}, aligned={"weight": 3.0}),
        "parameters": {"nuslerp_flatten": False}, "dtype": "float32",
    }),
    "nuslerp_columns": ("fp32", "exact", {
        "merge_method": "nuslerp", "base_model": "base",
        "models": _models(expert_a={"weight": 0.5}, expert_b={"weight": 0.2}),
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}, "dtype": "float32",
    }),
    "sce": ("fp32", "exact", {
        "merge_method": "sce", "base_model": "base",
        "models": _models(expert_a={}, expert_b={}, aligned={}),
        "parameters": {"select_topk": 0.5}, "dtype": "float32",
    }),
    "sce_bf16": ("bf16", "exact", {
        "merge_method": "sce", "base_model": "base",
        "models": _models(expert_a={}, aligned={}),
        "dtype": "bfloat16",
    }),
    # epsilon 0.004 sits near the median |τ| of the matrices: entries changed by one model, by several and by none
    "ram": ("fp32", "exact", {
        "merge_method": "ram", "base_model": "base",
        "models": _models(expert_a={}, expert_b={}, aligned={}),
        "parameters": {"epsilon": 0.004}, "dtype": "float32",
    }),
    "ramplus_tl": ("fp32", "exact", {
        "merge_method": "ramplus_tl", "base_model": "base",
        "models": _models(expert_a={}, expert_b={}, aligned={}),
        "parameters": {"r": 0.2, "alpha": 3.0, "epsilon": 0.004}, "dtype": "float32",
    }),
    "ram_bf16": ("bf16", "exact", {
        "merge_method": "ram", "base_model": "base",
        "models": _models(expert_a={}, aligned={}),
        "dtype": "bfloat16",
    }),
    "della": ("fp32", "stats", {
        "merge_method": "della", "base_model": "base",
        "models": _models(expert_a={"weight": 1.0, "density": 0.5}, aligned={"weight": 1.0, "density": 0.5, "epsilon": 0.2}),
        "dtype": "float32",
    }),
    "della_linear": ("fp32", "stats", {
        "merge_method": "della_linear", "base_model": "base",
        "models": _models(expert_a={"weight": 1.0, "density": 0.4}),
        "parameters": {"epsilon": 0.1}, "dtype": "float32",
    }),
    "dare_linear": ("fp32", "stats", {
        "merge_method": "dare_linear", "base_model": "base",
        "models": _models(expert_a={"weight": 1.0, "density": 0.3}),
        "dtype": "float32",
    }),
    "dare_ties": ("fp32", "stats", {
        "merge_method": "dare_ties", "base_model": "base",
        "models": _models(expert_a={"weight": 1.0, "density": 0.5}, aligned={"weight": 1.0, "density": 0.5}),
        "dtype": "float32",
    }),
}


def build_inputs(root: Path, family: str) -> dict[str, Path]:
    """Write the tiny family ``family`` ("fp32"/"bf16") under ``root/family/<role>``."""
    return _family.write_family(Path(root) / family, spec=SPEC, roles=ROLES, **FAMILIES[family])


def absolute_config(config: dict | list[dict], inputs: Path) -> dict | list[dict]:
    """The case config with role names replaced by absolute model dirs under ``inputs`` (stage names kept)."""
    if isinstance(config, list):
        stages = {d["name"] for d in config if "name" in d}
        return [map_model_refs(d, lambda r: r if r in stages else str(inputs / r)) for d in config]
    return map_model_refs(config, lambda r: str(inputs / r))


def _dump(config: dict | list[dict]) -> str:
    docs = config if isinstance(config, list) else [config]
    return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=None)


def run_mergekit(mergekit: str, config: dict | list[dict], out: Path, *, seed: int | None = None) -> None:
    cfg_path = out.parent / (out.name + ".yml")
    cfg_path.write_text(_dump(config))
    if isinstance(config, list):  # a multi-stage case: mergekit-multi, the stages under OUT-stages
        cmd = [str(Path(mergekit).with_name("mergekit-multi")), str(cfg_path), "-I", f"{out}-stages",
               "--out-path", str(out)]
    else:
        cmd = [mergekit, str(cfg_path), str(out)]
    cmd += ["--quiet", "--no-copy-tokenizer", "--no-write-model-card"]
    if seed is not None:
        cmd += ["--random-seed", str(seed)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"mergekit failed on {cfg_path}:\n{proc.stderr[-4000:]}")


def mergekit_version(mergekit: str) -> str:
    py = Path(mergekit).parent / "python"
    return subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                          capture_output=True, text=True, check=True).stdout.strip()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit", default=str(REPO / ".bench-venv" / "bin" / "mergekit-yaml"))
    ap.add_argument("--out", type=Path, default=FIXTURES)
    ap.add_argument("--seed", type=int, default=0, help="mergekit --random-seed for the DARE cases")
    ap.add_argument("--only", nargs="+", choices=sorted(CASES), help="remake these cases; keep the others' fixtures")
    args = ap.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "peer": f"mergekit {mergekit_version(args.mergekit)}",
        "torch": torch.__version__,
        "spec": _family.spec_dict(SPEC),
        "roles": list(ROLES),
        "families": FAMILIES,
        "fingerprints": {},
        "cases": {},
    }
    if args.only:  # the other cases stay as they were made, so the inputs and the peer must be the same
        old = json.loads((args.out / "manifest.json").read_text())
        for key in ("peer", "torch", "spec", "roles", "families"):
            if old[key] != manifest[key]:
                raise SystemExit(f"--only: the existing fixtures were made with {key} {old[key]!r}, not "
                                 f"{manifest[key]!r}; remake them all")
        manifest["cases"] = {k: v for k, v in old["cases"].items() if k not in args.only}
    with tempfile.TemporaryDirectory(prefix="sm-parity-") as tmp:
        tmp = Path(tmp)
        for family in FAMILIES:
            dirs = build_inputs(tmp / "inputs", family)
            manifest["fingerprints"][family] = {r: _family.fingerprint(d) for r, d in dirs.items()}
        for name, (family, kind, config) in CASES.items():
            if args.only and name not in args.only:
                continue
            inputs = tmp / "inputs" / family
            out = tmp / "out" / name
            out.parent.mkdir(exist_ok=True)
            run_mergekit(args.mergekit, absolute_config(config, inputs), out,
                         seed=args.seed if kind == "stats" else None)
            tensors = dict(_family.iter_tensors(out))
            (args.out / f"{name}.yml").write_text(
                f"# parity case {name!r}: models are role names in the {family} family (see manifest.json)\n"
                + _dump(config))
            entry = {"family": family, "kind": kind, "config": f"{name}.yml",
                     "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
                     "num_hidden_layers": json.loads((out / "config.json").read_text())["num_hidden_layers"]}
            if kind == "exact":
                save_file({k: v.contiguous() for k, v in sorted(tensors.items())},
                          str(args.out / f"{name}.safetensors"), metadata={"peer": manifest["peer"]})
                entry["output"] = f"{name}.safetensors"
            else:
                entry["shapes"] = {k: list(v.shape) for k, v in sorted(tensors.items())}
                entry["stats"] = _family.merge_stats(tensors, config, inputs)
            manifest["cases"][name] = entry
            print(f"{name:34s} {entry['dtype']:9s} {kind}")
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
