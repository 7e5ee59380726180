"""Preference data for DPO / ORPO: read a file (or a hub dataset), normalise each row to TRL's format.

TRL's preference format is one row per pair, `{"prompt", "chosen", "rejected"}`, each either a plain
string ("standard") or a list of chat messages `[{"role", "content"}, ...]` ("conversational"). Rows
come in four shapes, recognised per row:

  explicit      prompt, chosen, rejected (strings or messages). Answers that repeat the prompt first
                (UltraFeedback-style message lists, or strings) have it removed.
  hh-rlhf       chosen, rejected only: two full transcripts "\\n\\nHuman: ...\\n\\nAssistant: ..."
                (Anthropic/hh-rlhf). The prompt is their shared prefix up to and including the last
                "\\n\\nAssistant:" in it; the answers are what follows.
  implicit      chosen, rejected only, as message lists: the prompt is their shared leading messages.
  implicit str  chosen, rejected only, as other strings: the prompt is their shared prefix.

`as_chat` turns standard rows into conversational ones (one user turn and one assistant turn, or the
turns of an HH transcript) so that a chat model is tuned on the exact text its chat template renders.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from typing import Any

from safemerge.errors import SafemergeError

Row = dict[str, Any]  # {"prompt": str | list[msg], "chosen": ..., "rejected": ...}
_HH_TURN = re.compile(r"\n\nHuman:|\n\nAssistant:")
_ASSISTANT = "\n\nAssistant:"


class PreferenceDataError(SafemergeError, ValueError):
    """A preference file is missing, empty, or lacks `chosen`/`rejected`."""


# -- reading --------------------------------------------------------------------------------------
def load_preferences(source: str | os.PathLike | list[dict], *, max_samples: int | None = None,
                     seed: int = 0, split: str = "train") -> list[Row]:
    """Preference pairs in TRL's format from a JSONL/JSON/CSV/Parquet file, a hub name, or a list of dicts.

    When `max_samples` is smaller than the data, a seeded shuffle picks which pairs are kept (files are
    often sorted by kind, e.g. all refusals first). Pairs whose two answers are equal are dropped with
    a warning. Raises PreferenceDataError naming the file and what is wrong.
    """
    if isinstance(source, list):
        rows, name = [dict(r) for r in source], "<list>"
    else:
        rows, name = _read(source, split=split)
    if not rows:
        raise PreferenceDataError(f"{name}: no rows; a preference file needs at least one pair")
    _check_columns(rows[0], name)
    pairs = [p for i, r in enumerate(rows) if (p := normalise(r, where=f"{name}: row {i + 1}")) is not None]
    if len(pairs) < len(rows):
        warnings.warn(f"{name}: dropped {len(rows) - len(pairs)} pair(s) whose chosen and rejected answers are equal",
                      stacklevel=2)
    if not pairs:
        raise PreferenceDataError(f"{name}: every pair has chosen == rejected; nothing to learn a preference from")
    if max_samples is not None:
        if max_samples < 1:
            raise PreferenceDataError(f"--max-samples {max_samples} (max_samples=): give a positive number of pairs")
        if max_samples < len(pairs):
            random.Random(f"safemerge-align:{seed}").shuffle(pairs)
            pairs = pairs[:max_samples]
    return pairs


def _read(source: str | os.PathLike, *, split: str) -> tuple[list[dict], str]:
    """The rows of a file or hub dataset, read as every data file is (safemerge.data.loaders)."""
    from safemerge.data.loaders import DataError, read_rows

    try:
        rows, name, _ = read_rows(source, split=split)
    except DataError as e:
        raise PreferenceDataError(str(e)) from None
    return rows, name


def _check_columns(row: dict, name: str) -> None:
    missing = [c for c in ("chosen", "rejected") if c not in row]
    if missing:
        raise PreferenceDataError(
            f"{name}: no {' or '.join(repr(c) for c in missing)} column (columns: {', '.join(sorted(row)) or 'none'}); "
            "a preference file needs 'chosen' and 'rejected' (and 'prompt', unless they are full HH-RLHF transcripts)")


# -- one row --------------------------------------------------------------------------------------
def normalise(row: dict, *, where: str = "row") -> Row | None:
    """One row as {prompt, chosen, rejected} in TRL's format (see the module docstring); None when the
    two answers are equal. Raises PreferenceDataError (naming `where`) for an empty or malformed field."""
    chosen, rejected = _field(row, "chosen", where), _field(row, "rejected", where)
    if chosen == rejected:  # a tie teaches no preference: dropped (and counted by the caller), in every form
        return None
    prompt = row.get("prompt")
    if prompt is None or prompt == "":
        if isinstance(chosen, str) and isinstance(rejected, str):
            try:
                prompt, chosen, rejected = (split_hh(chosen, rejected) if _is_hh(chosen) and _is_hh(rejected)
                                            else _split_prefix(chosen, rejected))
            except PreferenceDataError as e:
                raise PreferenceDataError(f"{where}: {e}") from None
        elif isinstance(chosen, list) and isinstance(rejected, list):
            n = _common_messages(chosen, rejected)
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        else:
            raise PreferenceDataError(f"{where}: 'chosen' and 'rejected' must both be strings or both message lists")
    else:
        prompt = _field(row, "prompt", where)
        if isinstance(chosen, list) != isinstance(rejected, list):
            raise PreferenceDataError(f"{where}: 'chosen' and 'rejected' must both be strings or both message lists")
        if isinstance(chosen, list):
            prompt = _user(prompt) if isinstance(prompt, str) else prompt
            chosen, rejected = _drop_prefix(chosen, prompt), _drop_prefix(rejected, prompt)
        elif isinstance(prompt, list):
            chosen, rejected = _assistant(chosen), _assistant(rejected)
        elif chosen.startswith(prompt) and rejected.startswith(prompt):  # answers that repeat the prompt
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]  # (the leading space kept, as in split_hh)
    if not chosen or not rejected:
        raise PreferenceDataError(f"{where}: an answer is empty once the prompt is taken out; check 'chosen'/'rejected'")
    if chosen == rejected:
        return None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _field(row: dict, key: str, where: str) -> str | list[dict]:
    value = row.get(key)
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise PreferenceDataError(f"{where}: {key!r} must be a non-empty string or a list of "
                              f"{{'role', 'content'}} messages, got "
                              f"{'an empty string' if isinstance(value, str) else type(value).__name__}")


def _is_hh(text: str) -> bool:
    return _ASSISTANT in text and "Human:" in text


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH-RLHF transcripts into (prompt, chosen answer, rejected answer).

    The prompt is the shared prefix cut after its last "\\n\\nAssistant:" (so it ends where the final
    answers begin); each answer is the rest, its leading space kept: TRL tokenizes a plain prompt and its answer
    apart, so " Sure" keeps the token it has after "Assistant:" in the transcript (`as_chat` strips it for a chat).
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = chosen[:n].rfind(_ASSISTANT)
    if cut < 0:
        raise PreferenceDataError("HH-RLHF transcripts share no '\\n\\nAssistant:' turn; they are not two answers "
                                  "to one conversation")
    end = cut + len(_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def _split_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """The shared prefix as the prompt, cut back to a word boundary (the answers may begin with the same words,
    and a cut inside a word would put half of it into the prompt)."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    while n > 0 and not (_word_boundary(chosen, n) and _word_boundary(rejected, n)):
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _word_boundary(text: str, n: int) -> bool:
    return n == 0 or n == len(text) or text[n - 1].isspace() or text[n].isspace()


