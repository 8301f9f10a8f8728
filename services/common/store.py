"""TinyDB storage for one service process, written atomically and used through an async adapter.

Every write goes to a temporary file, is fsynced and renamed over the database, so a crash (even
``kill -9``) leaves either the old or the new database, never half of one. Services keep their working
state in memory and write it through here before they acknowledge anything.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

from tinydb import Query, TinyDB
from tinydb.storages import Storage

KEY = "_key"


class AtomicJSONStorage(Storage):
    """A TinyDB storage that keeps the data in memory and replaces the file atomically on each write."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)
        self._data: dict[str, Any] | None = None

    def read(self) -> dict[str, Any] | None:
        """Return the whole database (read from disk once)."""
        if self._data is None and self._path.exists():
            text = self._path.read_text() or "{}"
            self._data = json.loads(text)
        return self._data

    def write(self, data: dict[str, Any]) -> None:
        """Write the whole database to a temp file, fsync it and rename it into place."""
        tmp = self._path.with_suffix(self._path.suffix + ".tmp")
        with open(tmp, "w") as handle:
            json.dump(data, handle, separators=(",", ":"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self._path)
        dir_fd = os.open(self._path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._data = data

    def close(self) -> None:
        """Nothing to release: every write is already on disk."""


class Store:
    """Keyed documents in named tables, stored in one TinyDB file; every call runs off the event loop."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = TinyDB(str(path), storage=AtomicJSONStorage)
        self._lock = threading.Lock()

    def _put_many(self, table: str, docs: dict[str, dict[str, Any]], delete: tuple[str, ...]) -> None:
        with self._lock:
            tbl = self._db.table(table)
            gone = [*delete, *docs]
            if gone:
                tbl.remove(Query()[KEY].one_of(gone))
            if docs:
                tbl.insert_multiple({**doc, KEY: key} for key, doc in docs.items())

    def _load(self, table: str) -> dict[str, dict[str, Any]]:
        with self._lock:
            out = {}
            for doc in self._db.table(table).all():
                body = dict(doc)
                out[str(body.pop(KEY))] = body
            return out

    async def load(self, table: str) -> dict[str, dict[str, Any]]:
        """Return every document of *table* by key."""
        return await asyncio.to_thread(self._load, table)

    async def put(self, table: str, key: str, doc: dict[str, Any]) -> None:
        """Insert or replace the document *key*."""
        await asyncio.to_thread(self._put_many, table, {key: doc}, ())

    async def put_many(
        self, table: str, docs: dict[str, dict[str, Any]], delete: tuple[str, ...] = ()
    ) -> None:
        """Insert or replace several documents and delete others, in two file writes whatever their number."""
        await asyncio.to_thread(self._put_many, table, docs, delete)

    async def delete(self, table: str, key: str) -> None:
        """Remove the document *key* if it exists."""
        await asyncio.to_thread(self._put_many, table, {}, (key,))

    def close(self) -> None:
        """Close the database."""
        self._db.close()
