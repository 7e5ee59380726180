"""The search journal: every scored candidate in SQLite, written before the next one is scored.

A search is a deterministic function of its inputs (config, data, optimizer options, seed) and of the
scores it has seen, so resuming is replay: the optimizer runs again from the start, and each candidate
it proposes that the journal already holds (same position in the sequence, same config) takes the
journaled scores instead of being scored again. A resumed run therefore proposes exactly the
candidates of an uninterrupted one and ends with the same best candidate.

Tables:
    meta(key TEXT PRIMARY KEY, value TEXT)     identity (JSON of what defines the run) and its hash
    candidates(idx INTEGER PRIMARY KEY,        position in the sequence of proposed candidates
               params TEXT, config TEXT,       the searched numbers and the whole merge config (JSON)
               safety_loss REAL, domain_loss REAL, objective REAL,   NaN is stored as NULL
               seconds REAL, created TEXT)     scoring time and UTC time of writing
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import math
import sqlite3
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safemerge.errors import ConfigError, OutputExistsError
from safemerge.search.objective import Score, sort_key

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    idx INTEGER PRIMARY KEY, params TEXT NOT NULL, config TEXT NOT NULL,
    safety_loss REAL, domain_loss REAL, objective REAL, seconds REAL NOT NULL, created TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Entry:
    """One journaled candidate."""

    idx: int
    params: dict[str, Any]
    config: dict[str, Any]
    score: Score
    seconds: float
    created: str


def canonical(obj: Any) -> str:
    """The JSON text used for storing and comparing (sorted keys; floats round-trip exactly)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _is_journal(path: Path) -> bool:
    """An SQLite file with no tables but a journal's (an empty file too: SQLite makes a database of it). Another
    program's database is not one, so --resume never adds tables to it and --overwrite never deletes it."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    if head == b"":
        return True
    if head != b"SQLite format 3\x00":
        return False
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return False
    return tables <= {"meta", "candidates"}


class Journal:
    """An open journal file. Use `Journal.open(...)`; close it (or use it as a context manager)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, *, created: bool = False, lock: int | None = None):
        self.path = path
        self._conn = conn
        self._lock = lock  # a file descriptor holding an exclusive flock on the journal while this run uses it
        self.created = created  # this run made the file (it was not there, or --overwrite removed it)
        self._rows: dict[int, Entry] = {e.idx: e for e in self._read()}

    @classmethod
    def open(cls, path: str | Path, *, identity: dict[str, Any], resume: bool = False, overwrite: bool = False,
             free: tuple[str, ...] = ()) -> "Journal":
        """Open the journal at `path` for a run defined by `identity`.

        Without `resume`, an existing journal is an error unless `overwrite` (which starts it afresh).
        With `resume`, an existing journal must have been written for the same identity, except for the keys
        named in `free`, which only decide where a run stops (a CMA-ES run's number of generations: its first
        generations do not depend on how many follow, so a journal of any length is a prefix of the run with
        any other); the journal then takes the new identity.
        """
        path = Path(path).expanduser()
        if path.is_dir():
            raise ConfigError(f"{path}: is a directory; --journal names the journal file")
        if path.exists() and not _is_journal(path):
            raise ConfigError(f"{path}: is not a search journal (not an SQLite file, or one with other tables); it is "
                              "left alone: name a new file with --journal, or remove this one")
        held = _lock(path) if path.exists() else None  # another search using it: refused before anything changes
        if path.exists() and not resume:
            if not overwrite:
                _unlock(held)
                raise OutputExistsError(f"{path}: a search journal is already there; pass --resume to continue that "
                                        "search, or --overwrite to start it again")
            _remove(path)
            _unlock(held)
            held = None
        if resume and not path.exists():
            warnings.warn(f"{path}: no search journal to resume; the search starts from the beginning (a journal sits "
                          "beside the output as OUT.journal.sqlite unless --journal names another)", UserWarning, stacklevel=3)
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        conn = None
        try:
            conn = sqlite3.connect(path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")  # (the file exists from here on)
            held = held if held is not None else _lock(path)
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            return cls._checked(path, conn, identity, free, created=created, lock=held)
        except BaseException as e:  # another search's journal, a damaged one: neither connection nor lock is kept
            if conn is not None:
                conn.close()
            _unlock(held)
            if isinstance(e, sqlite3.DatabaseError):
                raise ConfigError(f"{path}: cannot be opened as a search journal ({e}); name another file with "
                                  "--journal") from None
            raise

    @classmethod
    def _checked(cls, path: Path, conn: sqlite3.Connection, identity: dict[str, Any], free: tuple[str, ...], *,
                 created: bool, lock: int | None) -> "Journal":
        text = canonical(identity)
        digest = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
        got = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if not got:
            with conn:
                conn.execute("BEGIN")
                conn.executemany("INSERT INTO meta VALUES (?, ?)", [("identity", text), ("hash", digest)])
        elif got.get("hash") != digest:
            old = json.loads(got.get("identity", "{}"))
            diff = sorted(k for k in set(old) | set(identity) if canonical(old.get(k)) != canonical(identity.get(k)))
            free = (*free, *(k for k in diff if k not in old))  # a key added since a journal was written (model_config)
            if diff and all(k in free for k in diff):
                with conn:
                    conn.execute("BEGIN")
                    conn.executemany("UPDATE meta SET value = ? WHERE key = ?", [(text, "identity"), (digest, "hash")])
                return cls(path, conn, created=created, lock=lock)
            fixed = [k for k in diff if k not in free]  # a free key (CMA-ES's steps) that also changed is no cause
            raise ConfigError(f"{path}: this journal belongs to a different search (it differs in: {', '.join(fixed)}); "
                              "resume with the same config, data and options, or start afresh with --overwrite (without --resume)")
        return cls(path, conn, created=created, lock=lock)

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """Close; a journal this run created and that holds no candidate is removed when the run fails (it
        would only make the corrected rerun ask for --resume or --overwrite)."""
        empty = len(self) == 0
        self.close()
        if exc_type is not None and self.created and empty:
            _remove(self.path)

    def close(self) -> None:
        self._conn.close()
        _unlock(self._lock)
        self._lock = None

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, idx: int) -> Entry | None:
        return self._rows.get(idx)

    def entries(self) -> list[Entry]:
        return [self._rows[i] for i in sorted(self._rows)]

    def append(self, idx: int, *, params: dict[str, Any], config: dict[str, Any], score: Score, seconds: float) -> Entry:
        """Write one candidate (committed and synced before returning)."""
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self._conn:
            self._conn.execute("BEGIN")
            self._conn.execute("INSERT INTO candidates VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               (idx, canonical(params), canonical(config), _real(score.safety), _real(score.domain),
                                _real(score.objective), seconds, created))  # NaN (a candidate whose loss is not a number) as NULL
        entry = Entry(idx, params, config, score, seconds, created)
        self._rows[idx] = entry
        return entry

    def best(self) -> Entry | None:
        """The entry with the lowest objective (the earliest among equals; NaN last)."""
        entries = self.entries()
        return min(entries, key=lambda e: (sort_key(e.score.objective), e.idx)) if entries else None

    def _read(self) -> list[Entry]:
        rows = self._conn.execute("SELECT idx, params, config, safety_loss, domain_loss, objective, seconds, created "
                                  "FROM candidates ORDER BY idx").fetchall()
        return [Entry(i, json.loads(p), json.loads(c), Score(_float(s), _float(d), _float(o)), sec, cr)
                for i, p, c, s, d, o, sec, cr in rows]


def _real(x: float) -> float | None:
    return None if math.isnan(x) else x


def _float(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _lock(path: Path) -> int | None:
    """An exclusive, non-blocking flock on the journal file (None where the platform has none); a ConfigError when
    another search holds it: two searches appending to one journal collided, and --overwrite deleted a live one."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # a file system without flock (ENOLCK): run unlocked
            return None
        raise ConfigError(f"{path}: another search is using this journal; wait for it to finish (or stop it), or give "
                          "this search another OUT or --journal") from None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases its flock


def _remove(path: Path) -> None:
    """The journal and SQLite's write-ahead log and shared-memory files beside it."""
    for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        f.unlink(missing_ok=True)
