"""TinyDB storage for one service process: changes grouped into atomic file writes, acknowledged once on disk.

TinyDB rewrites its whole file on every change. Here changes are applied in memory at once (in call
order) and a caller's ``await`` returns only once a file holding them is on disk: written to a temp
file, fsynced and renamed over the database, so a crash (even ``kill -9``) leaves either the old or the
new database, never half of one. Writes are *grouped*: while one file write is under way, every change
made meanwhile waits for the next one, so N concurrent writers cost about two file writes, not N
(group commit). Services keep their working state in memory and write it through here before they
acknowledge anything.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

from tinydb import TinyDB
from tinydb.storages import Storage
from tinydb.table import Document

KEY = "_key"


def write_atomically(path: Path, text: str) -> None:
    """Replace *path* with *text*: temp file, fsync, rename, fsync of the directory."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AtomicJSONStorage(Storage):
    """A TinyDB storage that keeps the database in memory; :class:`Store` decides when it goes to disk."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._data: dict[str, Any] | None = None

    def read(self) -> dict[str, Any] | None:
        """Return the whole database (read from disk once)."""
        if self._data is None and self.path.exists():
            self._data = json.loads(self.path.read_text() or "{}")
        return self._data

    def write(self, data: dict[str, Any]) -> None:
        """Take TinyDB's new database (in memory only)."""
        self._data = data

    def dump(self) -> str:
        """The database as it stands, as JSON text."""
        return json.dumps(self._data or {}, separators=(",", ":"))

    def close(self) -> None:
        """Nothing to release."""


class Store:
    """Keyed documents in named tables, stored in one TinyDB file.

    Reads are served from memory. Every change returns once it is on disk; concurrent changes share
    file writes (see the module's docstring).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = TinyDB(str(path), storage=AtomicJSONStorage)
        self._storage: AtomicJSONStorage = self._db.storage  # type: ignore[assignment]
        self._lock = threading.Lock()
        self._ids: dict[str, dict[str, int]] = {}
        self._version = 0  # changes applied in memory
        self._durable = 0  # changes known to be on disk
        self._flushing: asyncio.Future[None] | None = None
        self._round: asyncio.Future[None] | None = None  # completed by the next file write
        self.file_writes = 0

    # ---- in memory ---------------------------------------------------------------------------

    def _ids_of(self, table: str) -> dict[str, int]:
        """Key -> TinyDB document id, for *table* (built on first use, kept up to date)."""
        if table not in self._ids:
            self._ids[table] = {str(doc[KEY]): doc.doc_id for doc in self._db.table(table).all()}
        return self._ids[table]

    def apply(self, table: str, docs: dict[str, dict[str, Any]], delete: tuple[str, ...] = ()) -> None:
        """Insert or replace *docs* and delete the keys *delete*, in memory (two passes over the table)."""
        docs = json.loads(json.dumps(docs))  # a private, JSON-clean copy: a bad document fails here, alone
        with self._lock:
            tbl, ids = self._db.table(table), self._ids_of(table)
            old = {k: ids.pop(k) for k in (*delete, *docs) if k in ids}
            if old:
                tbl.remove(doc_ids=list(old.values()))
            fresh = [Document({**doc, KEY: key}, doc_id=old[key]) if key in old else {**doc, KEY: key}
                     for key, doc in docs.items()]
            if fresh:
                for key, doc_id in zip(docs, tbl.insert_multiple(fresh), strict=True):
                    ids[key] = doc_id
            self._version += 1

    def _load(self, table: str) -> dict[str, dict[str, Any]]:
        with self._lock:
            out = {}
            for doc in self._db.table(table).all():
                body = dict(doc)
                out[str(body.pop(KEY))] = body
            return out

    # ---- on disk -----------------------------------------------------------------------------

    async def sync(self) -> None:
        """Return once every change applied so far is on disk (sharing file writes with other callers)."""
        target = self._version
        while self._durable < target:
            if self._flushing is None:
                self._round = asyncio.get_running_loop().create_future()
                self._flushing = asyncio.ensure_future(self._flush())
            assert self._round is not None
            await asyncio.shield(self._round)

    async def _flush(self) -> None:
        """Write the database until nothing applied is left unwritten, even if every waiter was cancelled;
        each write completes the current round and opens the next."""
        try:
            while self._durable < self._version:
                with self._lock:
                    version, text = self._version, self._storage.dump()
                await asyncio.to_thread(write_atomically, self._storage.path, text)
                self._durable = max(self._durable, version)
                self.file_writes += 1
                done, self._round = self._round, asyncio.get_running_loop().create_future()
                if done is not None:
                    done.set_result(None)
        except Exception as exc:  # the waiters of this round get the error; the next sync() tries again
            assert self._round is not None
            self._round.set_exception(exc)
            self._round.exception()  # retrieved: a round nobody waits for must not warn
        finally:
            self._flushing = None

    # ---- the API services use ----------------------------------------------------------------

    async def load(self, table: str) -> dict[str, dict[str, Any]]:
        """Return every document of *table* by key."""
        return self._load(table)

    async def put(self, table: str, key: str, doc: dict[str, Any]) -> None:
        """Insert or replace the document *key*."""
        await self.put_many(table, {key: doc})

    async def put_many(
        self, table: str, docs: dict[str, dict[str, Any]], delete: tuple[str, ...] = ()
    ) -> None:
        """Insert or replace several documents and delete others; return once that is on disk."""
        self.apply(table, docs, delete)
        await self.sync()

    async def delete(self, table: str, key: str) -> None:
        """Remove the document *key* if it exists."""
        await self.put_many(table, {}, (key,))

    def close(self) -> None:
        """Write what is not on disk yet (a change whose caller was cancelled), then close."""
        if self._durable < self._version and self._flushing is None:
            with self._lock:
                write_atomically(self._storage.path, self._storage.dump())
            self._durable = self._version
        self._db.close()
