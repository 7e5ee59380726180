"""Loaders for the evaluation data, through `datasets` (local files; hub names when a hub is reachable).

Harmful prompts (`load_prompts`), three formats, detected from the columns:

  beavertails  PKU-Alignment/BeaverTails, e.g. its `30k_test` split: `prompt`, `response`,
               `category` (a dict of 14 harm names -> bool), `is_safe`. The prompt's categories are
               the names set to true (the papers' per-category rates use these labels). A prompt that
               several rows repeat (one per answer) is asked once, with the union of their categories.
  hh-redteam   Anthropic/hh-rlhf `red-team-attempts`: a `transcript` ("\\n\\nHuman: ...\\n\\nAssistant:
               ..."); the prompt is the first human turn; `tags` (if any) are its categories.
  plain        any JSONL / JSON / CSV / Parquet file with a `prompt` column (name configurable) and
               an optional `category` column (a string or a list of strings).

Multiple-choice questions (`load_multiple_choice`): JSONL rows {"question": str, "choices": [str, ...],
"answer": int index | the correct choice's text}, the format of the lm-eval task YAML we ship.

Each loader returns records plus a fingerprint: blake2b of the file's bytes and of the options that
change what is read (format, split, column, limit), so a results-store key changes whenever the data do.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from safemerge._hf import is_hub_id, quiet_datasets
from safemerge.errors import SafemergeError

FORMATS = ("auto", "beavertails", "hh-redteam", "plain")
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".gz": "json"}


def names_data_file(source: str | os.PathLike) -> bool:
    """Whether `source` is named as a data file (.jsonl, .csv, ...), not a hub dataset, whether or not it exists."""
    return Path(str(source)).suffix.lower() in DATA_SUFFIXES


_FIRST_HUMAN = re.compile(r"Human:(.*?)(?:\n\s*\n\s*Assistant:|\Z)", re.DOTALL)
# hub datasets whose useful part is not their default config / split
_HUB_DEFAULTS: dict[str, dict[str, Any]] = {
    "PKU-Alignment/BeaverTails": {"split": "30k_test"},
    "Anthropic/hh-rlhf": {"data_dir": "red-team-attempts", "split": "train"},
}


class DataError(SafemergeError, ValueError):
    """A data file is missing, empty, or lacks a column or field it needs."""


@dataclass(frozen=True)
class Prompt:
    """One harmful prompt and the harm categories its dataset gives it (possibly none)."""

    text: str
    categories: tuple[str, ...] = ()
    id: int = 0


@dataclass(frozen=True)
class PromptSet:
    prompts: list[Prompt]
    fingerprint: str
    source: str
    format: str
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class MCQuestion:
    """A multiple-choice question; `answer` indexes `choices`."""

    question: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class QuestionSet:
    questions: list[MCQuestion]
    fingerprint: str
    source: str
    name: str

    def __len__(self) -> int:
        return len(self.questions)


# -- harmful prompts ------------------------------------------------------------------------------
def load_prompts(
    source: str | os.PathLike | Sequence[str] | Sequence[dict] | PromptSet,
    *,
    format: str = "auto",
    split: str | None = None,
    prompt_column: str = "prompt",
    limit: int | None = None,
) -> PromptSet:
    """Harmful prompts from a file, a hub dataset name, or an in-memory list (of str or of row dicts).

    `limit` keeps the first N prompts (file order). Raises DataError naming the file and the missing
    column when the format cannot be recognised, and when no prompt is left.
    """
    limit = _whole(limit)
    if isinstance(source, PromptSet):
        return _limited(source, limit)
    if format not in FORMATS:
        raise DataError(f"unknown prompts format {format!r}; choose one of {', '.join(FORMATS)}")
    if isinstance(source, (list, tuple)):
        bad = next((i for i, r in enumerate(source) if not isinstance(r, (str, dict))), None)
        if bad is not None:
            raise DataError(f"prompts list, item {bad + 1}: {source[bad]!r} is neither a prompt (str) nor a row (dict)")
        rows, name, digest = _in_memory([{prompt_column: r} if isinstance(r, str) else dict(r) for r in source])
    else:
        rows, name, digest = read_rows(source, split=split)
    columns = set(rows[0]) if rows else set()
    fmt = _detect(columns, name, prompt_column) if format == "auto" else format
    prompts = list(_parse(rows, fmt, name, prompt_column))
    if not prompts:
        raise DataError(f"{name}: no prompt left (every row's prompt is empty); the file needs at least one prompt")
    options = {"format": fmt, "split": split, "column": prompt_column, "limit": limit}
    meta = {}
    if fmt == "beavertails":
        prompts, meta["repeats"] = _once_each(prompts)
        options["once_each"] = True
        if meta["repeats"]:
            warnings.warn(f"{name}: {meta['repeats']} row(s) repeat an earlier prompt (BeaverTails has a row per "
                          f"answer); each prompt is asked once, {len(prompts)} in all, with its rows' categories",
                          stacklevel=2)
    ps = PromptSet(prompts, _digest_str(digest, options), name, fmt, meta)
    return _limited(ps, limit)


def _in_memory(rows: list[dict]) -> tuple[list[dict], str, str]:
    """Rows given as a list, as `read_rows` returns a file's: (rows, the name "<list>", a digest of their content)."""
    return rows, "<list>", _digest_bytes(json.dumps(rows, sort_keys=True, default=str).encode())


