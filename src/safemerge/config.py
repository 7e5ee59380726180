"""The merge config: mergekit's YAML keys, validated once with pydantic, and parameter resolution.

A parameter value is a scalar, a layer gradient (a list of numbers, interpolated over the layer
position t = i/(L−1)), or a list of `{filter, value}` entries (the first whose filter is a substring of
the tensor name applies; an entry without filter is the default). Tensors outside the layer stack are
resolved at t = 0, before the stack (embeddings) and after it (final norm, lm_head) alike, as mergekit
0.1.5's planner does; a filter "*" matches every tensor, as in mergekit.
"""

from __future__ import annotations

import json
import math
import os
import re
import weakref
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from safemerge.errors import ConfigError, did_you_mean
from safemerge.methods import REQUIRED, get_method

Scalar = Union[bool, int, float, str]


class FilterValue(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: Optional[str] = None
    value: Union[Scalar, list[float], list["FilterValue"]]


ParamValue = Union[Scalar, list[float], list[FilterValue]]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


VOCAB_KEYWORDS = ("base", "union")  # tokenizer sources that are not a model path


def split_reference(ref: str) -> tuple[str, str | None]:
    """(model, adapter) of a `model+adapter` (LoRA) reference, split at its one '+' as mergekit splits it; (ref, None)
    for a plain model, or for a path that exists as written."""
    if "+" not in ref or Path(ref).expanduser().exists():
        return ref, None
    parts = ref.split("+")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"model {ref!r}: a LoRA reference is `model_path+adapter_path` (one '+')")
    return parts[0], parts[1]


def reference_text(ref: dict) -> str:
    """mergekit's mapping form of a model reference, `{model: {path, revision}, lora: {path}}` (what mergekit writes
    for a reference with `override_architecture`; `model` and `lora` may also be plain paths), as the string form
    `path` or `path+lora` (`path@revision` for a hub id with a revision)."""
    def path(v: Any, key: str) -> str:
        if isinstance(v, dict) and set(v) <= {"path", "revision"} and isinstance(v.get("path"), str):
            if v.get("revision") is None:
                return v["path"]
            from safemerge._hf import is_hub_id

            if not is_hub_id(v["path"]):
                raise ConfigError(f"model {ref!r}: revision {v['revision']!r} of a local folder: check out that "
                                  "revision into a folder and give its path (a revision is read for hub ids)")
            return f"{v['path']}@{v['revision']}"
        if isinstance(v, str):
            return v
        raise ConfigError(f"model {ref!r}: {key} must be a path or {{path: ...}}")

    unknown = set(ref) - {"model", "lora", "override_architecture"}
    if unknown:
        raise ConfigError(f"model {ref!r}: unknown key {sorted(unknown)[0]!r} in a model reference (it takes model "
                          "and lora)")
    if ref.get("override_architecture") is not None:
        raise ConfigError(f"model {ref!r}: override_architecture is not supported; edit `architectures` in a copy "
                          "of the model's config.json instead")
    model = path(ref.get("model"), "model")
    return model if ref.get("lora") is None else f"{model}+{path(ref['lora'], 'lora')}"


def checked_reference(v: Optional[str]) -> Optional[str]:
    """A model reference as written, or a ValueError for a malformed `model+adapter` one or a revision of a local
    folder (`model@revision` is read for hub ids only)."""
    if v is None:
        return v
    split_reference(v)
    if "@" in v and not Path(v).exists() and Path(v.rsplit("@", 1)[0]).exists():
        raise ValueError(f"model {v!r}: 'model@revision' of a local folder: check out that revision into a "
                         "folder and give its path (a revision is read for hub ids)")
    return v


class InputModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _reference(cls, v: str) -> str:
        return checked_reference(v)


class SliceSource(BaseModel):
    """One source of a slice: layers [start, stop) of a model, with its per-model parameters."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    _reference = field_validator("model")(classmethod(lambda cls, v: checked_reference(v)))

    @field_validator("layer_range")
    @classmethod
    def _span(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range {list(v)} must be [start, stop) with 0 <= start < stop")
        return v

    @property
    def length(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


class Slice(BaseModel):
    """A run of output layers: layer i of the slice merges layer start + i of every source."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    base_model: Optional[str] = None

    _reference = field_validator("base_model")(classmethod(lambda cls, v: checked_reference(v)))

    @property
    def length(self) -> int:
        return self.sources[0].length