def _common_messages(a: list[dict], b: list[dict]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _drop_prefix(messages: list[dict], prompt: list[dict]) -> list[dict]:
    return messages[len(prompt):] if messages[: len(prompt)] == prompt else messages


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# -- chat form ------------------------------------------------------------------------------------
def is_chat(row: Row) -> bool:
    return isinstance(row["chosen"], list)


def hh_to_messages(text: str) -> list[dict]:
    """An HH transcript ("\\n\\nHuman: a\\n\\nAssistant: b ...") as messages; a trailing empty
    "Assistant:" (the generation prompt) is dropped. Text before the first turn is ignored."""
    marks = list(_HH_TURN.finditer(text))
    out = []
    for m, nxt in zip(marks, marks[1:] + [None]):
        content = text[m.end(): nxt.start() if nxt else len(text)].strip()
        role = "user" if "Human" in m.group() else "assistant"
        if content or role == "user":
            out.append({"role": role, "content": content})
    return out


def as_chat(row: Row) -> Row:
    """A standard row as a conversational one: the prompt as user turn(s), each answer as one
    assistant turn. HH transcripts become their turns; rows already in chat form pass through."""
    if is_chat(row):
        return row
    prompt = row["prompt"]
    messages = hh_to_messages(prompt) if _is_hh(prompt) else _user(prompt.strip())
    return {"prompt": messages, "chosen": _assistant(row["chosen"].strip()),
            "rejected": _assistant(row["rejected"].strip())}
