"""`model+lora` references (mergekit's): a model with a LoRA adapter merged in, read tensor by tensor.

mergekit merges the adapter into a full copy of the model with peft (`merge_and_unload`) and saves it to a cache
folder first. safemerge adds each adapted weight's low-rank update as the tensor is read, so nothing is loaded
whole or written: W' = W + s·B·A (transposed for `fan_in_fan_out` layers; (B·A)ᵀ for embeddings), s = α/r
(α/√r with `use_rslora`; r and α per module from `rank_pattern` / `alpha_pattern`, matched as peft matches
them), computed in float32 and rounded to W's dtype as peft's merge rounds it. Tensors the adapter saves
whole (`modules_to_save`, and embeddings saved with the adapter) replace the model's. Adapters with options
that change this arithmetic (DoRA, LoRA biases, layer replication, and any adapter type but LoRA) are refused by
name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import torch

from safemerge._hf import local_folder
from safemerge.checkpoint import Checkpoint, _file_digest
from safemerge.config import split_reference
from safemerge.errors import CheckpointError
from safemerge.layout import TIED_SOURCES

PREFIX = "base_model.model."
ROWS = 1024  # the low-rank update is computed in blocks of this many rows
# adapter_config.json keys understood here (any value), and the initialisations that leave the base weights as
# they are: any other key with a value (DoRA, LoRA biases, PiSSA/OLoRA/LoftQ/CorDA inits that
# rewrite the base weights when peft loads the adapter, aLoRA, Arrow, ...) is refused by name
_KNOWN = {"base_model_name_or_path", "revision", "task_type", "peft_type", "inference_mode", "r", "lora_alpha",
          "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out", "bias", "use_rslora", "modules_to_save",
          "init_lora_weights", "layers_to_transform", "layers_pattern", "auto_mapping", "peft_version", "megatron_core",
          "eva_config", "qalora_group_size", "ensure_weight_tying", "rank_pattern", "alpha_pattern"}
_PLAIN_INITS = (True, False, "gaussian")
CONV1D_MODELS = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}  # transformers' Conv1D: weights stored (in, out)


def open_model(ref: str, *, allow_pickle: bool = False) -> Checkpoint:
    """A Checkpoint for a config's model reference: a folder (or .safetensors file), or `model+adapter`."""
    model, adapter = split_reference(ref)
    if adapter is None:
        folder = local_folder(model, allow_pickle=allow_pickle)  # a hub id: its snapshot in the local HF cache
        refuse_bare_adapter(folder)
        return Checkpoint(folder, allow_pickle=allow_pickle)
    return LoraCheckpoint(model, adapter, allow_pickle=allow_pickle)


def refuse_bare_adapter(path: Path) -> None:
    """A CheckpointError for a LoRA adapter folder given where a whole model is read (its tensors are the adapter's
    A and B matrices, so the model's would be reported missing), saying how to give it with its base."""
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        return
    weights = [f for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".pth")
               and not f.name.startswith("adapter_model.")]
    if weights:  # a model's weights beside a leftover adapter_config.json: a model
        return
    try:
        base = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError, AttributeError):
        base = None
    named = f" (its adapter_config.json names {base!r})" if isinstance(base, str) and base else ""
    raise CheckpointError(f"{path}: is a LoRA adapter folder (adapter_config.json), not a whole model; give it with the "
                          f"model it was trained on as `BASE+{path}`{named}, or merge it into that model first")


def read_adapter_config(adapter: Path) -> dict:
    """The validated adapter_config.json of a PEFT LoRA folder; a CheckpointError that says what is wrong (a missing
    folder or file, a pickled adapter, another PEFT method, options this reader does not apply)."""
    if not adapter.is_dir():
        raise CheckpointError(f"{adapter}: no such adapter folder (a reference is `model_path+adapter_path`)")
    cfg_file, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    if not cfg_file.is_file():
        raise CheckpointError(f"{adapter}: no adapter_config.json; a `model+adapter` reference needs a PEFT "
                              "LoRA adapter folder")
    if not weights.is_file():
        what = " (adapter_model.bin is a pickle; save the adapter with safetensors)" if (
            adapter / "adapter_model.bin").is_file() else ""
        raise CheckpointError(f"{adapter}: no adapter_model.safetensors{what}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file}: must hold a JSON object (peft's LoraConfig), got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters can be merged in")
    bad = sorted(k for k, v in cfg.items() if k not in _KNOWN and v not in (None, False, {}, [], ""))
    if cfg.get("init_lora_weights", True) not in _PLAIN_INITS:  # peft re-initialises the base weights on loading
        bad.append(f"init_lora_weights {cfg['init_lora_weights']!r}")
    if bad:
        raise CheckpointError(f"{cfg_file}: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not supported; "
                              "merge the adapter into the model with peft (merge_and_unload) and give that folder")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"{cfg_file}: r and lora_alpha must be a positive whole number and a number")
    patterns = {k: cfg.get(k) or {} for k in ("rank_pattern", "alpha_pattern")}
    if any(not isinstance(p, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in p.values())
           for p in patterns.values()):
        raise CheckpointError(f"{cfg_file}: rank_pattern and alpha_pattern must map module patterns to positive numbers")
    return cfg


