"""safemerge gives mergekit 0.1.5's tensors for the same YAML, to output-dtype rounding.

The references in tests/fixtures/mergekit/ were made by ``benchmarks/make_parity_fixtures.py`` with
mergekit 0.1.5; mergekit is not needed here. The inputs (a tiny GQA Llama family: base, expert_a,
expert_b, aligned) are rebuilt from the recipe in ``manifest.json`` and checked against the
fingerprints mergekit saw before anything is compared.

Tolerances follow the documented convention (docs/methods.md): safemerge computes in float32 and
casts once; mergekit computes in the config's ``dtype``.

- float32 outputs: |Δ| ≤ 1e-7 + 1e-5·|ref| (a few float32 ulps at the weights' scale, 0.02 to 1).
- bfloat16 outputs: |Δ| ≤ ulp(ref) + ulp(S), S = max_i |θ_i| + Σ_i |w_i|·|θ_i − θ_base| per element:
  one rounding of the output plus one of the largest intermediate mergekit rounds in bfloat16.
- ties and sce in bfloat16 only: elements where mergekit's bfloat16 deltas make a different discrete
  choice than exact ones (a magnitude tie or crossing at the density threshold, or a different elected
  sign) are excused and counted; their share is bounded.
- dare_*, della*: random, so only names, shapes, dtypes and statistics (share of changed elements, L1 of the
  merged delta) are compared, with tolerances of many binomial standard deviations.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mergekit"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
EXACT = sorted(n for n, c in MANIFEST["cases"].items() if c["kind"] == "exact")
STATS = sorted(n for n, c in MANIFEST["cases"].items() if c["kind"] == "stats")
# bfloat16 cases of these methods excuse the elements whose discrete choices bfloat16 rounding decides (sce's
# election is unweighted: its cases set no weights, so the helper's weight 1 is its rule; no select_topk)
SIGN_ELECTING = ("ties", "sce")


def _load_family_module():
    spec = importlib.util.spec_from_file_location("_sm_bench_family", REPO / "benchmarks" / "_family.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


_family = _load_family_module()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Root holding ``<family>/<role>`` HF dirs identical (by fingerprint) to mergekit's inputs."""
    root = tmp_path_factory.mktemp("parity-inputs")
    spec = _family.LlamaSpec(**MANIFEST["spec"])
    for family, recipe in MANIFEST["families"].items():
        dirs = _family.write_family(root / family, spec=spec, roles=tuple(MANIFEST["roles"]), **recipe)
        for role, d in dirs.items():
            want = MANIFEST["fingerprints"][family][role]
            assert _family.fingerprint(d) == want, (
                f"regenerated input {family}/{role} differs from the one mergekit merged "
                f"(torch {torch.__version__}; fixtures made with torch {MANIFEST['torch']}): "
                "torch's RNG stream changed; rerun benchmarks/make_parity_fixtures.py")
    return root


def _run_safemerge(case: str, inputs: Path, out: Path, monkeypatch) -> tuple[dict, dict[str, torch.Tensor]]:
    """Merge the case's YAML as a file sitting next to its models (paths are role names); a multi-stage case
    (mergekit-multi's) through `multimerge`, returning its final merge's config."""
    from safemerge import merge, multimerge

    entry = MANIFEST["cases"][case]
    family_dir = inputs / entry["family"]
    config_path = family_dir / f"{case}.yml"
    shutil.copyfile(FIXTURES / entry["config"], config_path)
    monkeypatch.chdir(family_dir)
    docs = list(yaml.safe_load_all(config_path.read_text()))
    if len(docs) > 1:
        multimerge(str(config_path), out, intermediate_dir=out.with_name(out.name + "-stages"), progress=False)
    else:
        merge(str(config_path), out)
    config = next(d for d in docs if "name" not in d)
    layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    assert layers == entry["num_hidden_layers"], f"{case}: {layers} layers in config.json, mergekit wrote {entry['num_hidden_layers']}"
    return config, dict(_family.iter_tensors(out))


