"""The results store: one SQLite file where every evaluation lands, so asking again is a lookup.

Place: `$SAFEMERGE_HOME/results.sqlite` when SAFEMERGE_HOME is set, else `./.safemerge/results.sqlite`
in the working directory (the workspace). Pass `store=` to any evaluation function to use another file.

A result is keyed by what determines it:

    key = blake2b(json({kind, model fingerprint, data fingerprint, judge, settings}))

where the model fingerprint is `Checkpoint(path).fingerprint()` (a hash of the weight files), the data
fingerprint is the loader's (file bytes + loading options), `judge` names the judge and its own model's
fingerprint, and `settings` holds everything else that changes the numbers (generation settings, chat
template, prompt format, dtype). Bulky by-products (the responses and verdicts of a safety run) are kept
beside the result as a compressed blob, so a cache hit can still write them out.

Concurrency: WAL journal mode, a busy timeout, and writes in `BEGIN IMMEDIATE` transactions; every call
opens its own short-lived connection, so any number of processes may read and write at once. (SQLite's
WAL needs a local filesystem: keep the store off NFS.)
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from safemerge.errors import SafemergeError

STORE_NAME = "results.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key        TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    model      TEXT NOT NULL,
    data       TEXT NOT NULL,
    judge      TEXT NOT NULL,
    settings   TEXT NOT NULL,
    result     TEXT NOT NULL,
    artifact   BLOB,
    created    REAL NOT NULL,
    version    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_model ON results (model);
CREATE TABLE IF NOT EXISTS fingerprints (
    signature  TEXT PRIMARY KEY,
    digest     TEXT NOT NULL
);
"""


def default_store_path() -> Path:
    """$SAFEMERGE_HOME/results.sqlite, else ./.safemerge/results.sqlite."""
    home = os.environ.get("SAFEMERGE_HOME")
    root = Path(home).expanduser() if home else Path.cwd() / ".safemerge"
    return root / STORE_NAME


def result_key(kind: str, *, model: str, data: str, judge: str = "", settings: dict | None = None) -> str:
    """The store key: a hash of everything that determines a result (settings are JSON-canonicalised)."""
    ident = {"kind": kind, "model": model, "data": data, "judge": judge, "settings": settings or {}}
    return hashlib.blake2b(_canon(ident).encode(), digest_size=16).hexdigest()