class LoraCheckpoint(Checkpoint):
    """The model at `path` with the LoRA adapter at `adapter` merged in (see the module's docstring)."""

    def __init__(self, path: str | os.PathLike, adapter: str | os.PathLike, *, allow_pickle: bool = False):
        super().__init__(path, allow_pickle=allow_pickle)
        self.adapter = local_folder(adapter)
        cfg = read_adapter_config(self.adapter)
        weights = self.adapter / "adapter_model.safetensors"
        r, alpha = cfg["r"], cfg["lora_alpha"]
        patterns = {k: cfg.get(k) or {} for k in ("rank_pattern", "alpha_pattern")}
        rslora = bool(cfg.get("use_rslora"))
        self.conv1d = self.config.get("model_type") in CONV1D_MODELS
        self.adapter_weights = Checkpoint(weights)
        self._low_rank: dict[str, tuple[str, str, bool]] = {}  # weight name -> (A name, B name, transposed)
        self._whole: dict[str, str] = {}  # weight name -> adapter tensor that replaces it
        self._scale: dict[str, float] = {}  # weight name -> s = α/r (α/√r with rsLoRA)
        b_keys = []
        for key in self.adapter_weights.names():
            name = key.removeprefix(PREFIX)
            for a_suffix, b_suffix, embedding in ((".lora_A.weight", ".lora_B.weight", False),
                                                  (".lora_embedding_A", ".lora_embedding_B", True)):
                if name.endswith(a_suffix):
                    module = name.removesuffix(a_suffix)
                    # the checkpoint's names are the model's (Checkpoint adds a prefix the file lacks)
                    self._low_rank[module + ".weight"] = (key, key.removesuffix(a_suffix) + b_suffix, embedding)
                    break
            else:
                if name.endswith((".lora_B.weight", ".lora_embedding_B")):
                    b_keys.append(key)
                    continue
                target = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
                self._whole[target] = key
        orphans = sorted(set(b_keys) - {b for _, b, _ in self._low_rank.values()})
        if orphans:  # its A missing, the update cannot be formed: silently keeping the base's weight would be wrong
            raise CheckpointError(f"{weights}: {orphans[0]!r} has no matching A matrix"
                                  f"{f' (and {len(orphans) - 1} more)' if len(orphans) > 1 else ''}; the adapter file "
                                  "is incomplete: save it again with peft")
        self._check_tied()
        for name in [*self._low_rank, *self._whole]:
            if name not in self:
                raise CheckpointError(f"{self.adapter}: adapts {name!r}, which {self.path} does not have; was the "
                                      "adapter trained on another model?")
        for name, (a, b, embedding) in list(self._low_rank.items()):
            shapes = [self.adapter_weights.shape(a), self.adapter_weights.shape(b)]
            if any(len(x) != 2 for x in shapes):
                raise CheckpointError(f"{self.adapter}: the LoRA matrices of {name!r} have shapes {shapes}; only LoRA on "
                                      "linear and embedding layers is supported (not convolutions, nor unsharded "
                                      "ZeRO-3 saves)")
            (ra, ca), (rb, cb) = shapes
            rows_first, transposed = (rb, ca), (ca, rb)  # nn.Linear: (out, in); embeddings, Conv1D: (in, out)
            have = tuple(self.shape(name))
            if ra != cb or have not in (rows_first, transposed):
                raise CheckpointError(f"{self.adapter}: the update of {name!r} has shape {list(rows_first)} but the "
                                      f"tensor has {list(have)}")
            # peft transposes per layer type, whatever adapter_config.json says: embeddings and Conv1D layers
            flip = embedding or have != rows_first or (self.conv1d and rows_first == transposed
                                                          and name.rsplit(".", 2)[-2] in ("c_attn", "c_proj", "c_fc", "q_attn"))
            self._low_rank[name] = (a, b, flip)
            module = name.removesuffix(".weight")  # as peft picks a module's r and α: the first pattern that matches
            rank = patterns["rank_pattern"].get(_pattern_key(patterns["rank_pattern"], module), r)
            a_rank = patterns["alpha_pattern"].get(_pattern_key(patterns["alpha_pattern"], module), alpha)
            if ra != rank:
                raise CheckpointError(f"{self.adapter}: the LoRA matrices of {name!r} have rank {ra}, but "
                                      f"adapter_config.json gives it r = {rank}")
            self._scale[name] = a_rank / math.sqrt(rank) if rslora else a_rank / rank
        for name, key in self._whole.items():
            if tuple(self.shape(name)) != tuple(self.adapter_weights.shape(key)):
                raise CheckpointError(f"{self.adapter}: {key!r} has shape {list(self.adapter_weights.shape(key))} "
                                      f"but {name!r} has {list(self.shape(name))}")

    def _check_tied(self) -> None:
        """A model whose lm_head is its embedding matrix (no lm_head tensor stored): an adapter that changes one of the
        two and not the other unties them in peft's merge, which one shared tensor cannot hold. A saved copy equal
        to the model's own tensor (peft saves the embeddings with `save_embedding_layers`) changes nothing."""
        if "lm_head.weight" in self:
            return
        embed = next((n for n in TIED_SOURCES if n in self), None)  # the matrix lm_head is tied to (OPT, BLOOM too)
        for name in list(self._whole):
            if name == "lm_head.weight" or name == embed:
                same = embed is not None and torch.equal(self.adapter_weights.get(self._whole[name]).to(self.dtype(embed)),
                                                         super().get_rows(embed, 0, self.shape(embed)[0]))
                if not same:
                    raise CheckpointError(f"{self.adapter}: replaces {name!r} of a model whose lm_head is tied to its "
                                          "embeddings; peft's merge unties them, which safemerge does not do: merge the "
                                          "adapter with peft (merge_and_unload) and give that folder")
                del self._whole[name]
        if "lm_head.weight" in self._low_rank:
            raise CheckpointError(f"{self.adapter}: adapts 'lm_head.weight' of a model whose lm_head is tied to its "
                                  "embeddings; merge the adapter with peft (merge_and_unload) and give that folder")

    def __repr__(self) -> str:
        return f"LoraCheckpoint({str(self.path)!r}, {str(self.adapter)!r})"

    @property
    def folders(self) -> list[Path]:
        return [self.path, self.adapter]

    @property
    def reference(self) -> str:
        return f"{self.path}+{self.adapter}"

    def source_files(self) -> list[Path]:
        return [*self.weight_files(), self.adapter / "adapter_config.json", self.adapter / "adapter_model.safetensors"]

    def changed(self) -> list[str]:
        """The tensors the adapter changes (low-rank updates and tensors saved whole), in the model's order."""
        return [n for n in self.names() if n in self._low_rank or n in self._whole]

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name in self._whole:
            x = self.adapter_weights.get_rows(self._whole[name], start, stop).to(self.dtype(name))
        else:
            x = super().get_rows(name, start, stop)
        if name not in self._low_rank:
            return x
        a_key, b_key, transposed = self._low_rank[name]  # transposed: rows of (B·A)ᵀ are columns of B·A
        embedding = a_key.endswith("lora_embedding_A")
        a = self.adapter_weights.get(a_key).to(torch.float32)
        b = self.adapter_weights.get(b_key).to(torch.float32)
        # in blocks of ROWS rows on a fixed grid: a matrix product's rounding may depend on its shape, and a tensor
        # read whole or by any row range must give the same values (the engine reads large tensors in ranges)
        lo, total = start // ROWS * ROWS, self.shape(name)[0]
        parts = [(b @ a[:, s:s + ROWS]).T if transposed else b[s:s + ROWS] @ a for s in range(lo, min(stop, total), ROWS)]
        delta = torch.cat(parts)[start - lo:stop - lo] if parts else torch.zeros_like(x, dtype=torch.float32)
        delta = delta * self._scale[name]
        if embedding:  # as peft merges: an embedding's update is cast to the weight's dtype first (two roundings) ...
            return x.add_(delta.to(x.dtype))  # (x is this call's own: a read buffer or a copy-on-write mapping)
        return x.to(torch.float32, copy=True).add_(delta).to(x.dtype)  # ... a linear layer's added in float32 (one)

    def fingerprint(self) -> str:
        """The model's fingerprint and the adapter's files together."""
        if self._fingerprint is None:
            h = hashlib.sha256(super().fingerprint().encode())
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                h.update(_file_digest(self.adapter / f).encode())
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint


def _pattern_key(patterns: dict, module: str) -> str | None:
    """peft's rule (peft.utils.other.get_pattern_key): the first key that, read as a regular expression, matches the
    module's full name or a dotted suffix of it."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            raise CheckpointError(f"rank/alpha pattern {key!r}: not a regular expression") from None
    return None