def _once_each(prompts: list[Prompt]) -> tuple[list[Prompt], int]:
    """Each distinct prompt text once, in first-seen order, with the union of its rows' categories; and how many
    rows repeated one. (A BeaverTails row is a question-answer pair, so a prompt answered several times repeats, and
    its categories label each answer's harm.)"""
    first: dict[str, Prompt] = {}
    for p in prompts:
        seen = first.get(p.text)
        first[p.text] = p if seen is None else replace(seen, categories=tuple(dict.fromkeys(seen.categories + p.categories)))
    return list(first.values()), len(prompts) - len(first)


def _whole(limit: Any) -> int | None:
    """A limit as a plain int (a numpy integer too: it goes into the JSON of the data's fingerprint)."""
    from safemerge._args import is_whole

    if limit is None:
        return None
    if not is_whole(limit):
        raise DataError(f"limit {limit!r}: give a whole number")
    return int(limit)


def _limited(ps: PromptSet, limit: int | None) -> PromptSet:
    if limit is None or limit >= len(ps.prompts):
        return ps
    if limit < 1:
        raise DataError(f"--limit {limit} (limit=): give a positive number of prompts")
    options = {"limit": limit}
    return PromptSet(ps.prompts[:limit], _digest_str(ps.fingerprint, options), ps.source, ps.format, ps.meta)


def _detect(columns: set[str], name: str, prompt_column: str) -> str:
    if prompt_column != "prompt" and prompt_column in columns:  # the column the user named, whatever else is there
        return "plain"
    if "transcript" in columns:
        return "hh-redteam"
    if {"prompt", "category", "is_safe"} <= columns:
        return "beavertails"
    if prompt_column in columns:
        return "plain"
    have = ", ".join(sorted(columns)) or "none"
    if prompt_column != "prompt":  # the user named the column: say it is not there
        raise DataError(f"{name}: no {prompt_column!r} column, as --prompt-column (prompt_column=) names; the file's "
                        f"columns are {have}: name one of them")
    raise DataError(
        f"{name}: no 'prompt' column (columns: {have}); rename the column that holds the prompts to 'prompt' (`safemerge "
        "eval safety` and `data safety` can also be told its name with --prompt-column, the Python API with "
        "prompt_column=), or use a BeaverTails or HH-RLHF red-team file"
    )


def _parse(rows: list[dict], fmt: str, name: str, prompt_column: str) -> Iterator[Prompt]:
    empty = 0
    for i, row in enumerate(rows):
        if fmt == "hh-redteam":
            text, cats = _first_human_turn(row.get("transcript"), name, i), _as_categories(row.get("tags"))
        else:
            col = "prompt" if fmt == "beavertails" else prompt_column
            if col not in row:
                raise DataError(f"{name}: row {i + 1} has no {col!r} field; every row needs one")
            text, cats = row[col], _as_categories(row.get("category"))
        if not isinstance(text, str):
            raise DataError(f"{name}: row {i + 1}: the prompt is {type(text).__name__}, not text")
        if not text.strip():
            empty += 1
            continue
        yield Prompt(text, cats, i)
    if empty:
        warnings.warn(f"{name}: skipped {empty} row(s) with an empty prompt", stacklevel=3)


def _first_human_turn(transcript: Any, name: str, i: int) -> str:
    if not isinstance(transcript, str):
        raise DataError(f"{name}: row {i + 1} has no text 'transcript' (HH-RLHF red-team format)")
    m = _FIRST_HUMAN.search(transcript)
    return m.group(1).strip() if m else ""


def _as_categories(value: Any) -> tuple[str, ...]:
    """BeaverTails' {name: bool} dict, a list of names, one name, or nothing."""
    if value is None or value == "":
        return ()
    if isinstance(value, dict):
        return tuple(sorted(k for k, v in value.items() if v))
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable):  # each once: a name listed twice would count its prompt twice in the category
        return tuple(dict.fromkeys(str(v) for v in value if v not in (None, "")))
    return (str(value),)


