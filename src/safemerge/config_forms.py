"""mergekit's written forms of a merge config, turned into the one form `MergeConfig` validates.

Before validation (`safemerge.config.parse_config`), a config mapping as written goes through these steps:
- `drop_unknown` (only with `ignore_unknown`): keys and method parameters safemerge does not know, left out
  with one warning, as mergekit ignores them;
- `_from_modules`: a `modules:` section with its one `default` module as the plain form;
- `_from_slices`: one slice of whole layer stacks as `models`, other slices kept as slices;
- `_coerce`: parameters read as mergekit's pydantic models read them (numbers or booleans written as strings,
  a single {filter, value} mapping as a one-entry list, an empty `parameters:` as none).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from safemerge.config import (_FALSE, _TRUE, MergeConfig, TokenizerSection, TokenRow, TokenSpec, _filter_list, _kind,
                              _local, _unknown, params_before, split_reference)
from safemerge.errors import ConfigError
from safemerge.methods import get_method


def drop_unknown(data: dict, where: str) -> dict:
    """`data` without the keys and the merge method's parameters that safemerge does not know, each named in one
    warning. Values are not checked here; a known key with a bad value is still an error."""
    from safemerge.methods import METHODS

    spec = METHODS.get(data.get("merge_method")) if isinstance(data.get("merge_method"), str) else None
    dropped: list[str] = []

    def keep(d: Any, allowed: Any, at: str) -> Any:
        if not isinstance(d, dict):
            return d
        for k in d:
            if k not in allowed:
                dropped.append(f"{at}{k}")
        return {k: v for k, v in d.items() if k in allowed}

    def params(d: Any, allowed: Any, at: str) -> Any:
        return d if spec is None else keep(d, allowed, at)

    every = (set(spec.global_params) | set(spec.model_params)) if spec else set()
    per_model = set(spec.model_params) if spec else set()

    def entry(d: Any, keys: tuple[str, ...], allowed: Any, at: str) -> Any:
        """A model, slice source or slice: its own keys, then its parameters."""
        d = keep(d, keys, at)
        if isinstance(d, dict) and "parameters" in d:
            d = {**d, "parameters": params(d["parameters"], allowed, f"{at}parameters.")}
        return d

    def models(entries: Any, at: str) -> Any:
        if not isinstance(entries, list):
            return entries
        return [entry(m, ("model", "parameters"), per_model, f"{at}[{i}].") for i, m in enumerate(entries)]

    def slices(entries: Any, at: str) -> Any:
        if not isinstance(entries, list):
            return entries
        out = []
        for i, piece in enumerate(entries):
            piece = entry(piece, ("sources", "parameters", "base_model"), every, f"{at}[{i}].")
            if isinstance(piece, dict) and isinstance(piece.get("sources"), list):
                piece = {**piece, "sources": [entry(src, ("model", "layer_range", "parameters"), per_model,
                                                    f"{at}[{i}].sources[{j}].") for j, src in enumerate(piece["sources"])]}
            out.append(piece)
        return out

    def body(d: dict, at: str) -> dict:
        d = dict(d)
        if "models" in d:
            d["models"] = models(d["models"], f"{at}models")
        if "slices" in d:
            d["slices"] = slices(d["slices"], f"{at}slices")
        if "parameters" in d:
            d["parameters"] = params(d["parameters"], every, f"{at}parameters.")
        return d

    out = body(keep(data, set(MergeConfig.model_fields) | {"modules"}, ""), "")
    if isinstance(out.get("modules"), dict) and isinstance(out["modules"].get("default"), dict):
        module = keep(out["modules"]["default"], ("models", "slices", "parameters"), "modules.default.")
        out["modules"] = {**out["modules"], "default": body(module, "modules.default.")}
    if isinstance(out.get("tokenizer"), dict):
        tok = keep(out["tokenizer"], set(TokenizerSection.model_fields), "tokenizer.")
        if isinstance(tok.get("tokens"), dict):
            tokens = {}
            for t, e in tok["tokens"].items():
                e = keep(e, set(TokenSpec.model_fields), f"tokenizer.tokens[{t!r}].")
                if isinstance(e, dict) and isinstance(e.get("source"), dict):
                    e = {**e, "source": keep(e["source"], set(TokenRow.model_fields), f"tokenizer.tokens[{t!r}].source.")}
                tokens[t] = e
            tok = {**tok, "tokens": tokens}
        out["tokenizer"] = tok
    if dropped:
        warnings.warn(f"{where}: ignored {len(dropped)} unknown key(s) (mergekit ignores them too): "
                      f"{', '.join(dropped)}", UserWarning, stacklevel=3)
    return out


def _coerce(data: dict) -> dict:
    """Read parameters as mergekit's pydantic models do: a number or boolean written as a string ("5e-1", which
    YAML leaves a string, or "false") as that number or boolean, a single {filter, value} mapping as a one-entry
    list, and an empty `parameters:` as none."""
    try:
        spec = get_method(data.get("merge_method"))
    except Exception:  # an unknown method: the validation names it
        return data
    defaults = {**spec.global_params, **spec.model_params}

    def leaf(key: str, v: Any) -> Any:
        kind = _kind(defaults.get(key))
        if kind == "bool" and not isinstance(v, bool) and v in (0, 1):
            return bool(v)  # normalize: 1
        if not isinstance(v, str):
            return v
        if kind == "bool":
            text = v.strip().lower()
            return True if text in _TRUE else False if text in _FALSE else v
        if kind == "number":
            try:
                return float(v)
            except ValueError:
                return v
        return v

    def value(key: str, v: Any, at: str) -> Any:
        v = _filter_list(v)
        if isinstance(v, list):
            for i, e in enumerate(v):
                odd = sorted(str(k) for k in e if k not in ("filter", "value")) if isinstance(e, dict) else []
                if odd:  # mergekit drops such a key, so the entry would apply to every tensor
                    hint = " (mergekit's older `pattern:` is `filter:` now)" if "pattern" in odd else ""
                    raise ConfigError(f"{at}.{key}[{i}]: unknown key {odd[0]!r} in a filter entry (allowed: "
                                      f"filter, value){hint}")
            return [{**e, "value": value(key, e["value"], at)} if isinstance(e, dict) and "value" in e else leaf(key, e)
                    for e in v]
        return leaf(key, v)

    def params(p: Any, at: str) -> Any:
        if p is None:
            return {}
        return {k: value(k, v, at) for k, v in p.items()} if isinstance(p, dict) else p

    def one(m: Any, at: str) -> Any:  # a model, slice source or slice, with its parameters read
        if not (isinstance(m, dict) and "parameters" in m):
            return m
        return dict(m, parameters=params(m.get("parameters"), f"{at}.parameters"))

    out = dict(data)
    if "parameters" in out:
        out["parameters"] = params(out["parameters"], "parameters")
    if isinstance(out.get("models"), list):
        out["models"] = [one(m, f"models[{m.get('model') if isinstance(m, dict) else i}]")
                         for i, m in enumerate(out["models"])]
    if isinstance(out.get("slices"), list):
        out["slices"] = [dict(one(p, f"slices[{i}]"), sources=[one(m, f"slices[{i}].sources[{j}]")
                                                                for j, m in enumerate(p["sources"])])
                         for i, p in enumerate(out["slices"])]
    return out


def _from_slices(data: dict, where: str, folder: Path | None) -> dict:
    """mergekit's `slices` form. One slice whose sources all span their model's whole layer stack is exactly
    what mergekit makes of `models` itself, and reads as `models` (slice-level `parameters` sit between a
    source's and the top level's, as in mergekit), so the search can take it. Anything else (several slices,
    partial layer ranges: stacking or cutting layers) stays `slices`, with `models` listing the models read."""
    slices = data["slices"]
    if "models" in data:
        raise ConfigError(f"{where}: give `models` or `slices`, not both")
    if not isinstance(slices, list) or not slices or not all(isinstance(p, dict) for p in slices):
        raise ConfigError(f"{where}: `slices` must be a list of {{sources: [{{model, layer_range}}, ...]}} entries")
    unused = [i for i, piece in enumerate(slices) if "residual_weight" in piece]
    if unused:  # a field of mergekit's slice schema that no mergekit code reads
        warnings.warn(f"{where}: slices[{unused[0]}].residual_weight has no effect (mergekit declares the key and ignores "
                      "it too); leave it out", UserWarning, stacklevel=4)
        slices = [{k: v for k, v in piece.items() if k != "residual_weight"} for piece in slices]
        data = {**data, "slices": slices}
    for i, piece in enumerate(slices):
        for key in piece:
            if key not in ("sources", "parameters", "base_model"):
                raise ConfigError(f"{where}: slices[{i}]: " + _unknown(key, ("sources", "parameters", "base_model"), "a slice"))
        sources = piece.get("sources")
        if not isinstance(sources, list) or not sources or not all(isinstance(s, dict) for s in sources):
            raise ConfigError(f"{where}: slices[{i}].sources must be a list of {{model, layer_range}} entries")
        for j, src in enumerate(sources):
            for key in src:
                if key not in ("model", "layer_range", "parameters"):
                    raise ConfigError(f"{where}: slices[{i}].sources[{j}]: "
                                      + _unknown(key, ("model", "layer_range", "parameters"), "a slice source"))
            if not isinstance(src.get("model"), str):
                raise ConfigError(f"{where}: slices[{i}].sources[{j}].model must be a model path")
            span = src.get("layer_range")
            if not (isinstance(span, list) and len(span) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                     for x in span)):
                raise ConfigError(f"{where}: slices[{i}].sources[{j}] ({src['model']}): layer_range must be "
                                  f"[start, stop], two whole numbers; got {span!r}")
    if len(slices) == 1 and all(src["layer_range"] == [0, _num_layers(src["model"], folder)] for src in slices[0]["sources"]) \
            and _base_fits(data, slices[0]):
        return _whole_slice(data, where)
    out = {k: v for k, v in data.items() if k != "slices"}
    out["slices"] = [{**piece, "sources": [dict(src, parameters=_params_or_empty(src.get("parameters")))
                                           for src in piece["sources"]],
                      **({"parameters": _params_or_empty(piece["parameters"])} if "parameters" in piece else {})}
                     for piece in slices]
    used = [src["model"] for piece in slices for src in piece["sources"]]
    out["models"] = [{"model": m} for m in dict.fromkeys(used)]
    return out  # a slice's own base_model stays its own, as in mergekit


def _from_modules(data: dict, where: str) -> dict:
    """mergekit's `modules:` form with its one `default` module (what mergekit-multi writes back for a text model)
    as the plain form: the module's `models` or `slices` at the top level, its `parameters` before the top level's
    (mergekit looks a parameter up in source, slice, module, then top level). Several modules (multimodal
    models: a text decoder beside a vision tower) are refused."""
    modules = data["modules"]
    if not isinstance(modules, dict) or list(modules) != ["default"]:
        names = ", ".join(map(str, modules)) if isinstance(modules, dict) else repr(modules)
        raise ConfigError(f"{where}: `modules:` ({names}): only a single `default` module is read (the form mergekit "
                          "writes for a text model); per-module merges of multimodal models are not supported, so "
                          "merge with `models` (whole models) or `slices` (one layer stack)")
    module = modules["default"]
    if not isinstance(module, dict):
        raise ConfigError(f"{where}: modules.default must be a mapping with `models` or `slices`, got {module!r}")
    for key in module:
        if key not in ("models", "slices", "parameters"):
            raise ConfigError(f"{where}: modules.default: " + _unknown(key, ("models", "slices", "parameters"), "a module"))
    given = [k for k in ("models", "slices") if module.get(k)]  # mergekit reads an empty list or null as absent
    if len(given) != 1:
        raise ConfigError(f"{where}: modules.default needs `models` or `slices` (one of them)")
    clash = [k for k in ("models", "slices") if data.get(k)]
    if clash:
        raise ConfigError(f"{where}: give `modules` or `{clash[0]}`, not both")
    out = {k: v for k, v in data.items() if k not in ("modules", "models", "slices")}
    out[given[0]] = module[given[0]]
    if module.get("parameters"):
        out["parameters"] = _own_first(module["parameters"], data, where, "modules.default")
    return out


def _params_or_empty(p: Any) -> Any:
    return {} if p is None else p


def _base_fits(data: dict, piece: dict) -> bool:
    """Whether a slice's base (its own, else the top level's) is one of its sources, or there is none. mergekit merges
    a slice's base only where it is a source, while in the `models` form it adds the base as one more model (linear,
    karcher) or refuses it (passthrough), so a slice with a base of another model stays a slice: merged without that
    base where the method needs none, refused where it needs one, as in mergekit."""
    base = piece.get("base_model", data.get("base_model"))
    return base is None or base in [src["model"] for src in piece["sources"]]


def _whole_slice(data: dict, where: str) -> dict:
    """One slice of whole layer stacks as the `models` form."""
    piece = data["slices"][0]
    slice_base = piece.get("base_model")  # a slice's base overrides the top level's, as in mergekit
    models = [{"model": src["model"], **({"parameters": src["parameters"]} if "parameters" in src else {})}
              for src in piece["sources"]]
    out = {k: v for k, v in data.items() if k != "slices"}
    out["models"] = models
    if slice_base is not None:
        out["base_model"] = slice_base
    if piece.get("parameters"):
        out["parameters"] = _own_first(piece["parameters"], data, where, "slices[0]")
    return out


def _own_first(own: Any, data: dict, where: str, label: str) -> dict:
    """The top level's parameters with `label`'s own (a slice's or a module's) looked up first, as written."""
    top = data.get("parameters") or {}
    if not isinstance(own, dict) or not isinstance(top, dict):
        raise ConfigError(f"{where}: {label}.parameters and parameters must be mappings of parameter: value")
    return params_before(own, top)


def _num_layers(model: str, folder: Path | None) -> int | None:
    """The layer count of a local model (its config.json, read as the engine reads it), or None."""
    import json

    from safemerge.layout import num_layers

    root = Path(split_reference(_local(model, folder) if folder is not None else model)[0]).expanduser()
    try:
        cfg = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return num_layers((), cfg) or None if isinstance(cfg, dict) else None
