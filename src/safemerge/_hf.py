"""Small shared helpers for working with transformers and datasets."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import warnings
from pathlib import Path
from typing import Iterable, Iterator

from safemerge.errors import CheckpointError

_HUB_REF = re.compile(r"([\w.-]+/[\w.-]+)(?:@([^\s@+]+))?")  # org/name, or org/name@revision


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether a name that is not a local path reads as a hub id "org/name": one slash, and `org` is not a
    local folder (then it is a mistyped local path, and nothing waits on the network for it)."""
    parts = _hub_parts(name)
    return parts is not None and parts[1] is None


def _hub_parts(name: str | os.PathLike) -> tuple[str, str | None] | None:
    m = _HUB_REF.fullmatch(name) if isinstance(name, str) else None
    if m is None or Path(m.group(1)).expanduser().parent.is_dir():
        return None
    return m.group(1), m.group(2)


# what a merge or an evaluation reads from a hub repository: config, safetensors weights (and their index), tokenizer,
# chat template and generation files, and the code an `auto_map` config names (copied, never run); pickled weights only
# on request and only where the repository has no safetensors
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt", "*.py"]
HUB_PICKLE_FILES = ["*.bin", "*.pt", "*.pth"]


def hub_reference(name: str | os.PathLike) -> tuple[str, str | None] | None:
    """(repo id, revision or None) of a name that is not a local path and reads as a hub id `org/name` or
    `org/name@revision`; None for anything else (a local path, a mistyped one whose `org` folder exists)."""
    return None if isinstance(name, str) and Path(name).expanduser().exists() else _hub_parts(name)


def hub_repo(name: str | os.PathLike) -> str | None:
    """The repo id of a hub reference (`org/name`, `org/name@revision`), as a card's `base_model` names it; None for
    a local path."""
    hub = hub_reference(name)
    return hub[0] if hub is not None else None


def local_folder(name: str | os.PathLike, *, allow_pickle: bool = False, weights: bool = True) -> Path:
    """The local path of a model or adapter reference: the path as given where it exists or does not read as a hub
    id; else the hub repository's snapshot in the local Hugging Face cache, fetched first where a hub is reachable
    (huggingface_hub: `HF_HUB_OFFLINE=1` reads the cache only, `HF_HUB_CACHE` / `HF_HOME` move it, `HF_TOKEN` or
    `hf auth login` for gated models). Only HUB_FILES are fetched (without the weights where `weights` is False: a
    tokenizer source), and pickled weights only with `allow_pickle` where the repository has no safetensors."""
    hub = hub_reference(name)
    if hub is None:
        return Path(name).expanduser()
    folder = _snapshot(str(name), *hub, HUB_FILES if weights else [f for f in HUB_FILES if f != "*.safetensors"])
    if not weights:
        return folder
    if allow_pickle and not any(folder.glob("*.safetensors")):
        folder = _snapshot(str(name), *hub, HUB_FILES + HUB_PICKLE_FILES)
    return folder


def _snapshot(name: str, repo: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        why = "it is gated: accept its terms on the hub, then log in (`hf auth login`) or set HF_TOKEN"
    except RepositoryNotFoundError:
        why = "the hub has no such repository (a private or gated one needs `hf auth login` or HF_TOKEN)"
    except RevisionNotFoundError:
        why = f"the repository has no revision {revision!r}"
    except LocalEntryNotFoundError:
        why = "it is not in the local Hugging Face cache and the hub cannot be reached"
    except Exception as e:  # noqa: BLE001 - huggingface_hub and httpx raise many kinds; say which
        why = f"fetching it from the hub failed ({type(e).__name__}: {e})"
    raise CheckpointError(f"{name}: no such local folder, and as a hub id: {why}; check the path, or download it "
                          f"(`hf download {repo} --local-dir DIR`) and give DIR")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' own per-load and per-save progress bars while safemerge shows its own, and the
    deprecation notices of the old `gradient_checkpointing` names that trl 1.16 and peft trigger inside
    transformers 5 on every trainer (`is_gradient_checkpointing`; `gradient_checkpointing_enable` and `_disable`
    where checkpointing is on, as on CUDA): nothing a user can act on."""
    from transformers.utils import logging as tlog

    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`\w*gradient_checkpointing\w*` is deprecated", category=FutureWarning)
            yield
    finally:
        if was:
            tlog.enable_progress_bar()


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Hide `datasets`' per-read and per-map progress bars (reading a small file, TRL's tokenizing)."""
    from datasets.utils import logging as dlog

    was = dlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            dlog.enable_progress_bar()


def base_model_prefix(config: dict) -> str | None:
    """The `base_model_prefix` of the config's architecture class in transformers (e.g. "transformer" for GPT-2)."""
    arch = (config.get("architectures") or [None])[0]
    if not isinstance(arch, str):
        return None
    import transformers

    try:
        cls = getattr(transformers, arch, None)
    except Exception:  # a lazy module that cannot import the class (a missing optional dependency)
        return None
    prefix = getattr(cls, "base_model_prefix", None)
    return prefix if isinstance(prefix, str) and prefix else None


_QUIET = threading.Lock()
USUAL_PREFIXES = ("model", "transformer", "gpt_neox", "language_model", "backbone")  # base_model_prefix values


def missing_prefix(config: dict, names: Iterable[str]) -> tuple[str, set[str]] | None:
    """For a checkpoint saved without its architecture's base-model prefix (the hub's gpt2, OPT and BLOOM store
    `h.0.attn.c_attn.weight` where from_pretrained and save_pretrained name `transformer.h.0.attn.c_attn.weight`):
    (the prefix, the top-level names the model holds outside its base model: its head's, which keep theirs).
    None where nothing is missing: the names carry the prefix, or the architecture (a bare base model) has none."""
    names = list(names)
    if not names or any(n.split(".", 1)[0] in USUAL_PREFIXES for n in names):
        return None  # the common case, told apart without importing transformers (seconds a merge need not spend)
    if config.get("auto_map"):
        return None  # its own code (never run here) decides its names, not the transformers class of that name
    prefix = base_model_prefix(config)
    if prefix is None or not lacks_prefix(names, prefix, set()):
        return None
    import torch
    import transformers

    from transformers.utils import logging as tlog

    with _QUIET:  # threads opening checkpoints at once must not leave transformers' verbosity at ERROR
        level = tlog.get_verbosity()
        tlog.set_verbosity_error()  # what transformers says of the config is for whoever loads the model, not here
        try:
            cls = getattr(transformers, config["architectures"][0])
            with quiet_transformers(), torch.device("meta"):
                net = cls(cls.config_class.from_dict(dict(config)))
        except Exception:  # noqa: BLE001 - a config transformers cannot build: the names are taken as they are
            return None
        finally:
            tlog.set_verbosity(level)
    expected = [n for n, _ in net.named_parameters(remove_duplicate=False)] + \
        [n for n, _ in net.named_buffers(remove_duplicate=False)]
    if not any(n.startswith(prefix + ".") for n in expected):
        return None
    keep = {n.split(".")[0] for n in expected if not n.startswith(prefix + ".")}
    return (prefix, keep) if lacks_prefix(names, prefix, keep) else None


def lacks_prefix(names: Iterable[str], prefix: str, keep: set[str]) -> bool:
    """Whether tensor names are stored without `prefix`: none has it, and some lie outside the head's own (`keep`)."""
    names = list(names)
    return not any(n.startswith(prefix + ".") for n in names) and any(n.split(".")[0] not in keep for n in names)
