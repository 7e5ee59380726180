"""safemerge against mergekit on models whose vocabularies differ (`tokenizer_source`, `tokenizer:`).

    benchmarks/setup_mergekit.sh                   # once: .bench-venv with mergekit 0.1.5
    .venv/bin/python benchmarks/vocab_parity.py [--mergekit .bench-venv/bin/mergekit-yaml]

A tiny Llama family (tests/tiny.py) where the expert has two tokens of its own and the aligned model a
renumbered vocabulary, one token fewer and two tokens of its own (one shared with the expert). Task arithmetic
with `tokenizer_source: base`, `tokenizer_source: <expert>` and `tokenizer: {source: union, pad_to_multiple_of:
32}`, a union with `tokens` (zero, a named model's row forced, another token's row by token and by id, a token no
model has, added), and the aligned model's vocabulary with two tokens it lacks added through `tokens`; prints, per case, the largest difference of every tensor, the embedding rows compared token by token
(the union's token ids may be numbered in another order: mergekit orders the models as a set), and whether
the output vocabularies hold the same tokens.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from tiny import VOCAB_TENSORS, make_family, vocab_of, vocab_variant  # noqa: E402


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit", default=str(REPO / ".bench-venv" / "bin" / "mergekit-yaml"))
    args = ap.parse_args(argv)

    import safemerge
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        fam = make_family(root / "fam")
        n = len(vocab_of(fam["expert"]))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
        fam = dict(fam, expert=vocab_variant(fam["expert"], root / "e", extra={"<|med|>": n, "drugX": n + 1}),
                   aligned=vocab_variant(fam["aligned"], root / "a", perm=perm, drop="drug",
                                         extra={"drugX": n - 1, "<|safe|>": n}, seed=1))
        cases = {"base": {"tokenizer_source": "base"}, "expert": {"tokenizer_source": str(fam["expert"])},
                 "union, padded to 32": {"tokenizer": {"source": "union", "pad_to_multiple_of": 32}},
                 "union with tokens": {"tokenizer": {"source": "union", "tokens": {
                     "<|med|>": {"source": {"kind": "zero"}},  # only the expert has it: zero in the others
                     "drugX": {"source": str(fam["aligned"]), "force": True},  # the aligned model's row, everywhere
                     "<|safe|>": {"source": {"kind": "model_token", "model": str(fam["expert"]), "token": "<|med|>"}},
                     "capital": {"source": str(fam["expert"]), "force": True},
                     "<|new|>": {"source": {"kind": "model_token", "model": str(fam["base"]), "token_id": 7}}}}},
                 "aligned's, tokens added": {"tokenizer": {"source": str(fam["aligned"]), "tokens": {
                     "<|med|>": {"source": str(fam["expert"])},  # the aligned model lacks it: added, the expert's row
                     "<|new|>": {"source": {"kind": "zero"}}}}}}
        for i, (case, over) in enumerate(cases.items()):
            cfg = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]), "dtype": "float32",
                   "models": [{"model": str(fam["expert"]), "parameters": {"weight": 1.0}},
                              {"model": str(fam["aligned"]), "parameters": {"weight": 1.0}}], **over}
            path = root / f"case{i}.yml"
            path.write_text(yaml.safe_dump(cfg))
            safemerge.merge(str(path), root / f"sm{i}", progress=False)
            subprocess.run([args.mergekit, str(path), str(root / f"mk{i}")], check=True, capture_output=True)
            ours, ref = _tensors(root / f"sm{i}"), _tensors(root / f"mk{i}")
            vo = AutoTokenizer.from_pretrained(root / f"sm{i}").get_vocab()
            vr = AutoTokenizer.from_pretrained(root / f"mk{i}").get_vocab()
            rest = max(float((ours[k] - ref[k]).abs().max()) for k in ref if k not in VOCAB_TENSORS)
            by_token = max(float((ours[k][vo[t]] - ref[k][vr[t]]).abs().max()) for k in VOCAB_TENSORS for t in vo)
            pad = max((float((ours[k][len(vo):] - ref[k][len(vr):]).abs().max()) for k in VOCAB_TENSORS
                       if ours[k].shape[0] > len(vo)), default=0.0)
            renumbered = sorted(t for t in vo if vo[t] != vr.get(t))
            print(f"{case:22s} rows {ours['model.embed_tokens.weight'].shape[0]} / {ref['model.embed_tokens.weight'].shape[0]}"
                  f"  same tokens {set(vo) == set(vr)}  other tensors max|Δ| {rest:.2g}  embedding rows by token "
                  f"{by_token:.2g}  padding rows {pad:.2g}" + (f"  ids differ: {renumbered}" if renumbered else ""))


if __name__ == "__main__":
    main()
