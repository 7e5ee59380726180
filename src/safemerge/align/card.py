"""The model card of a preference-tuned model: what went in, with which settings, and how long it took."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from safemerge._hf import hub_repo
from safemerge.config import split_reference


def model_label(reference: str) -> str:
    """A model's short name: its folder's (`model+adapter`: both folders', joined by '+')."""
    return "+".join(Path(p).name for p in split_reference(reference) if p)


def write_card(out_dir: Path, run: dict[str, Any]) -> None:
    """README.md with front matter (base_model where the model is a hub id, tags [safemerge, <method>, lora]) and the
    run record.

    `run` is the record written to adapter/align_run.json: model, fingerprint, data, settings,
    training (steps, epochs, losses, wall time), environment (device, precision, library versions).
    """
    s, t, env = run["settings"], run["training"], run["environment"]
    method = s["method"]
    front = {"tags": ["safemerge", method, "lora"], "library_name": "transformers"}
    if repo := hub_repo(run["model"]):  # the hub reads base_model as a hub id; a local path is in the text below
        front = {"base_model": repo, **front}
    settings = {k: v for k, v in s.items() if k != "method"}
    card = (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
        f"# {method.upper()} of {model_label(run['model'])}\n\n"
        f"The model `{run['model']}` (weights fingerprint `{run['fingerprint']}`) preference-tuned with "
        f"{method.upper()} through a LoRA adapter, which was then merged into the weights (peft "
        "`merge_and_unload`), so this is a plain checkpoint. The adapter itself is in `adapter/`. "
        "Made with [safemerge](https://github.com/safemerge/safemerge) `align`.\n\n"
        f"## Data\n\n- source: `{run['data']['source']}` (fingerprint `{run['data']['fingerprint']}`)\n"
        f"- pairs used: {run['data']['pairs']} ({'chat template' if run['data']['chat'] else 'plain text'})\n\n"
        f"## Settings\n\n```yaml\n{yaml.safe_dump(settings, sort_keys=False)}```\n\n"
        "## Run\n\n| | |\n|---|---|\n"
        f"| optimizer steps | {t['steps']} |\n| epochs | {t['epochs']:.2f} |\n"
        f"| effective batch | {s['batch_size'] * s['grad_accum']} pairs |\n"
        f"| first / last logged loss | {_fmt(t['first_loss'])} / {_fmt(t['last_loss'])} |\n"
        f"| wall time | {t['wall_s']:.1f} s (training {t['train_s']:.1f} s) |\n"
        f"| device / precision | {env['device']} / {env['precision']} |\n"
        f"| output dtype | {env['dtype']} |\n"
        f"| versions | trl {env['trl']}, peft {env['peft']}, transformers {env['transformers']}, torch {env['torch']} |\n"
    )
    (out_dir / "README.md").write_text(card)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
