"""TinyDB storage for one service process: a snapshot plus an append-only journal; changes acknowledged once on disk.

The database is a TinyDB JSON file (the *snapshot*) and ``<file>.journal`` beside it, one JSON line per
group of changes (per table: the documents set and the ids deleted, by TinyDB document id). Changes edit
TinyDB's tables in memory at once, in call order, at the cost of their own size; a caller's ``await``
returns once a journal line holding them is fsynced. While one append is under way, every change made
meanwhile waits for the next one, so N concurrent writers cost about two appends (group commit).
Opening reads the snapshot and replays the journal. Only the last line may be torn (a crash mid-append);
it is dropped, so a ``kill -9`` leaves a prefix of the changes, never half of one. Once the journal
outgrows the snapshot (and :data:`JOURNAL_MIN`), the snapshot is rewritten (dumped in memory; temp file,
fsync and rename in a thread) and the journal emptied; ``close()`` does the same, so a closed database
is one plain TinyDB file, while an open one's file may lag its journal. A crash between the rename and
the emptying loses nothing: a line sets or deletes whole documents by id, so replaying lines the
snapshot already holds changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from tinydb import TinyDB
from tinydb.storages import Storage

from services.common.private import FILE_MODE, private_dir, private_opener

log = logging.getLogger(__name__)

KEY = "_key"
JOURNAL_MIN = 1 << 20  # bytes: a smaller journal is never compacted
Data = dict[str, dict[str, dict[str, Any]]]  # TinyDB's raw tables: name -> document id -> document
Change = tuple[str, dict[str, dict[str, Any]], list[str]]  # table, documents set by id, ids deleted


class JournalError(ValueError):
    """A journal line other than the last cannot be read: the journal is damaged, not just torn."""


# ---- the files (no asyncio: each is a plain function) ------------------------------------------


def journal_of(path: Path) -> Path:
    """The journal beside the snapshot *path*."""
    return path.with_name(path.name + ".journal")


def fsync_dir(path: Path) -> None:
    """Make the directory entries of *path*'s directory durable."""
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_atomically(path: Path, text: str) -> None:
    """Replace *path* with *text*: temp file, fsync, rename, fsync of the directory."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", opener=private_opener) as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path)


def append_line(path: Path, line: bytes, keep: int | None = None) -> None:
    """Append *line* to *path* and fsync it, first cutting the file back to *keep* bytes if given."""
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    try:
        if keep is not None:
            os.ftruncate(fd, keep)
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path)


def empty_journal(path: Path) -> None:
    """Cut the journal of the snapshot *path* to nothing (durably), if it exists."""
    journal = journal_of(path)
    if journal.exists():
        with open(journal, "r+b") as handle:
            handle.truncate(0)
            os.fsync(handle.fileno())


def encode_line(changes: list[str]) -> bytes:
    """One journal line from changes already encoded by :func:`encode_change`."""
    return f"[{','.join(changes)}]\n".encode()


def encode_change(table: str, docs: dict[str, dict[str, Any]], deleted: list[str]) -> str:
    """One change as JSON: the documents set by id and the ids deleted, in *table*."""
    return json.dumps([table, docs, deleted], separators=(",", ":"))


def parse_line(raw: bytes) -> list[Change]:
    """The changes of one journal line; ValueError if it is not one."""
    changes = json.loads(raw)
    if not isinstance(changes, list):
        raise ValueError("not a list of changes")
    out: list[Change] = []
    for change in changes:
        if not (isinstance(change, list) and len(change) == 3 and isinstance(change[0], str)
                and isinstance(change[1], dict) and isinstance(change[2], list)):
            raise ValueError(f"not a change: {str(change)[:80]}")
        out.append((change[0], change[1], change[2]))
    return out


def read_journal(path: Path) -> tuple[list[Change], int, int]:
    """The changes of the journal *path* in order, the bytes that hold them and the file's size.

    A last line that cannot be read (no newline, half written, zeros) is dropped; any other raises
    :class:`JournalError`.
    """
    if not path.exists():
        return [], 0, 0
    data = path.read_bytes()
    lines = data.split(b"\n")  # the last piece is b"" when the file ends with a newline
    changes: list[Change] = []
    good = 0
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            good += len(raw) + (number < len(lines))
            continue
        try:
            if number == len(lines):
                raise ValueError("no newline")
            changes.extend(parse_line(raw))
        except ValueError as exc:
            if not any(rest.strip() for rest in lines[number:]):
                log.warning("%s: dropping its torn last line (%d bytes): %s", path, len(raw), exc)
                break
            raise JournalError(f"{path}: line {number} of {len(lines) - 1} is damaged ({exc}) and is not the "
                               f"last; the store will not open until it is repaired or the journal "
                               f"is cut before it (losing the later changes)") from exc
        good += len(raw) + 1
    return changes, good, len(data)


def replay(data: Data, changes: list[Change]) -> None:
    """Apply journal *changes* to TinyDB's raw tables *data*, in order."""
    for table, docs, deleted in changes:
        raw = data.setdefault(table, {})
        for doc_id in deleted:
            raw.pop(doc_id, None)
        raw.update(docs)