# -- multiple choice ------------------------------------------------------------------------------
def load_multiple_choice(source: str | os.PathLike | Sequence[dict] | QuestionSet, *,
                         limit: int | None = None) -> QuestionSet:
    """Multiple-choice questions from a JSONL (or JSON/Parquet) file of {question, choices, answer}, or from a list of
    such rows."""
    if isinstance(source, QuestionSet):
        qs = source
    else:
        if isinstance(source, (list, tuple)):
            bad = next((i for i, r in enumerate(source) if not isinstance(r, dict)), None)
            if bad is not None or not source:
                raise DataError("questions list: " + (f"item {bad + 1} is not a row (dict) of question, choices and answer"
                                                      if source else "empty; it needs at least one question"))
            rows, name, digest = _in_memory([dict(r) for r in source])
        else:
            rows, name, digest = read_rows(source, split=None)
        questions = [_mc_row(row, name, i) for i, row in enumerate(rows)]
        stem = Path(name).name.split(".")[0] if name != "<list>" else "questions"
        qs = QuestionSet(questions, _digest_str(digest, {"kind": "mc"}), name, stem)
    limit = _whole(limit)
    if limit is not None and limit < len(qs.questions):
        if limit < 1:
            raise DataError(f"--limit {limit} (limit=): give a positive number of questions")
        qs = QuestionSet(qs.questions[:limit], _digest_str(qs.fingerprint, {"limit": limit}), qs.source, qs.name)
    return qs


def _mc_row(row: dict, name: str, i: int) -> MCQuestion:
    where = f"{name}: row {i + 1}"
    for key in ("question", "choices", "answer"):
        if key not in row or row[key] is None:
            raise DataError(f"{where} has no {key!r} field; rows need question, choices and answer")
    q, choices, answer = row["question"], row["choices"], row["answer"]
    if not isinstance(q, str) or not q:
        raise DataError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of at least two non-empty strings")
    twice = next((c for i, c in enumerate(choices) if c in choices[:i]), None)
    if twice is not None:  # scored alike, the first copy would always win: a right answer by position, not knowledge
        raise DataError(f"{where}: the choice {twice!r} is given twice; each choice must differ from the others")
    if isinstance(answer, bool):
        raise DataError(f"{where}: 'answer' is {answer}, not an index of the choices (or the choice's text)")
    if isinstance(answer, str) and answer.isdigit():
        index, text = int(answer), list(choices).index(answer) if answer in choices else None
        if text is not None and index < len(choices) and index != text:  # "3" of ["1", "2", "3", "4"]
            raise DataError(f"{where}: 'answer' {answer!r} is both a choice's text (choice {text}) and an index "
                            f"(choice {index}); give the index as a number, e.g. \"answer\": {text}")
        answer = index if text is None else text  # "1990" of ["1989", "1990"]: only the text can be meant
    if isinstance(answer, str):
        if answer not in choices:
            raise DataError(f"{where}: 'answer' {answer!r} is not one of the choices")
        answer = list(choices).index(answer)
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(f"{where}: 'answer' must index the {len(choices)} choices (0..{len(choices) - 1}), got {answer!r}")
    return MCQuestion(q, tuple(choices), answer)


# -- reading --------------------------------------------------------------------------------------
def read_rows(source: str | os.PathLike, *, split: str | None) -> tuple[list[dict], str, str]:
    """Rows of a local file (JSONL/JSON/CSV/Parquet, optionally gzipped; parsed here) or of a hub dataset (`datasets`);
    (rows, display name, digest). Raises DataError naming the file and what is wrong."""
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"{source!r}: not a data file; give the path (a str or pathlib.Path) of a JSONL, JSON, CSV or "
                        "Parquet file" + (", or a list of rows" if isinstance(source, dict) else ""))
    path = Path(source).expanduser()
    if path.exists():
        return _read_file(path, split=split)
    if is_hub_id(source) and not names_data_file(source):  # (name.jsonl etc.: a mistyped file)
        return _read_hub(source, split=split)
    raise DataError(f"{source}: no such file (and not a hub dataset name like 'org/name'); check the path")