class TokenRow(BaseModel):
    """mergekit's non-model sources of one token's row: `{kind: zero}`, or `{kind: model_token, model, token |
    token_id}` (another token's row of that model)."""
    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero", "model_token"]
    model: Optional[str] = None
    token: Optional[str] = None
    token_id: Optional[int] = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "TokenRow":
        if self.kind == "zero" and (self.model, self.token, self.token_id) != (None, None, None):
            raise ValueError("{kind: zero} takes no model, token or token_id")
        if self.kind == "model_token" and (self.model is None or (self.token is None) == (self.token_id is None)):
            raise ValueError("{kind: model_token} needs a model and one of token or token_id")
        return self


class TokenSpec(BaseModel):
    """One entry of `tokenizer.tokens`: where the token's embedding and output-head rows come from (a merged model's
    row of that token, or a TokenRow), and whether every model takes it (`force`) or only those lacking the token."""
    model_config = ConfigDict(extra="forbid")
    source: Any  # str | TokenRow, read by _source (pydantic's union would report both members' errors)
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, v: Any) -> Union[str, TokenRow]:
        if isinstance(v, str):
            return v
        if isinstance(v, dict):
            try:
                return TokenRow.model_validate(v)
            except ValidationError as e:
                raise ValueError("; ".join(_fmt(err) for err in e.errors())) from None
        raise ValueError(f"{v!r}: give a merged model's path, {{kind: zero}} or {{kind: model_token, model, token}}")

    @property
    def model(self) -> Optional[str]:
        return self.source if isinstance(self.source, str) else self.source.model


class TokenizerSection(BaseModel):
    """mergekit's `tokenizer:` section: the output vocabulary's source, its padding and per-token row sources
    (docs/methods.md, "Vocabularies")."""
    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    pad_to_multiple_of: Optional[int] = Field(default=None, ge=1)
    tokens: Optional[dict[str, TokenSpec]] = None


# MergeConfig.others()'s answer per config object (by id, dropped with the object), for the (base, model paths) it was
# computed from: comparing paths resolves them, a system call per path part. Kept outside the model, so that it is
# neither a field nor a private attribute that pydantic would compare, copy or serialise.
_OTHERS: dict[int, tuple[tuple, list[bool]]] = {}


