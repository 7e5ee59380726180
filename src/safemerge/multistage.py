"""Multi-stage merges (mergekit-multi's configs): several merges in one YAML file, one per document.

Each document is a merge config with a `name:`. A document uses an earlier merge's output by giving that name where
a model path goes: `base_model`, `models[].model`, a slice's `sources[].model` or `base_model`, `tokenizer_source`
(`tokenizer.source`), a `tokenizer.tokens` entry's model, or the model part of a `name+adapter` reference. Named merges are written to
INTERMEDIATE_DIR/<name>; one unnamed document, the final merge, to OUT. Merges run in dependency order (document
order among those ready), each one through `safemerge.merge`, so each output is written atomically.

Reruns are incremental. `INTERMEDIATE_DIR/multimerge.json` records each merge's config, its inputs' fingerprints and
its output; a merge whose output is there with the same config and the same inputs is kept, any other merge is made
again, and so is every merge that reads it. (mergekit's `--lazy` keeps any output that exists, so an edited stage,
or a stage whose input was remade, stays stale.) `lazy=False` makes every merge again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from safemerge._args import check_arguments
from safemerge.checkpoint import atomic_write, check_replaceable
from safemerge.config import (VOCAB_KEYWORDS, MergeConfig, map_model_refs, parse_config, read_yaml_documents,
                              split_reference)
from safemerge.config_forms import drop_unknown
from safemerge.errors import ConfigError

RECORD = "multimerge.json"


@dataclass
class Stage:
    """One merge of a multi-stage config: its validated config, the earlier merges it reads, where it is written."""

    name: str | None  # None: the final merge
    config: MergeConfig
    needs: list[str]
    out: Path
    data: dict  # the document with names replaced, parsed again once the merges it reads exist (see `reparse`)
    where: str
    folder: Path

    def reparse(self) -> MergeConfig:
        """The config read again now that its inputs exist: a slice spanning a whole intermediate model's layers
        reads as `models` only once that model's layer count can be read, as it does in a merge run by hand."""
        self.config = parse_config(self.data, where=self.where, folder=self.folder)
        return self.config

    @property
    def label(self) -> str:
        return self.name if self.name is not None else "the final merge"


@dataclass
class MultimergeResult:
    """What `multimerge` did: every merge's output by name (the unnamed final merge under None, also as `final`),
    and which were made and which kept (labels, in run order)."""

    outputs: dict[str | None, Path] = field(default_factory=dict)
    made: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    @property
    def final(self) -> Path | None:
        """The final merge's output (the `--out-path` folder); None where every merge of the file is named."""
        return self.outputs.get(None)

    def summary(self) -> dict:
        """JSON-ready: `outputs` of the named merges, `final` (a path or null), `made`, `kept`."""
        return {"outputs": {k: str(v) for k, v in self.outputs.items() if k is not None},
                "final": str(self.final) if self.final is not None else None, "made": self.made, "kept": self.kept}


def plan(config: str | os.PathLike, out: str | os.PathLike | None, intermediate_dir: str | os.PathLike, *,
         ignore_unknown: bool = False) -> list[Stage]:
    """The merges of a multi-stage config in the order they run, each validated, names replaced by output paths
    (with `ignore_unknown`, keys safemerge does not know left out with a warning: config.parse_config)."""
    path = Path(config).expanduser()
    docs = read_yaml_documents(path)
    if not docs:
        raise ConfigError(f"{path}: is empty; a multi-stage config is YAML documents (separated by ---), one merge each")
    inter = Path(intermediate_dir).expanduser().absolute()
    if "+" in str(inter):
        raise ConfigError(f"--intermediate-dir {inter}: has a '+', which reads as `model+adapter` in the paths of the "
                          "merges written there; choose a folder without one")
    names = [_name(d.get("name"), path, i) for i, d in enumerate(docs)]
    for n in set(names):
        if names.count(n) > 1:
            raise ConfigError(f"{path}: two merges are named {n!r}; names must differ" if n is not None else
                              f"{path}: {names.count(None)} merges have no `name`; only the final merge may be unnamed")
    if None in names and out is None:
        raise ConfigError(f"{path}: has an unnamed (final) merge; give the path it is written to (--out-path)")
    if None not in names and out is not None:
        raise ConfigError(f"{path}: every merge is named, so each goes to the intermediate folder and none to {out}; "
                          "leave out --out-path, or remove the `name` of the final merge")
    if out is not None:
        final = Path(out).expanduser().absolute()
        if final == inter or inter in final.parents or final in inter.parents:
            raise ConfigError(f"the final merge's folder {final} and the intermediate folder {inter} overlap, and writing "
                              "one would replace the other; give two separate folders")
    stages = []
    for doc, name in zip(docs, names):
        needs: list[str] = []
        data = _substitute({k: v for k, v in doc.items() if k != "name"}, set(names) - {None}, inter, needs)
        label = name if name is not None else "the final merge"
        if name in needs:
            raise ConfigError(f"{path}: merge {name!r} reads its own output")
        if ignore_unknown:
            data = drop_unknown(data, f"{path}, {label}")
        cfg = parse_config(data, where=f"{path}, {label}", folder=path.parent)
        target = inter / name if name is not None else Path(out).expanduser().absolute()
        stages.append(Stage(name, cfg, needs, target, data, f"{path}, {label}", path.parent))
    return _order(stages, path)


