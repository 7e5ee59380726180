"""Where a tensor sits in a transformer: its layer index and its position t for layer gradients.

Works from tensor names alone, so Llama, Mistral, Qwen2, Gemma (`model.layers.N.`), GPT-2
(`transformer.h.N.`) and most other decoder layouts need no table. Tensors outside the layer stack
take t = 0 when they come before it (embeddings) and t = 1 after it (final norm, lm_head), which is
what mergekit's planner does.
"""

from __future__ import annotations

import re
from typing import Iterable

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
_PRE = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings")
TIED_SOURCES = ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_tokens.embedding.weight")


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def num_layers(names: Iterable[str], config: dict | None = None) -> int:
    config = config or {}
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
        if isinstance(config.get("text_config"), dict) and isinstance(config["text_config"].get(key), int):
            return config["text_config"][key]
    idx = [i for i in map(layer_index, names) if i is not None]
    return max(idx) + 1 if idx else 0


def position(name: str, n_layers: int) -> float:
    """t ∈ [0, 1]: i/(L−1) for layer i of L (1 when L = 1), and 0 outside the stack, before it (embeddings)
    and after it (final norm, lm_head) alike: mergekit 0.1.5 plans both with t = 0, so a gradient's first value
    applies to them."""
    i = layer_index(name)
    if i is None:
        return 0.0
    return i / (n_layers - 1) if n_layers > 1 else 1.0


def stream_order(names: Iterable[str]) -> list[str]:
    """Names in model order: tensors before the stack, then layer by layer, then the rest."""

    def key(name: str):
        i = layer_index(name)
        if i is None:
            return (0, 0, name) if _PRE.search(name) else (2, 0, name)
        return (1, i, name)

    return sorted(names, key=key)


def tied_source(name: str, available: Iterable[str]) -> str | None:
    """For a missing `lm_head.weight` in a model with tied embeddings, the embedding it is tied to."""
    if not name.endswith("lm_head.weight"):
        return None
    avail = set(available)
    return next((s for s in TIED_SOURCES if s in avail), None)