class MergeConfig(BaseModel):
    """A mergekit-compatible merge config (the subset of keys safemerge supports, plus `seed`).

    `slices` (layer stacking and cutting) keeps mergekit's form; `models` then lists every model the slices
    read, without parameters, and each slice is merged by its own whole-model config (`slice_config`)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: Optional[str] = None
    models: list[InputModel]
    slices: Optional[list[Slice]] = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerSection] = None
    chat_template: Optional[str] = None
    seed: int = 0  # safemerge: seeds DARE's per-tensor randomness
    name: Optional[str] = None

    _reference = field_validator("base_model")(classmethod(lambda cls, v: checked_reference(v)))

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: Optional[str]) -> Optional[str]:
        if isinstance(v, str):
            v = v.removeprefix("torch.")  # mergekit reads "torch.bfloat16" as "bfloat16"
        if v is not None and v not in DTYPES:
            raise ValueError(f"dtype {v!r} is not one of {', '.join(DTYPES)}")
        return v

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, v: Optional[str]) -> Optional[str]:
        from safemerge.chat_templates import check

        return v if v is None else check(v)

    @model_validator(mode="after")
    def _check_method(self) -> "MergeConfig":
        spec = get_method(self.merge_method)
        if self.slices is not None:
            return self._check_slices(spec)
        if spec.inputs == "models" and self.base_model and not any(same_model(self.base_model, m.model) for m in self.models):
            self.models.append(InputModel(model=self.base_model))  # mergekit merges the base as one more model
        self._check_top_parameters(spec)
        for m in self.models:
            for key, value in m.parameters.items():
                if key not in spec.model_params:
                    where = "a global parameter (put it under top-level `parameters`)" if key in spec.global_params else None
                    raise ValueError(where and f"models[{m.model}].parameters.{key}: {key!r} is {where}"
                                     or _unknown(key, spec.model_params, f"per-model parameters of {self.merge_method}"))
                _check_value(key, value, spec, f"models[{m.model}].parameters")
        if not self.models:
            raise ValueError("models is empty: list the models to merge")
        twice = _given_twice([m.model for m in self.models])
        if twice:  # mergekit refuses it too ("Duplicate merge inputs"); summing its two entries would be a guess
            raise ValueError(f"models: {twice} is listed twice; list each model once (to weight it more, raise its "
                             "`weight`)")
        if spec.needs_base and not self.base_model:
            raise ValueError(f"merge_method {self.merge_method} needs base_model")
        if spec.max_models is not None and len(self.models) > spec.max_models:
            also = " (base_model is merged as one of the models, as in mergekit; leave it out)" if self.base_model else ""
            raise ValueError(f"{self.merge_method} takes {spec.max_models} model; got {len(self.models)}{also}. To stack "
                             "layers of several models, give one `slices` entry per run of layers, each with one source")
        if spec.inputs == "pair" and len(self.input_models()) != 2:
            raise ValueError(f"{self.merge_method} merges exactly two models (base_model and one other); got {len(self.input_models())}")
        if spec.inputs == "base_optional" and not self.others():
            raise ValueError(f"{self.merge_method} needs at least one model besides base_model")
        if spec.others is not None and len(self.others()) != spec.others:
            raise ValueError(f"{self.merge_method} merges exactly {spec.others} models (besides an optional base_model); "
                             f"got {len(self.others())}")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give `tokenizer_source` or a `tokenizer:` section, not both (as in mergekit)")
        for m in self.weighted_models():
            for key, default in spec.model_params.items():
                if default is REQUIRED and key not in m.parameters and key not in self.parameters:
                    also = (" (base_model is merged as one of the models, as in mergekit)"
                            if spec.inputs == "models" and m.model == self.base_model else "")
                    raise ValueError(f"models[{m.model}]: parameter {key!r} of {self.merge_method} is required{also}; "
                                     "give it per model or under top-level `parameters`")
        if spec.inputs == "stock" and len(self.others()) < 2:
            raise ValueError(f"model_stock needs at least two models besides the base; got {len(self.others())}")
        return self

    @model_validator(mode="after")
    def _check_tokens(self) -> "MergeConfig":
        for token, row in self.vocab_tokens.items():
            if row.model is not None and not any(same_model(row.model, m) for m in self.input_models()):
                raise ValueError(f"tokenizer.tokens[{token!r}]: {row.model} is not one of the merged models; a token's "
                                 f"row comes from one of {', '.join(self.input_models())} (or {{kind: zero}})")
        return self

    def _check_top_parameters(self, spec) -> None:
        allowed = set(spec.global_params) | set(spec.model_params)
        for key, value in self.parameters.items():
            if key not in allowed:
                raise ValueError(_unknown(key, allowed, f"parameters of {self.merge_method}"))
            _check_value(key, value, spec, "parameters")

    def _check_slices(self, spec) -> "MergeConfig":
        if not self.slices:
            raise ValueError("slices is empty: list the slices of layers to merge")
        self._check_top_parameters(spec)
        for i, piece in enumerate(self.slices):
            if not piece.sources:
                raise ValueError(f"slices[{i}].sources is empty: list the models whose layers the slice takes")
            lengths = {src.length for src in piece.sources}
            if len(lengths) > 1:
                spans = ", ".join(f"{src.model} {list(src.layer_range)}" for src in piece.sources)
                raise ValueError(f"slices[{i}]: every source must span the same number of layers; got {spans}")
            seen = [src.model for src in piece.sources]
            twice = _given_twice(seen)
            if twice:
                raise ValueError(f"slices[{i}]: {twice} is a source twice; a slice takes each model once "
                                 "(stack its layers with another slice)")
            base = piece.base_model or self.base_model
            if spec.needs_base and not base:
                raise ValueError(f"slices[{i}]: {self.merge_method} needs base_model")
            if base and spec.inputs != "models" and base not in seen:  # mergekit refuses a base that is no input
                raise ValueError(f"slices[{i}]: base_model {base!r} is not among the slice's sources; add its layers at "
                                 "the same layer_range as the others' (or leave base_model out where the method can)")
            try:
                self.slice_config(i)
            except ValidationError as e:
                raise ValueError(f"slices[{i}]: " + "; ".join(_fmt(err) for err in e.errors())) from None
        return self

    def slice_config(self, i: int) -> "MergeConfig":
        """The whole-model config that merges slice i: its sources as `models`, its parameters before the top
        level's (as mergekit reads them), its base (or the top level's) when it is one of the sources."""
        piece = self.slices[i]
        base = piece.base_model or self.base_model
        params = params_before(piece.parameters, self.parameters)
        return MergeConfig(
            merge_method=self.merge_method, base_model=base if base in [s.model for s in piece.sources] else None,
            models=[InputModel(model=s.model, parameters=s.parameters) for s in piece.sources], parameters=params,
            dtype=self.dtype, out_dtype=self.out_dtype, seed=self.seed)

    def require_whole_models(self, what: str) -> "MergeConfig":
        """This config, or a ConfigError when it stacks or cuts layers (`slices`), which `what` cannot take."""
        if self.slices is not None:
            raise ConfigError(f"{what} takes a whole-model config (`models`, or one slice spanning every layer); "
                              "this one stacks or cuts layers with several `slices`")
        return self

    # -- derived ----------------------------------------------------------------------------------
    def input_models(self) -> list[str]:
        """Every model the merge reads, base first when there is one, without repeats."""
        names = [self.base_model] if self.base_model else []
        return names + [m.model for m in self.models if m.model not in names]

    def others(self) -> list[InputModel]:
        """The models other than the base, in config order."""
        key = (self.base_model, tuple(m.model for m in self.models))
        memo = _OTHERS.get(id(self))
        if memo is None or memo[0] != key:  # compared once per (base, models): the engine asks for every tensor
            if memo is None:
                weakref.finalize(self, _OTHERS.pop, id(self), None)
            memo = _OTHERS[id(self)] = (key, [not (self.base_model and same_model(m.model, self.base_model))
                                              for m in self.models])
        return [m for m, other in zip(self.models, memo[1]) if other]

    def weighted_models(self) -> list[InputModel]:
        """The models whose per-model parameters the method reads: every model for a whole-model method
        (linear), else the models other than the base."""
        return self.models if get_method(self.merge_method).inputs == "models" else self.others()

    @property
    def vocab_source(self) -> Optional[str]:
        """The output vocabulary's source (`base`, `union` or a model), from either form; None: not set."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    @property
    def vocab_padding(self) -> Optional[int]:
        return self.tokenizer.pad_to_multiple_of if self.tokenizer is not None else None

    @property
    def vocab_tokens(self) -> dict[str, TokenSpec]:
        """`tokenizer.tokens`: per-token row sources ({} for none)."""
        return (self.tokenizer.tokens or {}) if self.tokenizer is not None else {}

    def to_yaml_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
        if self.slices is not None:  # mergekit takes `models` or `slices`, not both
            data.pop("models")
            for piece in data["slices"]:
                for src in piece["sources"]:
                    if not src["parameters"]:
                        del src["parameters"]
                if not piece["parameters"]:
                    del piece["parameters"]
        return data