def read_snapshot(path: Path) -> tuple[Data, int]:
    """The tables of the TinyDB file *path* (empty if there is none) and its size in bytes."""
    if not path.exists():
        return {}, 0
    raw = path.read_bytes()
    return json.loads(raw or b"{}"), len(raw)


def dump(data: Data) -> str:
    """TinyDB's raw tables as the text of a TinyDB JSON file."""
    return json.dumps(data, separators=(",", ":"))


def compact(path: Path, text: str) -> None:
    """Replace the snapshot *path* with *text* (the database as of the journal's end), then empty the journal."""
    write_atomically(path, text)
    empty_journal(path)


class MemoryStorage(Storage):
    """A TinyDB storage over tables held in memory; :class:`Store` edits them and writes them out."""

    def __init__(self, data: Data) -> None:
        self.data = data

    def read(self) -> Data:
        """The whole database."""
        return self.data

    def write(self, data: Data) -> None:
        """Take TinyDB's new database (in memory only)."""
        self.data = data

    def close(self) -> None:
        """Nothing to release."""


class Store:
    """Keyed documents in named tables, stored as one TinyDB file and its journal.

    Reads are served from memory. Every change returns once it is on disk; concurrent changes share
    appends (see the module's docstring). ``file_writes`` counts journal appends and snapshot rewrites,
    ``bytes_written`` the bytes they wrote, ``write_seconds`` the time they took (mostly fsync).
    """

    def __init__(self, path: Path, *, journal_min: int = JOURNAL_MIN) -> None:
        private_dir(path.parent)
        self.path, self.journal, self.journal_min = path, journal_of(path), journal_min
        data, self._snapshot_size = read_snapshot(path)
        changes, self._journal_size, size = read_journal(self.journal)
        replay(data, changes)
        self._db = TinyDB(data, storage=MemoryStorage)
        self._storage: MemoryStorage = self._db.storage  # type: ignore[assignment]
        self._lock = threading.Lock()  # the tables in memory
        self._io = threading.Lock()  # the files: a thread's append or compaction, or close()
        self._ids: dict[str, dict[str, str]] = {}
        self._next_id: dict[str, int] = {}
        self._pending: list[str] = []  # encoded changes not yet handed to an append
        self._version = 0  # changes applied in memory
        self._durable = 0  # changes known to be on disk
        self._snapshot_version = 0  # changes the snapshot holds (0: those of earlier runs)
        self._torn = size > self._journal_size  # cut the journal back to its good lines before appending
        self._flushing: asyncio.Future[None] | None = None
        self._round: asyncio.Future[None] | None = None  # completed by the next append
        self.file_writes = 0
        self.bytes_written = 0
        self.write_seconds = 0.0

    # ---- in memory ---------------------------------------------------------------------------

    def _ids_of(self, table: str) -> dict[str, str]:
        """Key -> TinyDB document id, for *table* (built on first use, kept up to date)."""
        if table not in self._ids:
            raw = self._storage.data.get(table, {})
            self._ids[table] = {str(doc[KEY]): doc_id for doc_id, doc in raw.items()}
            self._next_id[table] = max(map(int, raw), default=0) + 1
        return self._ids[table]

    def apply(self, table: str, docs: dict[str, dict[str, Any]], delete: tuple[str, ...] = ()) -> None:
        """Insert or replace *docs* and delete the keys *delete*, in memory (costs the size of the change)."""
        docs = json.loads(json.dumps(docs))  # a private, JSON-clean copy: a bad document fails here, alone
        with self._lock:
            ids, data = self._ids_of(table), self._storage.data
            deleted = [ids.pop(key) for key in dict.fromkeys(delete) if key in ids and key not in docs]
            for doc_id in deleted:
                del data[table][doc_id]
            put: dict[str, dict[str, Any]] = {}
            for key, doc in docs.items():
                if key not in ids:
                    ids[key] = str(self._next_id[table])
                    self._next_id[table] += 1
                put[ids[key]] = {**doc, KEY: key}
            if put:
                data.setdefault(table, {}).update(put)
            self._pending.append(encode_change(table, put, deleted))
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
        """Return once every change applied so far is on disk (sharing appends with other callers)."""
        target = self._version
        while self._durable < target:
            if self._flushing is None:
                self._round = asyncio.get_running_loop().create_future()
                self._flushing = asyncio.ensure_future(self._flush())
            assert self._round is not None
            await asyncio.shield(self._round)

    async def _flush(self) -> None:
        """Append until nothing applied is left unwritten, even if every waiter was cancelled; each append
        completes the current round and opens the next; a journal grown past its bound is compacted after
        the append that grew it."""
        try:
            while self._durable < self._version:
                with self._lock:
                    version, changes, self._pending = self._version, self._pending, []
                    line = encode_line(changes)
                    due = self._journal_size + len(line) > max(self.journal_min, self._snapshot_size)
                    text = dump(self._storage.data) if due else None  # as of the end of *line*
                try:
                    await asyncio.to_thread(self._append, line, version)
                except BaseException:
                    with self._lock:  # appended again by the next round (a line twice in a row is harmless)
                        self._pending[:0] = changes
                    raise
                self._durable = max(self._durable, version)
                done, self._round = self._round, asyncio.get_running_loop().create_future()
                if done is not None:
                    done.set_result(None)
                if text is not None:
                    try:
                        await asyncio.to_thread(self._compact, text, version)
                    except OSError as exc:  # the journal still holds everything; the next append retries
                        log.warning("%s: compaction failed: %s", self.path, exc)
        except Exception as exc:  # the waiters of this round get the error; the next sync() tries again
            assert self._round is not None
            self._round.set_exception(exc)
            self._round.exception()  # retrieved: a round nobody waits for must not warn
        finally:
            self._flushing = None

    def _append(self, line: bytes, version: int) -> None:
        """Append *line* (the changes up to *version*) to the journal, unless a snapshot holds them already."""
        with self._io:
            if version <= self._snapshot_version:
                return
            keep, self._torn = (self._journal_size if self._torn else None), True
            began = time.perf_counter()
            append_line(self.journal, line, keep)
            self.write_seconds += time.perf_counter() - began
            self._torn = False
            self._journal_size += len(line)
            self.file_writes += 1
            self.bytes_written += len(line)

    def _compact(self, text: str, version: int) -> None:
        """Write *text* (the database as of *version*) as the snapshot and empty the journal."""
        with self._io:
            if version <= self._snapshot_version:
                return
            began = time.perf_counter()
            compact(self.path, text)
            self.write_seconds += time.perf_counter() - began
            self._snapshot_version, self._snapshot_size = version, len(text.encode())
            self._journal_size, self._torn = 0, False
            self.file_writes += 1
            self.bytes_written += self._snapshot_size

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
        """Write everything (a change whose caller was cancelled too) as one TinyDB file, then close."""
        with self._io:
            with self._lock:
                version, text = self._version, dump(self._storage.data)
                self._pending = []
            if self._journal_size or self._torn or self.journal.exists() or self._durable < version:
                write_atomically(self.path, text)
                self.journal.unlink(missing_ok=True)
                fsync_dir(self.path)
                self._snapshot_version, self._snapshot_size = version, len(text.encode())
                self._journal_size, self._torn = 0, False
            self._durable = max(self._durable, version)
        self._db.close()
