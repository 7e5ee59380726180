"""Merging models whose vocabularies differ (mergekit's `tokenizer_source: base | <model> | union` and its
`tokenizer:` section's `source`, `pad_to_multiple_of` and `tokens`).

The output's vocabulary is the base model's (`base`: the `base_model`, else the first model), a named model's,
or the union of all (the base's tokenizer with every other model's missing tokens appended, normal tokens
first, then added/special ones, each model in config order and its tokens by id). Every vocabulary-indexed
tensor (the embeddings and the output head) of every model is then re-indexed to the output's token ids
before the merge, so each output row merges the rows of the same token. A token a model lacks gets, in
that model, mergekit's default: the one model's row where only one has it, the base's where the base has
it, else the mean of the models that have it (zero where none has it). `tokens` (mergekit's per-token sources)
replaces that default for the tokens it lists, or, with `force`, every model's row of the token. Rows added by
`pad_to_multiple_of` are each model's mean embedding.

Where every input has the same vocabulary (the same token → id map and the same number of rows) and no
padding is asked for, nothing is re-indexed: the embeddings are merged as they are. (mergekit 0.1.5 would
also cut rows beyond the tokenizer's length there, e.g. Qwen's padding rows.)
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from safemerge._hf import local_folder
from safemerge.config import VOCAB_KEYWORDS, same_model, split_reference
from safemerge.errors import CheckpointError, ConfigError
from safemerge.layout import layer_index

if TYPE_CHECKING:
    from safemerge.checkpoint import Checkpoint
    from safemerge.config import TokenSpec


@dataclass
class VocabPlan:
    size: int  # output rows (the vocabulary, padded)
    n_tokens: int  # output token ids 0 … n_tokens − 1; rows past them are padding
    index: dict[str, torch.Tensor]  # per model: output id -> its row, −1 where it lacks the token
    fill_ids: torch.Tensor  # output ids some model lacks
    fill_from: dict[str, dict[str, torch.Tensor]]  # per tensor, per model of its route: which of fill_ids take this
    # model's row into their default (each tensor over its own sources and base, as mergekit fills a sliced merge's)
    tensors: set[str] = field(default_factory=set)  # output names of the vocabulary-indexed tensors
    tokenizer: Any = None  # the union tokenizer to save; None: copy the source's tokenizer files
    dtype: torch.dtype | None = None  # the config's `dtype`: the re-indexed rows are at least that precise
    rows: dict[int, tuple[str | None, int]] = field(default_factory=dict)  # `tokens`: output id -> (model, its row); None: zero
    forced: set[int] = field(default_factory=set)  # output ids whose row every model takes from `rows`

    def permute(self, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each model's whole tensor `name` (its rows indexed by its own token ids) re-indexed to the output's ids,
        in the inputs' promoted dtype (and the config's `dtype`, where that is wider)."""
        first = next(iter(tensors.values()))
        dtype, device, rest = first.dtype, first.device, tuple(first.shape[1:])
        for x in tensors.values():
            dtype = torch.promote_types(dtype, x.dtype)
        if self.dtype is not None:  # mergekit reads the inputs in `dtype`: a float32 config keeps float32 means
            dtype = torch.promote_types(dtype, self.dtype)
        fill_ids = self.fill_ids.to(device)
        total = torch.zeros((len(fill_ids), *rest), dtype=torch.float32, device=device)
        count = torch.zeros(len(fill_ids), dtype=torch.float32, device=device)
        for model, x in tensors.items():
            take = self.fill_from[name][model].to(device)
            total[take] += x[self.index[model].to(device)[fill_ids[take]]].to(torch.float32)
            count[take] += 1
        default = (total / count.clamp_min(1).view(-1, *([1] * len(rest)))).to(dtype)  # no model has it: zero
        lacking = torch.stack([self.index[m] < 0 for m in tensors]).any(0)  # some source of this tensor lacks the token
        given = {i: tensors[m][row].to(dtype) if m is not None else torch.zeros(rest, dtype=dtype, device=device)
                 for i, (m, row) in self.rows.items() if i in self.forced or lacking[i]}  # else the entry is not used here
        out = {}
        for model, x in tensors.items():
            index = self.index[model].to(device)
            y = torch.empty((self.size, *rest), dtype=dtype, device=device)
            have = index >= 0
            y[: self.n_tokens][have] = x[index[have]].to(dtype)
            lacks = ~have[fill_ids]
            y[fill_ids[lacks]] = default[lacks]
            for i, row in given.items():  # `tokens`: where the model lacks the token, or everywhere with `force`
                if i in self.forced or not have[i]:
                    y[i] = row
            if self.size > self.n_tokens:  # padding rows: the model's mean embedding
                y[self.n_tokens:] = y[: self.n_tokens].to(torch.float32).mean(0).to(dtype)
            out[model] = y
        return out