# numbers that must lie in a range, as [low, high] with low excluded where marked: (low, high, low_open)
RANGES = {"density": (0.0, 1.0, True), "gamma": (0.0, 1.0, False), "epsilon": (0.0, 1.0, False),
          "select_topk": (0.0, 1.0, False)}


def _check_value(key: str, value: Any, spec, where: str) -> None:
    """A parameter whose default is a number (or that is required: weight, t) takes finite numbers only, in
    every form (scalar, gradient, filter entries); density and gamma also within their range. A NaN weight
    would otherwise merge a model of NaNs without a word."""
    kind = _kind(spec.global_params.get(key, spec.model_params.get(key)))
    if _has_empty(value):  # else it failed at merge time, naming a tensor but neither the parameter nor the model
        raise ValueError(f"{where}.{key}: an empty list; give a value, a gradient of values or a filter list (or "
                         f"leave {key} out for the value of the level above or the default)")
    if kind == "bool":
        bad = [leaf for leaf in _leaves(value) if not isinstance(leaf, bool)]
        if bad and isinstance(value, list) and not any(isinstance(v, FilterValue) for v in value):
            # pydantic has read [true, false] as a gradient of numbers by now: say what was written, not 1.0
            raise ValueError(f"{where}.{key}: a gradient (a list of values) is for numbers, and {key} is true or false; "
                             f"give one of them (or a list of {{filter, value}} entries, each value true or false)")
        if bad:
            raise ValueError(f"{where}.{key}: {bad[0]!r} is not true or false")
        return
    if kind != "number":
        return
    for leaf in _leaves(value):
        if isinstance(leaf, bool) or not isinstance(leaf, (int, float)):
            raise ValueError(f"{where}.{key}: {leaf!r} is not a number")
        if not math.isfinite(leaf):
            raise ValueError(f"{where}.{key}: {leaf} is not a finite number")
        if key in RANGES:
            lo, hi, lo_open = RANGES[key]
            if leaf > hi or leaf < lo or (lo_open and leaf == lo):
                raise ValueError(f"{where}.{key}: {leaf} is outside {'(' if lo_open else '['}{lo:g}, {hi:g}]")