def multimerge(
    config: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    intermediate_dir: str | os.PathLike,
    lazy: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    report: Callable[[str], None] | None = None,
    ignore_unknown: bool = False,
    **merge_options: Any,
) -> MultimergeResult:
    """Run a multi-stage config (see the module's docstring). `merge_options` go to every `safemerge.merge` (device,
    allow_pickle, allow_nonfinite, max_shard_size, workers). `overwrite` lets a merge replace a folder that this
    config's earlier runs did not write; `report` receives one line per merge as it is made or kept."""
    check_arguments(multimerge, locals())
    from safemerge.engine import merge
    from safemerge.lora import open_model

    stages = plan(config, out, intermediate_dir, ignore_unknown=ignore_unknown)
    inter = Path(intermediate_dir).expanduser().absolute()
    record = _read_record(inter)
    made_by_us = {e.get("out") for e in record.values()}
    made_here = {s.name for s in stages if s.name is not None}
    pickle = merge_options.get("allow_pickle", False)
    _check_inputs(stages, {str(inter / n) for n in made_here}, pickle)
    for s in stages:
        check_replaceable(s.out, replace_any=False)  # a file, or a folder of other work: refused before any merge runs
        if s.out.exists() and not overwrite and str(s.out) not in made_by_us:
            raise ConfigError(f"{s.out} ({s.label}'s output) already exists and was not written by an earlier multimerge "
                              "into this intermediate folder; pass --overwrite to replace it, or choose another "
                              + ("--out-path" if s.name is None else "--intermediate-dir"))
    result, remade = MultimergeResult(), set()
    for i, s in enumerate(stages, 1):
        key, cfg_yaml = s.name or "", (s.reparse() if s.needs else s.config).to_yaml_dict()
        entry = record.get(key, {})
        inputs = None
        if lazy and (s.out / "config.json").is_file() and not remade & set(s.needs) \
                and entry.get("config") == cfg_yaml and entry.get("out") == str(s.out):
            inputs = _inputs(s.config, pickle)
            if entry.get("inputs") == inputs and entry.get("output") is not None and entry["output"] == _output(s.out):
                result.kept.append(s.label)
                result.outputs[s.name] = s.out
                if report:
                    report(f"{i}/{len(stages)} {s.label}: kept {s.out} (same config and inputs)")
                continue
        if report:
            report(f"{i}/{len(stages)} {s.label}: {s.config.merge_method} of {len(s.config.input_models())} models "
                   f"-> {s.out}")
        merge(s.config, s.out, overwrite=True, progress=progress, **merge_options)
        record[key] = {"config": cfg_yaml, "inputs": inputs or _inputs(s.config, pickle), "out": str(s.out),
                       "output": _output(s.out)}
        atomic_write(inter / RECORD, json.dumps(record, indent=1, sort_keys=True))
        remade.add(s.name)
        result.made.append(s.label)
        result.outputs[s.name] = s.out
    return result


