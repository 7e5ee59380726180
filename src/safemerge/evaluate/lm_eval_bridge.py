"""Run an lm-evaluation-harness task on a model held in memory (optional extra: safemerge[lm-eval]).

`run_lm_eval(model, task=...)` wraps the loaded transformers model and tokenizer in lm-eval's HFLM, so
the numbers come from lm-eval itself on exactly the weights safemerge evaluates. `task` is either a
safemerge multiple-choice JSONL (run through the shipped `tasks/safemerge_mc.yaml` with the file path
filled in) or the name of any lm-eval task. `format="chat"` is lm-eval's --apply_chat_template.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from safemerge.errors import SafemergeError
from safemerge.evaluate.backends import TransformersBackend, get_backend

TASK_YAML = Path(__file__).with_name("tasks") / "safemerge_mc.yaml"


def task_yaml(jsonl: str | os.PathLike, *, name: str = "safemerge_mc") -> str:
    """The shipped task YAML with `data_files` pointing at `jsonl` (absolute path)."""
    cfg = yaml.safe_load(TASK_YAML.read_text())
    cfg["task"] = name
    cfg["dataset_kwargs"]["data_files"]["test"] = str(Path(jsonl).expanduser().resolve())
    return yaml.safe_dump(cfg, sort_keys=False)


def run_lm_eval(
    model: Any,
    *,
    task: str | os.PathLike,
    format: str = "plain",
    batch_size: int = 32,
    limit: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> dict:
    """lm-eval's acc / acc_norm for `task` on `model` (a path or a loaded TransformersBackend).

    Returns {"task", "acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n", "lm_eval_version"}.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SafemergeError("the lm-eval bridge needs lm-evaluation-harness: pip install 'safemerge[lm-eval]'") from None
    if format not in ("plain", "chat"):
        raise SafemergeError(f"unknown format {format!r}; choose plain or chat")
    backend = get_backend(model, device=device, dtype=dtype, batch_size=batch_size)
    if not isinstance(backend, TransformersBackend):
        raise SafemergeError(f"the lm-eval bridge needs the transformers backend, got {backend.name}")
    lm = HFLM(pretrained=backend.model, tokenizer=backend.tokenizer, batch_size=batch_size)
    with tempfile.TemporaryDirectory(prefix="safemerge-lmeval-") as d:
        if Path(task).expanduser().is_file():
            name = "safemerge_mc"
            (Path(d) / f"{name}.yaml").write_text(task_yaml(task, name=name))
            manager = TaskManager(include_path=d, include_defaults=False)
        else:
            name, manager = str(task), TaskManager()
        res = lm_eval.simple_evaluate(
            model=lm, tasks=[name], task_manager=manager, apply_chat_template=format == "chat",
            limit=limit, log_samples=False, bootstrap_iters=0,
        )
    r = res["results"][name]
    return {
        "task": name,
        "acc": r.get("acc,none"),
        "acc_norm": r.get("acc_norm,none"),
        "acc_stderr": r.get("acc_stderr,none"),
        "acc_norm_stderr": r.get("acc_norm_stderr,none"),
        "n": res.get("n-samples", {}).get(name, {}).get("effective"),
        "lm_eval_version": getattr(lm_eval, "__version__", None),
    }