class ResultsStore:
    """A SQLite results database (see the module docstring for the key and the concurrency rules)."""

    def __init__(self, path: str | os.PathLike | None = None, *, timeout: float = 60.0):
        self.path = Path(path).expanduser() if path is not None else default_store_path()
        self.timeout = timeout
        self._ready = False

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.path)!r})"

    # -- reading ------------------------------------------------------------------------------------
    def get(self, key: str) -> dict | None:
        """The stored result for `key`, or None."""
        if not self.path.exists():
            return None
        with self._connect() as db:
            row = db.execute("SELECT result FROM results WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def artifact(self, key: str) -> bytes | None:
        """The by-product stored with `key` (decompressed), or None."""
        if not self.path.exists():
            return None
        with self._connect() as db:
            row = db.execute("SELECT artifact FROM results WHERE key = ?", (key,)).fetchone()
        return zlib.decompress(row[0]) if row and row[0] is not None else None

    def rows(self, *, kind: str | None = None, model: str | None = None) -> list[dict]:
        """Every stored result (newest first), optionally of one kind and/or one model fingerprint."""
        if not self.path.exists():
            return []
        sql, args = "SELECT key, kind, model, data, judge, settings, result, created FROM results", []
        where = [(c, v) for c, v in (("kind", kind), ("model", model)) if v is not None]
        if where:
            sql += " WHERE " + " AND ".join(f"{c} = ?" for c, _ in where)
            args = [v for _, v in where]
        with self._connect() as db:
            out = db.execute(sql + " ORDER BY created DESC", args).fetchall()
        cols = ("key", "kind", "model", "data", "judge", "settings", "result", "created")
        rows = [dict(zip(cols, r)) for r in out]
        for r in rows:
            r["settings"], r["result"] = json.loads(r["settings"]), json.loads(r["result"])
        return rows

    # -- writing ------------------------------------------------------------------------------------
    def put(
        self,
        key: str,
        result: dict,
        *,
        kind: str,
        model: str,
        data: str,
        judge: str = "",
        settings: dict | None = None,
        artifact: bytes | None = None,
    ) -> None:
        """Store (or replace) a result; `artifact` is compressed and kept beside it."""
        from safemerge import __version__

        blob = zlib.compress(artifact, 6) if artifact is not None else None
        row = (key, kind, model, data, judge, _canon(settings or {}), _canon(result), blob, time.time(), __version__)
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            db.execute("COMMIT")

    def writable(self) -> bool:
        """Whether this process may write the store (a missing one: whether it may be made)."""
        if self.path.exists():
            return os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)
        folder = next((p for p in self.path.parents if p.exists()), None)
        return folder is None or os.access(folder, os.W_OK)

    def fingerprint(self, path: str | os.PathLike, *, allow_pickle: bool = False, remember: bool = True) -> str:
        """The fingerprint of a model folder or `model+adapter` reference, remembered under its weight files'
        (path, size, mtime): a model that has not changed is not hashed again, so a repeated evaluation is a lookup.
        `remember=False` looks up but writes nothing (a dry run); a missing store file is then not created."""
        from safemerge.lora import open_model

        ck = open_model(str(path), allow_pickle=allow_pickle)
        stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in ck.source_files()]
        signature = hashlib.blake2b(_canon(stats).encode(), digest_size=16).hexdigest()
        if remember or self.path.exists():
            with self._connect() as db:
                row = db.execute("SELECT digest FROM fingerprints WHERE signature = ?", (signature,)).fetchone()
            if row:
                return row[0]
        digest = ck.fingerprint()
        if not remember or not self.writable():  # a read-only store is read, not refused, for want of a cache row
            return digest
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT OR REPLACE INTO fingerprints VALUES (?, ?)", (signature, digest))
            db.execute("COMMIT")
        return digest

    def delete(self, key: str) -> None:
        if not self.path.exists():
            return
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM results WHERE key = ?", (key,))
            db.execute("COMMIT")

    # -- plumbing -----------------------------------------------------------------------------------
    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        read_only = not self.writable()
        try:
            if read_only:  # a teammate's store, a read-only share: read it as it is (no WAL switch, no schema)
                db = _open_read_only(self.path, self.timeout)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise SafemergeError(f"{self.path}: cannot open the results store ({e}); check the path or SAFEMERGE_HOME") from None
        try:
            db.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            if not self._ready and not read_only:
                _set_wal(db, self.timeout)
                db.execute("BEGIN IMMEDIATE")
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(stmt)
                db.execute("COMMIT")
                self._ready = True
            yield db
        except sqlite3.DatabaseError as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if read_only:
                raise SafemergeError(f"{self.path}: the results store can be read but not written here (its file or "
                                     f"folder is read-only: {e}); pass --store (store=) with a file you may write, or "
                                     "copy this one") from None
            raise SafemergeError(f"{self.path}: results store error ({e}); move the file aside to start a new store") from None
        finally:
            db.close()


def _open_read_only(path: Path, timeout: float) -> sqlite3.Connection:
    """A connection that writes nothing: `mode=ro`, else (a WAL store in a folder where SQLite may not make its
    shared-memory file) `immutable=1`."""
    from urllib.parse import quote

    uri = f"file:{quote(str(path.absolute()))}"
    try:
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=timeout, isolation_level=None)
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.OperationalError:
        return sqlite3.connect(f"{uri}?immutable=1", uri=True, timeout=timeout, isolation_level=None)


def _set_wal(db: sqlite3.Connection, timeout: float) -> None:
    """Switch to WAL. SQLite can answer "database is locked" here at once, without its busy handler, while another
    process creates the same new store; retry until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def open_store(store: ResultsStore | str | os.PathLike | None) -> ResultsStore:
    """A ResultsStore from an instance, a path, or None (the default place)."""
    return store if isinstance(store, ResultsStore) else ResultsStore(store)


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