def _read_file(path: Path, *, split: str | None) -> tuple[list[dict], str, str]:
    """The rows of the very bytes that are fingerprinted, parsed here (JSON, JSON lines, CSV as text, Parquet):
    `datasets`' reader kept what it had read under the file's path and mtime (a file replaced with `cp -p` gave its
    old rows under the new digest), read JSON strings that look like dates as datetimes, CSV cells such as NA or an
    empty one as None, and gave up on JSON lines whose fields change after its first 10 MB."""
    import gzip

    if path.is_dir():
        raise DataError(f"{path}: is a directory; pass the data file inside it")
    suffix = path.suffix.lower()
    inner = Path(path.stem).suffix.lower() if suffix == ".gz" else suffix  # rows.csv.gz: a compressed CSV
    kind = DATA_SUFFIXES.get(inner, "json" if suffix == ".gz" else None)
    if kind is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
    raw = path.read_bytes()
    digest = _digest_bytes(raw)
    if suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: cannot be decompressed as gzip ({_short(e)}); check the file") from None
    if not raw.strip():
        raise DataError(f"{path}: the file is empty; it needs at least one row")
    if split and split != "train":
        warnings.warn(f"{path}: split={split!r} is ignored for a local file", stacklevel=4)
    rows = _json_rows(path, raw, lines=inner == ".jsonl") if kind == "json" else _table_rows(path, raw, kind)
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    return rows, str(path), digest


def jsonl_lines(path: Path, raw: bytes) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line of a JSONL file's bytes, split at newlines only (bytes.splitlines:
    str's also splits at U+2028, U+2029 and U+0085, which JSON may hold unescaped inside a string); a line that is
    not UTF-8 is a DataError naming it."""
    for i, line in enumerate(raw.splitlines()):
        if not line.strip():
            continue
        try:
            yield i + 1, line.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path}: line {i + 1} is not UTF-8 text; save the file as UTF-8") from None


def _json_rows(path: Path, raw: bytes, *, lines: bool) -> list[dict]:
    """A JSON array of objects, one object (one row), or (any JSON name, as `datasets` reads it) one object per
    line."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: is not UTF-8 text ({_short(e, 80)}); save it as UTF-8") from None
    whole = not lines or text.lstrip().startswith("[")  # a .jsonl that holds one JSON array is read as that array
    if whole:
        try:
            data = json.loads(text)
        except ValueError:
            data = None  # JSON lines under a .json name: read line by line below (which names a bad line)
        if isinstance(data, list):
            bad = next((i for i, r in enumerate(data) if not isinstance(r, dict)), None)
            if bad is not None:
                raise DataError(f"{path}: item {bad + 1} of its JSON array is a {type(data[bad]).__name__}, not an "
                                "object with named fields")
            return data
        if isinstance(data, dict):
            return [data]  # one row, as `datasets` reads a JSON object (a list value is that row's list)
    return _jsonl_rows(path, text)


def _jsonl_rows(path: Path, text: str) -> list[dict]:
    """One JSON object per line (blank lines skipped); the first bad line is named."""
    rows = []
    for i, line in enumerate(text.split("\n"), 1):  # at newlines only: U+2028 may stand inside a JSON string
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}: line {i} is not valid JSON ({_short(e, 80)}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {i} is a JSON {type(row).__name__}, not an object with named fields")
        rows.append(row)
    return rows


def _table_rows(path: Path, raw: bytes, kind: str) -> list[dict]:
    """CSV with every cell read as the text it is (an empty cell is "", NA is "NA"); Parquet as its typed rows."""
    import io

    try:
        if kind == "csv":
            import pandas as pd

            frame = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig")
            return frame.to_dict("records")
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(raw)).to_pylist()
    except Exception as e:  # pandas and pyarrow raise many kinds; the message is what matters
        raise DataError(f"{path}: cannot be read as {kind} ({type(e).__name__}: {_short(e)}); check its format") from None


def _read_hub(name: str, *, split: str | None) -> tuple[list[dict], str, str]:
    import datasets

    kwargs = dict(_HUB_DEFAULTS.get(name, {}))
    if split:
        kwargs["split"] = split
    kwargs.setdefault("split", "test")
    try:
        with quiet_datasets():
            ds = datasets.load_dataset(name, **kwargs)
    except Exception as e:
        raise DataError(
            f"{name}: not a local file, and loading it from the Hugging Face hub failed "
            f"({type(e).__name__}: {_short(e)}); download the data and pass the file path"
        ) from None
    rows = ds.to_list()
    if not rows:
        raise DataError(f"{name} (split {kwargs['split']!r}) has no rows")
    return rows, f"{name}:{kwargs['split']}", _digest_bytes(f"{name}|{kwargs}|{ds._fingerprint}".encode())


def _short(e: Exception, n: int = 200) -> str:
    s = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return s[:n]


def _digest_bytes(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def _digest_str(base: str, options: dict) -> str:
    return _digest_bytes((base + json.dumps(options, sort_keys=True)).encode())