def _has_empty(value: Any) -> bool:
    if isinstance(value, FilterValue):
        return _has_empty(value.value)
    return isinstance(value, list) and (not value or any(_has_empty(v) for v in value))


def _leaves(value: Any):
    if isinstance(value, FilterValue):
        yield from _leaves(value.value)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def _unknown(key: str, allowed, where: str) -> str:
    return f"unknown key {key!r} in {where}{did_you_mean(key, allowed)} (allowed: {', '.join(sorted(allowed)) or 'none'})"


def load_config(source: Union[str, os.PathLike, dict, MergeConfig], *, ignore_unknown: bool = False) -> MergeConfig:
    """Parse and validate a config from a YAML path, a dict or a MergeConfig.

    Model paths that do not exist relative to the working directory are looked up relative to the
    YAML file's directory. `ignore_unknown`: see parse_config.
    """
    if isinstance(source, MergeConfig):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        docs = read_yaml_documents(path)
        if len(docs) != 1:
            raise ConfigError(f"{path}: holds {len(docs)} merge configs (YAML documents); a multi-stage config runs with "
                              "`safemerge multimerge`, one merge per document" if docs else
                              f"{path}: is empty; a merge config is a YAML mapping with merge_method, models, ...")
        return parse_config(docs[0], where=str(path), folder=path.parent, ignore_unknown=ignore_unknown)
    if not isinstance(source, dict):
        raise ConfigError(f"config={source!r}: give a YAML file's path, a dict or a MergeConfig")
    return parse_config(source, ignore_unknown=ignore_unknown)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: the loader would keep the
    last silently (two `weight:` lines, two `merge_method:`), and a merge would run on half of what was written."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # a merge key (<<) brings keys that the mapping's own may override
                key = self.construct_object(key_node, deep=True)
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice in one mapping (first on line {first[key] + 1}); keep one",
                        key_node.start_mark)
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_error(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line: where (line and column), then what ("mapping values are not allowed here")."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if mark is None or problem is None:
        return f": {' '.join(str(e).split())}"
    context = getattr(e, "context", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}" + (f" ({context})" if context else "")


def read_yaml_documents(path: Path) -> list[dict]:
    """The merge configs of a YAML file, one per document (empty documents left out)."""
    try:
        docs = [d for d in yaml.load_all(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) if d is not None]
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start}); a merge config is YAML text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the merge config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML{_yaml_error(e)}") from None
    for i, data in enumerate(docs):
        if not isinstance(data, dict):
            where = f"{path}" if len(docs) == 1 else f"{path}, document {i + 1}"
            raise ConfigError(f"{where}: a merge config is a YAML mapping with merge_method, models, ...")
    return docs


