"""Small shared helpers for working with transformers and datasets."""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path
from typing import Iterator


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether a name that is not a local path reads as a hub id "org/name": one slash, and `org` is not a
    local folder (then it is a mistyped local path, and nothing waits on the network for it)."""
    return (isinstance(name, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None
            and not Path(name).expanduser().parent.is_dir())


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
