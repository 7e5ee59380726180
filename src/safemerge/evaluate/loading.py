"""Finding and loading models for evaluation, and the lazy `ModelRef` that keys the results store.

A `ModelRef` knows what identifies a model's results (weights fingerprint, dtype, chat template) after
reading only headers, config and tokenizer, so a repeated evaluation is answered from the store without
loading the weights. Loading is safetensors-only unless `allow_pickle`, and never runs remote code.
"""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from safemerge._hf import local_folder, quiet_transformers
from safemerge.checkpoint import nonfinite
from safemerge.errors import CheckpointError, SafemergeError, one_line
from safemerge.writer import TOKENIZER_FILES

if TYPE_CHECKING:
    from safemerge.store import ResultsStore

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SafemergeError(f"device {device!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise SafemergeError(f"device {device!r} is not a device torch knows; use auto, cpu or cuda (cuda:N)") from None


def resolve_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise SafemergeError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[dtype]


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A local model directory; a hub id ("org/name" or "org/name@revision") is its snapshot in the local HF cache,
    fetched first where a hub is reachable (`_hf.local_folder`)."""
    p = local_folder(model)
    if p.exists():
        return p
    raise CheckpointError(f"{p}: no such model directory; check the path")


def check_batch_size(**sizes: int) -> None:
    """Batch sizes are whole numbers of at least 1 (a clear error instead of one from deep in the batching loop)."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            label = "--batch-size" if name == "batch_size" else f"{name}="
            raise SafemergeError(f"{label} {value}: must be a whole number of at least 1")


def resolve_reference(model: str | os.PathLike) -> tuple[Path, Path | None]:
    """(model folder, adapter folder) of a `model+adapter` (LoRA) reference, as merges read it; (folder, None) for
    a plain model (a local folder, or a hub id when a hub is reachable)."""
    from safemerge.config import split_reference
    from safemerge.lora import refuse_bare_adapter

    base, adapter = split_reference(str(model))
    if adapter is None:
        path = resolve_model_path(model)
        refuse_bare_adapter(path)
        return path, None
    a = local_folder(adapter)
    if not a.is_dir():
        raise CheckpointError(f"{model}: {a} is not a folder; a LoRA reference is `model_path+adapter_path`, the adapter "
                              "a PEFT LoRA folder (adapter_config.json, adapter_model.safetensors)")
    return resolve_model_path(base), a


def model_folders(model: str | os.PathLike) -> tuple[Path, Path | None]:
    """resolve_reference for evaluation: a single weights file is refused (evaluating needs the config and tokenizer)."""
    path, adapter = resolve_reference(model)
    if path.is_file():
        raise CheckpointError(f"{path}: is a file; evaluation needs a model folder (config.json, tokenizer and "
                              "*.safetensors weights)")
    return path, adapter


def asked_for(ref: Any, hit: dict) -> dict:
    """A stored result answers for the same weights under any path: it is reported for the model asked about, with
    the path it was computed for beside it where that differs (a copy, another spelling)."""
    stored = hit.get("model")
    return {"model": ref.source, **({"computed_for": stored} if stored is not None and stored != ref.source else {})}


def same_model_key(model: str | os.PathLike) -> tuple[str, str | None]:
    """The resolved (model, adapter) folders of a reference: equal for two spellings of one model (./m, m/, a link)."""
    path, adapter = model_folders(model)
    return str(path.resolve()), (str(adapter.resolve()) if adapter is not None else None)


def tokenizer_folder(path: Path, adapter: Path | None) -> Path:
    """Where a model's tokenizer is read: the adapter's folder when it holds one (a fine-tune saves its tokenizer,
    and the chat template it was trained with, beside the adapter), else the model's."""
    if adapter is not None and any((adapter / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return adapter
    return path


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:
        if _needs_own_code(e):
            raise CheckpointError(f"{path}: {_OWN_CODE}") from None
        raise CheckpointError(f"{path}: cannot load its tokenizer ({one_line(e)}); copy the tokenizer files into it") from None


_OWN_CODE = ("the model needs Python code of its own to load (its config's auto_map, or a model_type this transformers "
             "does not know); safemerge never runs code that comes with a model: use a model of a built-in architecture "
             "or a newer transformers")


def _needs_own_code(e: Exception) -> bool:
    return "trust_remote_code" in str(e)


def load_model(
    path: str | os.PathLike,
    *,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    allow_pickle: bool = False,
    tokenizer: Any = None,
    adapter: Path | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) from a local HF directory, with the LoRA adapter at `adapter` merged in when given, on
    `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    p = Path(path).expanduser()
    if not (p / "config.json").exists():
        raise CheckpointError(f"{p}: not an HF model directory (no config.json); pass the directory of a saved model")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_folder(p, adapter))
    try:
        with quiet_transformers():  # its "Loading weights" bar per model; the evaluations show their own
            model = AutoModelForCausalLM.from_pretrained(
                p, dtype=resolve_dtype(dtype), trust_remote_code=False, use_safetensors=not allow_pickle
            )
    except Exception as e:
        if _needs_own_code(e):
            raise CheckpointError(f"{p}: {_OWN_CODE}") from None
        raise CheckpointError(f"{p}: cannot load the model ({one_line(e)})") from None
    if adapter is not None:
        from safemerge.lora import LoraCheckpoint

        merge_adapter(model, LoraCheckpoint(p, adapter, allow_pickle=allow_pickle))
    model.to(resolve_device(device)).eval()
    for name, param in model.named_parameters():
        if nonfinite(param):
            raise CheckpointError(f"{p}: tensor {name!r} holds NaN or Inf, so every score of this model would be "
                                  "meaningless (an empty answer even counts as a refusal); fix or re-make the checkpoint")
    return model, tokenizer


def merge_adapter(model: Any, ckpt: Any) -> None:
    """Write the weights a LoRA adapter changes into a loaded model, read through `ckpt` (a LoraCheckpoint) exactly
    as a merge reads them: each changed tensor once, no second copy of the model."""
    params = model.state_dict()
    for name in ckpt.changed():
        if name not in params:
            raise CheckpointError(f"{ckpt.reference}: the adapter changes tensor {name!r}, which the model transformers "
                                  f"builds from {ckpt.path} has not (its names differ from the checkpoint's); write the "
                                  "LoRA expert out first (a passthrough merge of that one model) and pass that folder")
        target = params[name]
        value = ckpt.get(name)
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"{ckpt.reference}: tensor {name!r} is {list(value.shape)} with the adapter, but the "
                                  f"loaded model's is {list(target.shape)}")
        with torch.no_grad():
            target.copy_(value)


@dataclass
class ModelRef:
    """A model to evaluate, identified but not (necessarily) loaded: not even its tokenizer, until used."""

    source: str
    path: Path | None
    fingerprint: str | None
    dtype: str
    chat_template: str | None  # the template text (what identifies the prompts), None without one
    files: str | None = None  # side_files_digest(path): config, generation config and tokenizer files
    adapter: Path | None = None  # a LoRA adapter merged into the model at `path` (a `model+adapter` reference)
    backend: Any = None  # the loaded backend: passed in by the caller, or memoised by get_backend
    _tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = (self.backend.tokenizer if self.backend is not None
                               else load_tokenizer(tokenizer_folder(self.path, self.adapter)))
        return self._tokenizer

    def identity(self, backend: str = "transformers") -> dict:
        if self.path is None:  # an in-memory backend passed by the caller
            return self.backend.identity()
        return {"backend": backend, "dtype": self.dtype, "chat_template": text_hash(self.chat_template), "files": self.files}


def model_ref(
    model: Any, *, dtype: str = "auto", allow_pickle: bool = False, store: "ResultsStore | None" = None,
    remember: bool = True,
) -> ModelRef:
    """A ModelRef for a path / hub id, or for a loaded backend (anything with .tokenizer and .fingerprint).
    A ModelRef passes through, so one ref (and the backend it loads once) can serve several evaluations.
    `remember=False`: the store's fingerprint cache is read, not written (see ResultsStore.fingerprint)."""
    if isinstance(model, ModelRef):
        return model
    if not isinstance(model, (str, os.PathLike)):
        if not hasattr(model, "tokenizer") or not hasattr(model, "generate"):
            raise SafemergeError(f"model must be a path or a loaded backend, got {type(model).__name__}")
        dt = str(getattr(getattr(model, "model", None), "dtype", "unknown")).replace("torch.", "")
        template = getattr(model.tokenizer, "chat_template", None)
        return ModelRef(getattr(model, "source", "<model>"), None, model.fingerprint, dt, template, backend=model,
                        _tokenizer=model.tokenizer)
    path, adapter = model_folders(model)
    source = f"{path}+{adapter}" if adapter is not None else str(path)
    if store is not None:
        fingerprint = store.fingerprint(source, allow_pickle=allow_pickle, remember=remember)
    else:
        from safemerge.lora import open_model

        fingerprint = open_model(source, allow_pickle=allow_pickle).fingerprint()
    files = side_files_digest(path) + (side_files_digest(adapter) if adapter is not None else "")
    return ModelRef(source, path, fingerprint, dtype_name(path, dtype), chat_template_text(tokenizer_folder(path, adapter)),
                    files, adapter)


def chat_template_text(path: Path) -> str | None:
    """The chat template a tokenizer saved at `path` will load (chat_template.jinja, else the
    tokenizer_config.json entry; of named templates, "default"), read without loading the tokenizer."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text() or None  # an empty file is no template (the prompts are plain text)
    try:
        value = json.loads((path / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value else None


# besides the weights (the fingerprint) and the chat template, what changes a model's outputs
SIDE_FILES = ("config.json", "generation_config.json",
              *(f for f in TOKENIZER_FILES if not f.startswith("chat_template")))  # the template is hashed on its own


def side_files_digest(path: Path, names: tuple[str, ...] = SIDE_FILES) -> str:
    """A digest of the model's config, generation config and tokenizer files (`names`), so that a stored result is
    not served after one of them was edited in place (the weight fingerprint does not cover them)."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    for name in names:
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def text_hash(text: str | None) -> str | None:
    """A short hash of a text (a chat template), for store keys; None for none."""
    import hashlib

    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest() if text is not None else None


def dtype_name(path: Path, dtype: str | torch.dtype) -> str:
    """The dtype a model at `path` is loaded in, by name: `dtype` itself, or for "auto" what transformers loads (the
    config's dtype, else the weights' own)."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).replace("torch.", "")
    if dtype != "auto":
        return str(resolve_dtype(dtype)).replace("torch.", "")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "auto"
    named = cfg.get("dtype") or cfg.get("torch_dtype")
    if named:
        return str(named)
    try:  # transformers' "auto" then loads the weights' own dtype
        from safemerge.checkpoint import Checkpoint

        return str(Checkpoint(path).float_dtype()).replace("torch.", "")
    except Exception:  # an unreadable checkpoint fails later, where it is loaded, with its own message
        return "float32"