def parse_config(data: dict, *, where: str = "config", folder: Path | None = None,
                 ignore_unknown: bool = False) -> MergeConfig:
    """Validate one config's mapping; with `folder`, model paths that do not exist as written are looked up there.
    With `ignore_unknown`, keys and parameters safemerge does not know are left out with a warning (mergekit
    ignores them without one) instead of being errors."""
    from safemerge.config_forms import _coerce, _from_modules, _from_slices, drop_unknown

    if ignore_unknown:
        data = drop_unknown(data, where)
    forms = ("models", "slices", "modules")
    if isinstance(data, dict) and any(data.get(k) not in (None, [], {}) for k in forms):
        # an empty or bare `models:` beside `slices:` (or the like) is no second form: mergekit reads it as absent
        data = {k: v for k, v in data.items() if not (k in forms and v in (None, [], {}))}
    given = set(data)
    try:
        if isinstance(data, dict):  # mergekit's mapping references ({model: {path}, lora: {path}}) as strings
            data = map_model_refs(data, lambda m: m)
        if "modules" in data:
            data = _from_modules(data, where)
        method = data.get("merge_method")
        if isinstance(method, str):
            get_method(method)  # an unknown method is the error to give, before anything it would explain
        if "slices" in data:
            data = _from_slices(data, where, folder)
        data = _coerce(data)
        if folder is not None:
            data = _relative_to(data, folder)
        return MergeConfig.model_validate(data)
    except (ConfigError, ValidationError) as e:
        text = "; ".join(_fmt_errors(e.errors(), data)) if isinstance(e, ValidationError) else str(e)
        text = text if text.startswith(f"{where}: ") else f"{where}: {text}"
        if "slices" in given and "models" not in given and "slices" not in data:  # one whole slice, read as `models`
            text = re.sub(r"\bmodels\[", "slices[0].sources[", text)  # name the place as the file has it
        if not ignore_unknown and re.search(r"unknown key '[^']*'(?! in a filter entry)", text):
            text += " (mergekit ignores unknown keys; --ignore-unknown / ignore_unknown=True does too, with a warning)"
        raise ConfigError(text) from None


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _filter_list(v: Any) -> Any:
    """A single {filter, value} mapping as the one-entry filter list mergekit reads it as; anything else as it is."""
    return [v] if isinstance(v, dict) and "value" in v else v


def _kind(default: Any) -> str | None:
    """What a parameter takes, from its default: "bool", "number" (REQUIRED ones are weight and t), or None."""
    if isinstance(default, bool):
        return "bool"
    return "number" if default is REQUIRED or isinstance(default, (int, float)) else None