def _ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 numbers at |x| (8 significant bits), as float32."""
    x = x.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(x)) - 7)


def _weight(params: dict | None) -> float:
    w = (params or {}).get("weight", 1.0)
    return abs(float(w)) if isinstance(w, (int, float)) else 1.0


def _intermediate_scale(name: str, config: dict, models: dict[str, dict]) -> torch.Tensor:
    """S = max_i |θ_i| + Σ_i |w_i|·|θ_i − θ_base| for tensor ``name`` (float32)."""
    roles = [m["model"] for m in config["models"]]
    base = config.get("base_model")
    thetas = [models[r][name].float() for r in {*roles, *([base] if base else [])}]
    scale = torch.stack(thetas).abs().amax(0)
    if base:
        for m in config["models"]:
            if m["model"] != base:
                scale = scale + _weight(m.get("parameters")) * (models[m["model"]][name].float()
                                                                - models[base][name].float()).abs()
    return scale


def _ties_ambiguous(name: str, config: dict, models: dict[str, dict]) -> torch.Tensor:
    """Elements where bfloat16 deltas (mergekit) and exact deltas (safemerge) choose differently.

    Per model: a magnitude equal to the k-th largest (k = max(1, int(density·n)), a tie broken by
    sort order) or on different sides of it under the two roundings; across models: a different
    sign of Σ w_i·τ̃_i (sum ≥ 0 elects +).
    """
    base = models[config["base_model"]][name]
    ambiguous = torch.zeros(base.shape, dtype=torch.bool)
    elected = {}
    for kind in ("bf16", "exact"):
        total = torch.zeros(base.shape)
        for m in config["models"]:
            theta = models[m["model"]][name]
            tau = (theta - base).float() if kind == "bf16" else theta.float() - base.float()
            density = float((m.get("parameters") or {}).get("density", 1.0))
            keep = torch.ones_like(tau, dtype=torch.bool)
            if density < 1:
                k = max(1, int(density * tau.numel()))
                mag = tau.abs().flatten()
                threshold = torch.kthvalue(mag, mag.numel() - k + 1).values
                keep = tau.abs() >= threshold
                ambiguous |= tau.abs() == threshold
                ambiguous |= keep != elected.get((m["model"], "keep"), keep)
                elected[(m["model"], "keep")] = keep
            total += _weight(m.get("parameters")) * tau * keep
        sign = total >= 0
        ambiguous |= sign != elected.get("sign", sign)
        elected["sign"] = sign
    return ambiguous


def _threshold_flips(name: str, config: dict, models: dict[str, dict], ours: torch.Tensor) -> torch.Tensor:
    """arcee_fusion merged on a GPU (``merge`` picks CUDA where there is one): softmax and log round differently
    there, so an element whose importance sits at the outlier threshold may take the other side of it
    (tests/test_cuda.py). Such an element still holds the base's or the model's value: those elements."""
    if config["merge_method"] != "arcee_fusion" or not torch.cuda.is_available():
        return torch.zeros(ours.shape, dtype=torch.bool)
    base = config["base_model"]
    model = next(m["model"] for m in config["models"] if m["model"] != base)
    a, x, y = ours.float(), models[base][name].float(), models[model][name].float()
    return (a == x) | torch.isclose(a, y, rtol=0, atol=1e-6)


def _compare(case: str, config: dict, ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
             models: dict[str, dict]) -> tuple[float, int]:
    """Assert agreement; return (max |Δ| over all tensors, number of excused elements)."""
    assert sorted(ours) == sorted(ref), (
        f"{case}: tensor names differ: only safemerge {sorted(set(ours) - set(ref))}, "
        f"only mergekit {sorted(set(ref) - set(ours))}")
    worst, excused, elements = 0.0, 0, 0
    for name in sorted(ref):
        a, b = ours[name], ref[name]
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{case}/{name}: safemerge {a.dtype} {tuple(a.shape)} vs mergekit {b.dtype} {tuple(b.shape)}")
        diff = (a.double() - b.double()).abs()
        if b.dtype == torch.float32:
            allowed = 1e-7 + 1e-5 * b.double().abs()
            skip = torch.zeros_like(diff, dtype=torch.bool)
        else:
            allowed = (_ulp_bf16(b) + _ulp_bf16(_intermediate_scale(name, config, models))).double()
            skip = (_ties_ambiguous(name, config, models) if config["merge_method"] in SIGN_ELECTING
                    else torch.zeros_like(diff, dtype=torch.bool))
        skip |= _threshold_flips(name, config, models, a) & (diff > allowed)
        bad = (diff > allowed) & ~skip
        if bad.any():
            i = tuple(bad.nonzero()[0].tolist())
            pytest.fail(f"{case}/{name}: {int(bad.sum())} of {b.numel()} elements differ beyond "
                        f"{b.dtype} rounding; first at {list(i)}: safemerge {float(a[i])!r} vs "
                        f"mergekit {float(b[i])!r} (max |Δ| {float(diff.max()):.3g})")
        worst = max(worst, float(diff[~skip].max()) if (~skip).any() else 0.0)
        excused += int(skip.sum())
        elements += b.numel()
    assert excused <= 0.05 * elements, f"{case}: {excused} of {elements} elements ambiguous"
    if config["merge_method"] == "arcee_fusion":  # a flip at the threshold is rare (as in tests/test_cuda.py)
        assert excused <= 1e-3 * elements, f"{case}: {excused} of {elements} elements flipped at the threshold"
    return worst, excused


@pytest.mark.parametrize("case", EXACT)
def test_same_tensors_as_mergekit(case, inputs, tmp_path, monkeypatch):
    config, ours = _run_safemerge(case, inputs, tmp_path / "out", monkeypatch)
    family = inputs / MANIFEST["cases"][case]["family"]
    models = {r: dict(_family.iter_tensors(family / r)) for r in MANIFEST["roles"]}
    ref = load_file(str(FIXTURES / MANIFEST["cases"][case]["output"]))
    worst, excused = _compare(case, config, ours, ref, models)
    print(f"{case}: max |Δ| vs mergekit {worst:.3g}" + (f", {excused} ambiguous elements" if excused else ""))


@pytest.mark.parametrize("case", STATS)
def test_random_method_statistics_match_mergekit(case, inputs, tmp_path, monkeypatch):
    entry = MANIFEST["cases"][case]
    config, ours = _run_safemerge(case, inputs, tmp_path / "out", monkeypatch)
    assert {k: list(v.shape) for k, v in ours.items()} == entry["shapes"]
    assert {str(v.dtype).removeprefix("torch.") for v in ours.values()} == {entry["dtype"]}
    assert all(bool(torch.isfinite(v).all()) for v in ours.values())
    stats = _family.merge_stats(ours, config, inputs / entry["family"])
    print(f"{case}: safemerge {stats} vs mergekit {entry['stats']}")
    # n = 35k elements: binomial sd of a share is < 0.003, so 0.02 is > 6 sd.
    assert stats["changed_fraction"] == pytest.approx(entry["stats"]["changed_fraction"], abs=0.02)
    assert stats["l1_ratio"] == pytest.approx(entry["stats"]["l1_ratio"], abs=0.05)