def source_folder(source: str) -> Path:
    """The folder a `tokenizer_source` that names a model is read from: a `model+adapter` reference's model, as
    mergekit reads it (and as every input's vocabulary is read here)."""
    return local_folder(split_reference(source)[0], weights=False)  # a hub id: its snapshot in the local HF cache


def _has_tokenizer(path: Path) -> bool:
    return any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))


def _vocab(path: Path) -> dict[str, int] | None:
    """The model's token -> id map (added tokens included), or None where it has no tokenizer files."""
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab(with_added_tokens=True)
        except Exception as e:  # noqa: BLE001 - any parse failure is the file's
            raise CheckpointError(f"{path / 'tokenizer.json'}: cannot read the tokenizer ({e})") from None
    return _load_tokenizer(path).get_vocab() if _has_tokenizer(path) else None


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def _rows(ckpt: "Checkpoint") -> int:
    cfg = ckpt.config
    rows = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    if not isinstance(rows, int):
        raise CheckpointError(f"{ckpt.path}: config.json has no vocab_size; tokenizer_source needs it to find the "
                              "embedding rows")
    return rows


def vocab_plan(source: str | None, pad_to_multiple_of: int | None, *, models: dict[str, "Checkpoint"],
               base_model: str | None, routes: dict[str, dict[str, str]], bases: dict[str, str | None] | None = None,
               dtype: torch.dtype | None = None, tokens: dict[str, "TokenSpec"] | None = None) -> VocabPlan | None:
    """The re-indexing of the vocabulary tensors, or None where the vocabularies already agree and no `tokens` are
    given (see the module's docstring). `routes`: output tensor name -> {model: its tensor name}; `bases`: output
    tensor name -> the base of the config that merges it (a sliced merge: its first or last slice's; default
    `base_model`). `source: base` means `base_model`, else the first model; the default rows of a tensor prefer its
    base's only where there is one, as in mergekit. `tokens`: mergekit's `tokenizer.tokens`, per-token row
    sources."""
    base = base_model or next(iter(models))
    if source is None:
        _warn_if_renumbered(models)
        return None
    rows = {m: _rows(c) for m, c in models.items()}
    named = None if source in VOCAB_KEYWORDS else next((m for m in models if same_model(source, m)), None)
    outside = source not in VOCAB_KEYWORDS and named is None  # a tokenizer_source that is no input model
    one_size = not pad_to_multiple_of and len(set(rows.values())) == 1
    if one_size and not outside and not tokens and _same_files(models):
        return None  # one tokenizer.json, byte for byte: one vocabulary (without parsing it)
    vocabs = {m: _vocab(c.path) for m, c in models.items()}
    if vocabs[base] is None:
        raise CheckpointError(f"{base}: the base model has no tokenizer files; tokenizer_source needs its vocabulary")
    for m, v in vocabs.items():
        if v is None:
            warnings.warn(f"{m} has no tokenizer files; it is taken to share {base}'s vocabulary", stacklevel=3)
            vocabs[m] = vocabs[base]
    for m, v in vocabs.items():  # tokens past a model's embedding rows have no row there
        vocabs[m] = {t: i for t, i in v.items() if i < rows[m]}
    tokenizer = None
    if source == "base":
        out = vocabs[base]
    elif named is not None:
        out = vocabs[named]
    elif source == "union":
        out = None  # built below, unless the vocabularies agree
    else:
        out = _vocab(source_folder(source))
        if out is None:
            raise ConfigError(f"tokenizer_source {source!r} has no tokenizer files")
    same = one_size and all(v == vocabs[base] for v in vocabs.values())
    if same and not tokens and (out is None or out == vocabs[base]):  # rows past the tokenizer (padding) kept
        return None
    if out is None:
        tokenizer = _union_tokenizer(models, base, rows)
        out = tokenizer.get_vocab()
    new = [t for t in tokens or {} if t not in out]
    if new:  # as mergekit: listed tokens the output lacks are added to its tokenizer (plain added tokens)
        if tokenizer is None:
            tokenizer = _copy_tokenizer(_load_tokenizer(models[base].path if source == "base" else
                                                        models[named].path if named is not None else source_folder(source)))
        tokenizer.add_tokens(new)
        out = tokenizer.get_vocab()
    n = len(out)
    if sorted(out.values()) != list(range(n)):
        raise CheckpointError(f"tokenizer_source {source!r}: its token ids are not 0 … {n - 1}; safemerge cannot lay "
                              "out embedding rows for it")
    size = n if not pad_to_multiple_of else math.ceil(n / pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.tensor([out[t] for t in out], dtype=torch.long)
    index = {}
    for m, v in vocabs.items():
        idx = torch.full((n,), -1, dtype=torch.long)
        idx[ids] = torch.tensor([v.get(t, -1) for t in out], dtype=torch.long)
        index[m] = idx
    fill_ids = torch.stack([index[m] < 0 for m in models]).any(0).nonzero().flatten()  # tokens some model lacks
    tensors = {name for name, src in routes.items()
               if layer_index(name) is None and all(len(models[m].shape(s)) == 2 and models[m].shape(s)[0] == rows[m]
                                                    for m, s in src.items())}
    if not tensors:
        raise CheckpointError("tokenizer_source: found no embedding or output-head tensor with vocab_size rows in "
                              "every model")
    fill_from = {t: _fill_from(list(routes[t]), (bases or {}).get(t, base_model), index, fill_ids) for t in tensors}
    given, forced = _token_rows(tokens or {}, out, index, vocabs, rows)
    for i, (model, _) in given.items():
        # an entry is used by a tensor where one of that tensor's sources lacks the token (or with `force`)
        missing = sorted(t for t in tensors if model is not None and model not in routes[t]
                         and (i in forced or any(int(index[m][i]) < 0 for m in routes[t])))
        if missing:
            token = next(t for t, j in out.items() if j == i)
            raise ConfigError(f"tokenizer.tokens[{token!r}]: {model} gives its row, but {', '.join(missing)} is not merged "
                              "from it (a sliced merge takes the embeddings from its first slice's models and the output "
                              "head from its last) and needs the row there; take the row from a model that is")
    return VocabPlan(size=size, n_tokens=n, index=index, fill_ids=fill_ids, fill_from=fill_from, tensors=tensors,
                     tokenizer=tokenizer, dtype=dtype, rows=given, forced=forced)


def _fill_from(names: list[str], base: str | None, index: dict[str, torch.Tensor],
               fill_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per source of one tensor, which of `fill_ids` take its row into their default: a token some source lacks
    takes, there, the one source's row that has it; else the base's where it has it; else the mean of the sources'
    that have it (none: zero)."""
    have = torch.stack([index[m][fill_ids] >= 0 for m in names])  # sources × fill_ids
    single = have.sum(0) == 1
    base_has = have[names.index(base)] if base in names else torch.zeros_like(single)
    return {m: have[i] & (single | ~base_has | torch.tensor(m == base)) for i, m in enumerate(names)}


def _token_rows(tokens: dict[str, "TokenSpec"], out: dict[str, int], index: dict[str, torch.Tensor],
                vocabs: dict[str, dict[str, int]], rows: dict[str, int]) -> tuple[dict[int, tuple[str | None, int]], set[int]]:
    """`tokenizer.tokens` as (output id -> (model, row in that model's tensors; None: a zero row), forced ids). An
    entry is read only where it is used (some model lacks the token, or `force`), as in mergekit."""
    from safemerge.config import same_model

    given, forced = {}, set()
    for token, spec in tokens.items():
        i = out[token]
        if not spec.force and all(int(idx[i]) >= 0 for idx in index.values()):
            continue  # every model has its own row of the token: the entry is not used
        if spec.model is None:
            given[i] = (None, -1)
        else:
            model = next((m for m in vocabs if same_model(spec.model, m)), None)
            if model is None:
                raise ConfigError(f"tokenizer.tokens[{token!r}]: {spec.model} is not one of the merged models; a "
                                  f"token's row comes from one of {', '.join(vocabs)} (or {{kind: zero}})")
            src = spec.source if not isinstance(spec.source, str) else None
            if src is not None and src.token_id is not None:
                row, what, hint = src.token_id, f"no token id {src.token_id}", ""
            else:
                want = token if src is None else src.token
                row, what = vocabs[model].get(want, -1), f"no token {want!r}"
                hint = ("; take the row from a model that has it, or {kind: model_token, model, token} for another "
                        "token's row") if src is None else ""
            if not 0 <= row < rows[model]:
                raise ConfigError(f"tokenizer.tokens[{token!r}]: {model} has {what} among its {rows[model]} rows{hint}")
            given[i] = (model, row)
        if spec.force:
            forced.add(i)
    return given, forced


def _same_files(models: dict[str, "Checkpoint"]) -> bool:
    """Every model has a tokenizer.json and they are byte-identical."""
    files = [c.path / "tokenizer.json" for c in models.values()]
    return all(f.is_file() for f in files) and len({f.read_bytes() for f in files}) == 1


def _warn_if_renumbered(models: dict[str, "Checkpoint"]) -> None:
    """Without `tokenizer_source` the embeddings merge row by row; where the models' tokenizers number their tokens
    differently, that merges rows of different tokens: say so (mergekit does not)."""
    if len(models) < 2 or not all((c.path / "tokenizer.json").is_file() for c in models.values()) or _same_files(models):
        return
    try:
        vocabs = {m: _vocab(c.path) for m, c in models.items()}
    except CheckpointError:  # a tokenizer this version cannot read: no warning (the merge does not need it)
        return
    sizes = [c.config.get("vocab_size") for c in models.values()]
    rows = min(sizes) if all(isinstance(n, int) for n in sizes) else None  # ids past a model's rows are unused

    def used(v: dict[str, int]) -> dict[str, int]:
        return {t: i for t, i in v.items() if rows is None or i < rows}

    first = next(iter(models))
    want = used(vocabs[first])
    other = next((m for m, v in vocabs.items() if used(v) != want), None)
    if other is not None:
        warnings.warn(f"{other} and {first} number their tokens differently, and the embeddings are merged row by row; "
                      "set `tokenizer_source: base` (or a model, or `union`; mergealign: --tokenizer-source) to merge them token by "
                      "token", stacklevel=4)


def _copy_tokenizer(tok: Any):
    """A loaded tokenizer, saved and loaded again, so that tokens added to the copy leave nothing shared."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return _load_tokenizer(Path(d))


def _union_tokenizer(models: dict[str, "Checkpoint"], base: str, rows: dict[str, int]):
    """The base's tokenizer with every other model's tokens it lacks added: normal tokens first (model by model,
    by id), then added tokens (special ones stay special)."""
    from tokenizers import AddedToken

    base_tok = _load_tokenizer(models[base].path)
    res = _copy_tokenizer(base_tok)
    order = [base] + [m for m in models if m != base]
    toks = {m: base_tok if m == base else (_load_tokenizer(models[m].path) if _has_tokenizer(models[m].path) else None)
            for m in order}
    added: dict[str, AddedToken] = {}  # every model's added tokens first: a token added in any is added in the output
    for m, tok in toks.items():
        for i, a in sorted((tok.added_tokens_decoder if tok is not None else {}).items()):
            if i < rows[m]:
                added.setdefault(a.content, a)
    have = set(res.get_vocab())
    plain: list[str] = []
    for m, tok in toks.items():
        if tok is None:
            continue
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < rows[m] and t not in added and t not in have:
                have.add(t)
                plain.append(t)
    res.add_tokens(plain)
    new = [a for t, a in added.items() if t not in set(res.get_vocab())]
    if new:
        res.add_tokens([AddedToken(a.content, single_word=a.single_word, lstrip=a.lstrip, rstrip=a.rstrip,
                                   normalized=a.normalized, special=a.special) for a in new])
    return res


def write_vocab_size(config: dict, size: int) -> dict:
    """The output's config.json with the new vocabulary size (text_config's where the model keeps it there)."""
    config = copy.deepcopy(config)
    if "vocab_size" in config or "text_config" not in config:
        config["vocab_size"] = size
    else:
        config["text_config"]["vocab_size"] = size
    return config