def params_before(own: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top`'s parameters with `own`'s looked up first (a slice's or a module's before the top level's, as mergekit
    reads them): a key in both becomes one filter list that falls through to the top level's value."""
    return {**top, **{k: _fallback(v, top[k]) if k in top else v for k, v in own.items()}}


def _fallback(first: Any, then: Any) -> list:
    """One filter list that gives `first` where it resolves and `then` elsewhere (a slice's parameter before
    the top level's, as mergekit reads them): the entries of both, in that order. Takes values as written
    ({filter, value} mappings) or validated (FilterValue), and entries of both kinds validate as filter lists."""
    def entries(v: Any) -> list:
        v = _filter_list(v)
        return (list(v) if isinstance(v, list) and v and all(isinstance(e, (dict, FilterValue)) for e in v)
                else [{"value": v}])

    return entries(first) + entries(then)


# the members of ParamValue, as pydantic names them in an error's location
_PARAM_FORMS = {"bool", "int", "float", "str", "list[float]", "list[FilterValue]"}


def _fmt_errors(errors: list[dict], data: Any) -> list[str]:
    """pydantic's errors as the config's words: `models.0` names the model (`models[PATH]`); a parameter value that
    fits none of ParamValue's forms is one message (pydantic gives one per form), except a list of filter entries,
    whose errors say what is wrong in which entry."""
    out: list[str] = []
    values: dict[str, Any] = {}  # a parameter's location -> its whole value (the input of a form's own error)
    inner: dict[str, list[str]] = {}  # a parameter's location -> its filter entries' errors
    for err in errors:
        loc = list(err["loc"])
        if len(loc) > 1 and loc[0] == "models" and isinstance(loc[1], int):
            try:
                loc[:2] = [f"models[{data['models'][loc[1]]['model']}]"]
            except (KeyError, IndexError, TypeError):
                pass
        # the form's place: after a parameter's name, or after a filter entry's `value`
        at = next((i for i, x in enumerate(loc) if x in _PARAM_FORMS
                   and ((i >= 2 and loc[i - 2] == "parameters") or (i >= 1 and loc[i - 1] == "value"))), None)
        if at is None:
            out.append(_fmt({**err, "loc": loc}))
            continue
        where = ".".join(str(x) for x in loc[:at])
        if where not in values and where not in inner:
            out.append(where)  # a placeholder, filled in below, keeps the errors in pydantic's order
        if len(loc) == at + 1:
            values.setdefault(where, err["input"])
        elif loc[at] == "list[FilterValue]":
            inner.setdefault(where, []).append({**err, "loc": loc[:at] + loc[at + 1:]})
            values.setdefault(where, None)
    lines: list[str] = []
    for item in out:
        if item not in values:
            lines.append(item)
            continue
        whole = values[item]
        if isinstance(whole, list) and any(isinstance(x, dict) for x in whole) and inner.get(item):
            lines.extend(dict.fromkeys(_fmt_errors(inner[item], None)))  # an entry's `value` is read the same way
        else:
            lines.append(f"{item}: {json.dumps(whole, default=str)} is not a number, a list of numbers (a gradient over "
                         "the layers) or a list of filter entries ({filter: ..., value: ...})")
    return lines


def _known_keys() -> set[str]:
    """Every key the config's sections take (for "did you mean" after an unknown one)."""
    return {name for cls in (MergeConfig, InputModel, Slice, SliceSource, TokenizerSection, TokenSpec, TokenRow, FilterValue)
            for name in cls.model_fields}


def _fmt(err: dict) -> str:
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        return f"unknown key {loc!r}{did_you_mean(key, _known_keys() - {key}, n=1)}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def _local(p: Any, folder: Path) -> Any:
    """A model path as given when it exists, else relative to the config's folder when it exists there (each part
    of a `model+adapter` reference on its own, and the folder of a `model@revision` one, whose revision is refused)."""
    if isinstance(p, str) and not Path(p).exists():
        if (folder / p).exists() or ("@" in p and (folder / p.rsplit("@", 1)[0]).exists()):
            return str(folder / p)
        model, adapter = split_reference(p)
        if adapter is not None:
            return f"{_local(model, folder)}+{_local(adapter, folder)}"
    return p


def _given_twice(refs: list[str]) -> str | None:
    """The first reference that names the same model as an earlier one, if any."""
    return next((b for i, b in enumerate(refs) if any(same_model(a, b) for a in refs[:i])), None)


def same_model(a: str, b: str) -> bool:
    """Two references to one model: the same text, or paths of the same folder(s)."""
    def same(x: str | None, y: str | None) -> bool:
        return x == y or (x is not None and y is not None and Path(x).expanduser().resolve() == Path(y).expanduser().resolve())

    (ma, aa), (mb, ab) = split_reference(a), split_reference(b)
    return same(ma, mb) and same(aa, ab)


def _relative_to(data: dict, folder: Path) -> dict:
    return map_model_refs(data, lambda m: _local(m, folder))


def absolute_refs(data: dict) -> dict:
    """A config mapping with every model reference to a local folder made absolute (each part of `model+adapter`),
    so that it reproduces the merge from any folder; hub ids and keywords stay as they are."""
    def absolute(ref: str) -> str:
        model, adapter = split_reference(ref)
        parts = [model] if adapter is None else [model, adapter]
        return "+".join(str(Path(p).expanduser().absolute()) if Path(p).expanduser().exists() else p for p in parts)

    return map_model_refs(data, absolute)


def map_model_refs(data: dict, f: Callable[[str], str]) -> dict:
    """A config mapping as written, with `f` applied to every model reference in it: `base_model`, `models[].model`,
    each slice's sources and `base_model` (at the top level and in each `modules:` entry), `tokenizer_source` / `tokenizer.source` (the keywords base and union
    left as they are) and the model of each `tokenizer.tokens` entry. A reference in mergekit's mapping form is made
    its string form first (`reference_text`). Entries of the wrong shape are left for the validation to name."""

    def ref(v: Any) -> Any:
        if isinstance(v, dict) and "model" in v:  # mergekit's mapping form
            v = reference_text(v)
        return f(v) if isinstance(v, str) else v

    def source(v: Any) -> Any:  # a keyword stays one, even beside a folder of that name
        return v if v in VOCAB_KEYWORDS else ref(v)

    def models(entries: Any) -> Any:
        if not isinstance(entries, list):
            return entries
        return [dict(e, model=ref(e["model"])) if isinstance(e, dict) and "model" in e else e for e in entries]

    def piece(p: Any) -> Any:
        if not isinstance(p, dict):
            return p
        return dict(p, sources=models(p.get("sources")), **({"base_model": ref(p["base_model"])} if "base_model" in p else {}))

    def token(e: Any) -> Any:
        src = e.get("source") if isinstance(e, dict) else None
        if isinstance(src, str):
            return dict(e, source=ref(src))
        if isinstance(src, dict) and "model" in src:
            return dict(e, source=dict(src, model=ref(src["model"])))
        return e

    def body(d: dict) -> dict:  # the top level, or a `modules:` entry
        d = dict(d)
        if "models" in d:
            d["models"] = models(d["models"])
        if isinstance(d.get("slices"), list):
            d["slices"] = [piece(p) for p in d["slices"]]
        return d

    out = body(data)
    if "base_model" in out:
        out["base_model"] = ref(out["base_model"])
    if isinstance(out.get("modules"), dict):
        out["modules"] = {k: body(m) if isinstance(m, dict) else m for k, m in out["modules"].items()}
    if "tokenizer_source" in out:
        out["tokenizer_source"] = source(out["tokenizer_source"])
    tok = out.get("tokenizer")
    if isinstance(tok, dict):
        tok = dict(tok, **({"source": source(tok["source"])} if "source" in tok else {}))
        if isinstance(tok.get("tokens"), dict):
            tok["tokens"] = {t: token(e) for t, e in tok["tokens"].items()}
        out["tokenizer"] = tok
    return out


# -- parameter resolution ---------------------------------------------------------------------------
def resolve(value: Any, *, tensor: str, t: float) -> Any:
    """The value of one parameter for one tensor at layer position t ∈ [0, 1]; None if no filter matches."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, list) and value and all(isinstance(v, FilterValue) for v in value):
        for entry in value:
            if entry.filter is None or entry.filter == "*" or entry.filter in tensor:
                return resolve(entry.value, tensor=tensor, t=t)
        return None
    if isinstance(value, list) and value:  # a gradient
        x = t * (len(value) - 1)
        i0 = int(math.floor(x))
        i1 = min(len(value) - 1, i0 + 1)
        frac = x - i0
        return (1 - frac) * float(value[i0]) + frac * float(value[i1])
    raise ConfigError(f"parameter value {value!r} for tensor {tensor} is empty or malformed")


def method_params(config: MergeConfig, *, tensor: str, t: float,
                  model_names: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Resolve the method's global parameters and per-model parameters (in `others()` order, or all
    models for whole-model methods) for one tensor. Raises ConfigError for a missing required one.
    `model_names` gives a model's own name of the tensor where it differs (a slice source at another depth):
    a per-model parameter's filters match that name, as in mergekit; the global ones match `tensor`."""
    spec = get_method(config.merge_method)
    model_names = model_names or {}

    def pick(key: str, default: Any, sources: list[dict], name: str = tensor) -> Any:
        for src in sources:
            if key in src:
                v = resolve(src[key], tensor=name, t=t)
                if v is not None:
                    return v
        return default

    glob = {k: pick(k, d, [config.parameters]) for k, d in spec.global_params.items()}
    for k, v in glob.items():
        if v is REQUIRED:
            raise ConfigError(f"parameter {k!r} of {config.merge_method} is required (tensor {tensor}); add it under `parameters`")
    models = config.weighted_models()
    per: dict[str, list[Any]] = {k: [] for k in spec.model_params}
    for m in models:
        for k, d in spec.model_params.items():
            v = pick(k, d, [m.parameters, config.parameters], model_names.get(m.model, tensor))
            if v is REQUIRED:
                raise ConfigError(f"models[{m.model}]: parameter {k!r} of {config.merge_method} is required (tensor {tensor})")
            per[k].append(v)
    return glob, per