def _name(value: Any, path: Path, i: int) -> str | None:
    if value is None:
        return None
    where = f"{path}, document {i + 1}: name {value!r}"
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be text (quote it: name: \"{value}\")")
    if not value or value.startswith(".") or any(c in value for c in "/\\+") or value == RECORD:
        raise ConfigError(f"{where} must be a plain folder name (not starting with '.', no '/', '\\' or '+', not "
                          f"{RECORD}), as it names the merge's folder in the intermediate directory")
    if value in VOCAB_KEYWORDS:
        raise ConfigError(f"{where} is a tokenizer_source keyword ({', '.join(sorted(VOCAB_KEYWORDS))}), so "
                          "`tokenizer_source: " + value + "` could not name this merge; choose another name")
    return value


def _substitute(data: dict, names: set[str], inter: Path, needs: list[str]) -> dict:
    """The config with every model reference that names an earlier merge replaced by that merge's output folder."""

    def ref(value: str) -> str:
        model, adapter = split_reference(value) if "+" in value else (value, None)
        if model not in names:
            return value
        needs.append(model)
        return str(inter / model) + (f"+{adapter}" if adapter is not None else "")

    return map_model_refs(data, ref)


def _order(stages: list[Stage], path: Path) -> list[Stage]:
    """Dependency order; among the merges ready to run, document order. A cycle is an error that names it."""
    done: set[str | None] = set()
    order: list[Stage] = []
    todo = list(stages)
    while todo:
        ready = next((s for s in todo if set(s.needs) <= done), None)
        if ready is None:
            cycle = _cycle({s.name: s.needs for s in todo})
            raise ConfigError(f"{path}: the merges {' -> '.join(cycle)} read each other's outputs in a cycle")
        order.append(ready)
        done.add(ready.name)
        todo.remove(ready)
    return order


def _cycle(needs: dict[str | None, list[str]]) -> list[str]:
    node = next(iter(needs))
    seen: list = []
    while node not in seen:
        seen.append(node)
        node = next(n for n in needs[node] if n in needs)
    return [str(n) for n in seen[seen.index(node):]] + [str(node)]


def _check_inputs(stages: list[Stage], stage_dirs: set[str], allow_pickle: bool) -> None:
    """Before any merge: every model, adapter and tokenizer folder that no merge makes can be read, and no merge
    writes where another one's input lies."""
    from safemerge.engine import check_apart, tokenizer_dirs
    from safemerge.lora import open_model, read_adapter_config

    outside: list[Path] = []
    for s in stages:
        for m in s.config.input_models():
            folder, adapter = split_reference(m)
            if folder not in stage_dirs:
                outside += open_model(m, allow_pickle=allow_pickle).folders
            elif adapter is not None:
                from safemerge._hf import local_folder

                folder = local_folder(adapter)  # a hub id: its snapshot in the local HF cache
                read_adapter_config(folder)
                outside.append(folder)
        tok = s.config.vocab_source
        if tok is not None and tok not in stage_dirs:
            try:
                outside += tokenizer_dirs(s.config)
            except ConfigError as e:
                raise ConfigError(f"{s.label}: {e}") from None
    for s in stages:
        check_apart(s.out, outside, what=f"{s.label}'s output")


def _inputs(cfg: MergeConfig, allow_pickle: bool) -> dict[str, str]:
    """What a merge's output depends on besides its config: each input's weights (fingerprint) and side files
    (config, tokenizer, chat template), and the tokenizer source's."""
    from safemerge.engine import tokenizer_dirs
    from safemerge.evaluate.loading import side_files_digest
    from safemerge.lora import open_model
    from safemerge.writer import side_names

    out = {}
    for m in cfg.input_models():
        ckpt = open_model(m, allow_pickle=allow_pickle)
        out[m] = f"{ckpt.fingerprint()} {side_files_digest(ckpt.path, side_names(ckpt.path))}"
    for folder in tokenizer_dirs(cfg):
        out["tokenizer_source"] = side_files_digest(folder, side_names(folder))
    return out


def _output(out: Path) -> str | None:
    """The output as written (weights' fingerprint and side files), so that one deleted or replaced since is made
    again (None: no readable model there)."""
    from safemerge.checkpoint import Checkpoint
    from safemerge.errors import CheckpointError
    from safemerge.evaluate.loading import side_files_digest
    from safemerge.writer import side_names

    try:
        return f"{Checkpoint(out).fingerprint()} {side_files_digest(out, side_names(out))}"
    except (CheckpointError, OSError):
        return None


def _read_record(inter: Path) -> dict:
    try:
        data = json.loads((inter / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}
