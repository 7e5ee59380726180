"""Writing an HF checkpoint: streamed safetensors shards, config, tokenizer files and the model card.

The shard layout is planned up front from the output names, shapes and dtypes (all known before any
tensor is computed), so each shard's header is written first and each tensor's bytes are appended
as soon as the tensor exists: nothing waits in memory for a shard to fill.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from safemerge.checkpoint import INDEX_NAME, TORCH_TO_ST
from safemerge.errors import CheckpointError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
# a multimodal model's processors (image, video, the processor that joins them to the tokenizer): AutoProcessor reads
# them from the folder the tokenizer is in
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
TEMPLATES_FOLDER = "additional_chat_templates"  # named chat templates (transformers 5), one .jinja file each
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


@dataclass
class _Shard:
    file: str
    names: list[str] = field(default_factory=list)
    header: dict[str, Any] = field(default_factory=dict)
    size: int = 0


class ShardedWriter:
    """Writes tensors, in the planned order, into `model-0000i-of-0000n.safetensors` (+ index).

    `specs` is an ordered list of (name, shape, dtype). With one shard the file is `single_name`
    (`model.safetensors`) and no index is written, as `save_pretrained` does.
    """

    def __init__(self, out_dir: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]], *, max_shard_bytes: int,
                 single_name: str = "model.safetensors"):
        self.out_dir = Path(out_dir)
        self._shards: list[_Shard] = []
        self._where: dict[str, _Shard] = {}
        for name, shape, dtype in specs:
            nbytes = dtype.itemsize
            for d in shape:
                nbytes *= d
            if not self._shards or (self._shards[-1].size and self._shards[-1].size + nbytes > max_shard_bytes):
                self._shards.append(_Shard(file=""))
            shard = self._shards[-1]
            shard.header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [shard.size, shard.size + nbytes]}
            shard.names.append(name)
            shard.size += nbytes
            self._where[name] = shard
        n = len(self._shards)
        for i, shard in enumerate(self._shards):
            shard.file = single_name if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        self._open: tuple[_Shard, Any] | None = None
        self._next = 0  # index into the flat order
        self._pending = 0  # bytes of the current tensor written so far
        self._order = [name for s in self._shards for name in s.names]
        self.total_bytes = sum(s.size for s in self._shards)

    def write(self, name: str, data: torch.Tensor) -> None:
        """Append the next tensor, or the next rows of it: tensors come in the planned order, with the
        planned dtype, and row chunks of one tensor in row order."""
        if self._next >= len(self._order):
            raise RuntimeError(f"writer got tensor {name!r} after every planned tensor was written")
        expected = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"writer expected tensor {expected!r}, got {name!r}")
        shard = self._where[name]
        meta = shard.header[name]
        if TORCH_TO_ST[data.dtype] != meta["dtype"] or list(data.shape[1:]) != meta["shape"][1:]:
            raise RuntimeError(f"tensor {name!r}: planned {meta['shape']} {meta['dtype']}, got {list(data.shape)} {data.dtype}")
        if self._open is None or self._open[0] is not shard:
            self._close_current()
            f = open(self.out_dir / shard.file, "wb")
            header = dict(shard.header, __metadata__={"format": "pt"})
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            f.write(struct.pack("<Q", len(raw)) + raw)
            self._open = (shard, f)
        data = data.detach().to("cpu").contiguous()
        if data.numel():
            self._open[1].write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._pending += data.numel() * data.dtype.itemsize
        begin, end = meta["data_offsets"]
        if self._pending > end - begin:
            raise RuntimeError(f"tensor {name!r}: more rows written than planned")
        if self._pending == end - begin:
            self._pending = 0
            self._next += 1

    def _close_current(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def finish(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"writer finished after {self._next} of {len(self._order)} tensors")
        self._close_current()
        if len(self._shards) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {name: s.file for s in self._shards for name in s.names},
            }
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        self._close_current()


def write_config(out_dir: Path, config: dict, *, dtype: torch.dtype) -> None:
    """config.json with the output dtype (transformers 5 reads `dtype`; older readers `torch_dtype`)."""
    name = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))

    def retyped(cfg: dict, top: bool) -> dict:  # a multimodal model's sub-configs (text_config, ...) say theirs too
        cfg = {k: retyped(v, False) if isinstance(v, dict) and k.endswith("_config") and k != "quantization_config"
               else v for k, v in cfg.items()}
        for key in ("dtype", "torch_dtype"):
            if key in cfg or (top and key == "dtype"):
                cfg[key] = name
        return cfg

    cfg = retyped(config, True)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


JSON_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "added_tokens.json",
                   "chat_template.json", "vocab.json", "generation_config.json", *PROCESSOR_FILES)


def check_side_files(folder: Path, names: tuple[str, ...] = JSON_SIDE_FILES) -> None:
    """The JSON tokenizer and generation files an output will copy must parse (as JSON objects): checked before a merge,
    not found broken after it (a chat template is written into tokenizer_config.json) or copied on unread."""
    for name in names:
        f = folder / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{f}: is not valid JSON ({str(e)[:80]}); the merge copies it into the output, where "
                                  "transformers could not read it: fix the file or take it from the model's original "
                                  "folder") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{f}: holds a JSON {type(data).__name__}, not an object; fix the file or take it from "
                                  "the model's original folder")


def copy_side_files(out_dir: Path, *, tokenizer_source: Path | None, generation_source: Path | None,
                    chat_template: str | None) -> list[str]:
    """Tokenizer files (and chat template, named templates and processor configs) from `tokenizer_source`;
    generation_config.json where present. Returns the names of the tokenizer files copied."""
    copied = []
    if tokenizer_source is not None and tokenizer_source.is_dir():
        for name in TOKENIZER_FILES + PROCESSOR_FILES:
            if (tokenizer_source / name).is_file():
                shutil.copy2(tokenizer_source / name, out_dir / name)
                copied += [name] if name in TOKENIZER_FILES else []
        if (tokenizer_source / TEMPLATES_FOLDER).is_dir():
            shutil.copytree(tokenizer_source / TEMPLATES_FOLDER, out_dir / TEMPLATES_FOLDER, dirs_exist_ok=True)
    if generation_source is not None and (generation_source / "generation_config.json").is_file():
        shutil.copy2(generation_source / "generation_config.json", out_dir / "generation_config.json")
    if chat_template:
        _set_chat_template(out_dir, chat_template)
    return copied


def copy_custom_code(out_dir: Path, sources: list[Path]) -> list[str]:
    """The Python modules that the output's config.json and tokenizer_config.json name in `auto_map` (a model with
    custom code: `trust_remote_code=True` loads them), from the first of `sources` that has each, with the other
    .py files beside them (the modules they import). Copied, never imported. Returns the names copied."""
    modules = set()
    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((out_dir / name).read_text()).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue
        if not isinstance(auto_map, dict):
            continue
        for ref in auto_map.values():
            for r in ref if isinstance(ref, list) else [ref]:
                module = r.rsplit(".", 1)[0] if isinstance(r, str) else ""  # `repo--module.Class`: another repo's
                if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module):  # a dotted name, never a path out
                    modules.add(module.replace(".", "/") + ".py")
    copied, used = [], []
    for module in sorted(modules):
        folder = next((f for f in sources if (f / module).is_file()), None)
        if folder is not None and not (out_dir / module).exists():
            (out_dir / module).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / module, out_dir / module)
            copied.append(module)
            used += [folder] if folder not in used else []
    for folder in used:  # the modules these import from beside them (Phi-3-small's helpers): every .py there
        for f in sorted(folder.glob("*.py")):
            if f.is_file() and not (out_dir / f.name).exists():
                shutil.copy2(f, out_dir / f.name)
                copied.append(f.name)
    return copied


def side_names(folder: Path) -> tuple[str, ...]:
    """Every side file an output may take from `folder`, as names relative to it: the config, generation config,
    tokenizer, processor, named-template and custom-code files there (what a lazy rerun must see change)."""
    fixed = ("config.json", "generation_config.json", *TOKENIZER_FILES, *PROCESSOR_FILES)
    extra = sorted(f"{TEMPLATES_FOLDER}/{p.name}" for p in (folder / TEMPLATES_FOLDER).glob("*") if p.is_file())
    return fixed + tuple(extra) + tuple(sorted(p.name for p in folder.glob("*.py") if p.is_file()))


def _set_chat_template(out_dir: Path, template: str) -> None:
    """Store the template where transformers 5 looks first (chat_template.jinja) and in tokenizer_config."""
    (out_dir / "chat_template.jinja").write_text(template)
    cfg_file = out_dir / "tokenizer_config.json"
    if cfg_file.exists():
        cfg = json.loads(cfg_file.read_text())
        cfg["chat_template"] = template
        cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")


def write_model_card(
    out_dir: Path,
    *,
    base_model: str | None,
    merge_config: dict,
    inputs: list[dict[str, str]],
    title: str = "Merged model",
    extra: str = "",
) -> None:
    """README.md: front matter (base_model, tags), the merge config as YAML and every input's fingerprint.
    The hub reads `base_model` as a hub id, so a local path stays out of it (it is in the inputs table)."""
    from safemerge._hf import hub_repo

    front: dict[str, Any] = {"tags": ["merge", "safemerge"], "library_name": "transformers"}
    if base_model and (repo := hub_repo(base_model)):
        front["base_model"] = repo
    rows = "\n".join(f"| `{i['model']}` | `{i['fingerprint']}` |" for i in inputs)
    card = (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# {title}\n\n"
        "This model was made with [safemerge](https://github.com/safemerge/safemerge).\n\n"
        f"## Inputs\n\n| model | fingerprint (first 32 hex digits of a sha256 over the weight files) |\n|---|---|\n{rows}\n\n"
        f"## Merge config\n\n```yaml\n{yaml.safe_dump(merge_config, sort_keys=False)}```\n"
    )
    if extra:
        card += "\n" + extra.strip() + "\n"
    (out_dir / "README.md").write_text(card)
