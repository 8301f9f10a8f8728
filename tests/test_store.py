"""TinyDB store: a snapshot and a journal, group commit, survives a crash mid-way, keyed tables."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tinydb import TinyDB

from services.common.store import Data, JournalError, Store, journal_of, read_journal, read_snapshot, replay

ROOT = Path(__file__).resolve().parents[1]


def on_disk(path: Path) -> Data:
    """What the files hold: the snapshot with the journal replayed over it (no Store involved)."""
    data, _ = read_snapshot(path)
    replay(data, read_journal(journal_of(path))[0])
    return data


async def test_put_load_delete(tmp_path: Path) -> None:
    """Documents are kept by key, replaced, deleted, and read back by a new Store."""
    store = Store(tmp_path / "db.json")
    await store.put("t", "a", {"x": 1})
    await store.put("t", "a", {"x": 2})
    await store.put_many("t", {"b": {"x": 3}, "c": {"x": 4}}, delete=("a",))
    await store.delete("t", "c")
    store.close()
    again = Store(tmp_path / "db.json")
    assert await again.load("t") == {"b": {"x": 3}}
    assert await again.load("empty") == {}


def test_kill_during_writes_never_leaves_half_a_database(tmp_path: Path) -> None:
    """SIGKILL in the middle of a write storm leaves a readable database with every acknowledged write."""
    script = f"""
import asyncio, os, signal
from pathlib import Path
from services.common.store import Store
async def main():
    store = Store(Path({str(tmp_path / 'db.json')!r}))
    for i in range(10_000):
        await store.put("t", f"k{{i}}", {{"i": i, "pad": "x" * 200}})
        if i == 150:
            os.kill(os.getpid(), signal.SIGKILL)
asyncio.run(main())
"""
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=False)
    keys = {doc["_key"] for doc in on_disk(tmp_path / "db.json")["t"].values()}
    assert keys == {f"k{i}" for i in range(151)}


STORM = """
import asyncio, sys
from pathlib import Path
from services.common.store import Store
async def main():
    store = Store(Path(sys.argv[1]), journal_min=4096)
    for i in range(int(sys.argv[2]), 1_000_000):
        await store.put_many("t", {f"k{i % 40}": {"i": i, "pad": "x" * 100}}, delete=(f"k{(i + 20) % 40}",))
        print(i, flush=True)
asyncio.run(main())
"""


def storm_state(changes: int) -> dict[str, dict[str, Any]]:
    """What the first *changes* changes of STORM leave."""
    state: dict[str, dict[str, Any]] = {}
    for i in range(changes):
        state[f"k{i % 40}"] = {"i": i, "pad": "x" * 100}
        state.pop(f"k{(i + 20) % 40}", None)
    return state


def test_kill_at_any_moment_keeps_a_prefix_holding_every_acknowledged_change(tmp_path: Path) -> None:
    """Three times: kill -9 from outside while a process replaces and deletes documents (compacting every
    few dozen changes), then reopen: the store holds exactly the first N changes, N covering every one
    the killed process saw acknowledged."""
    path, done = tmp_path / "db.json", 0
    for acks in (120, 90, 150):
        child = subprocess.Popen([sys.executable, "-c", STORM, str(path), str(done)], cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        for _ in range(acks):
            assert child.stdout.readline()
        os.kill(child.pid, signal.SIGKILL)
        acknowledged = [int(line) for line in child.stdout.read().split()]
        child.wait()
        state = asyncio.run(Store(path).load("t"))
        done = max(doc["i"] for doc in state.values()) + 1
        assert done >= (acknowledged[-1] + 1 if acknowledged else done)
        assert state == storm_state(done)
    assert done >= 360


async def test_concurrent_writes_share_file_writes(tmp_path: Path) -> None:
    """200 writers at once cost a few appends (group commit), and every one of them is on disk."""
    store = Store(tmp_path / "db.json")
    await asyncio.gather(*(store.put("t", f"k{i}", {"i": i}) for i in range(200)))
    assert store.file_writes <= 3
    assert sorted(doc["i"] for doc in on_disk(tmp_path / "db.json")["t"].values()) == list(range(200))
    assert not (tmp_path / "db.json").exists()  # nothing compacted: only the journal was written
    store.close()


async def test_a_write_returns_once_on_disk(tmp_path: Path) -> None:
    """Whatever a write's await returned for is in the files, even while another write is under way."""
    store = Store(tmp_path / "db.json")
    first = asyncio.ensure_future(store.put("t", "a", {"x": 1}))
    await asyncio.sleep(0)
    await store.put_many("t", {"b": {"x": 2}}, delete=("a",))
    await first
    assert {d["_key"] for d in on_disk(tmp_path / "db.json")["t"].values()} == {"b"}
    assert await Store(tmp_path / "db.json").load("t") == {"b": {"x": 2}}


async def test_a_bad_document_fails_alone(tmp_path: Path) -> None:
    """A document JSON cannot hold is refused at once; the store keeps working."""
    store = Store(tmp_path / "db.json")
    with pytest.raises(TypeError):
        await store.put("t", "bad", {"x": object()})
    await store.put("t", "good", {"x": 1})
    assert await Store(tmp_path / "db.json").load("t") == {"good": {"x": 1}}


async def test_replacing_keeps_one_document_per_key(tmp_path: Path) -> None:
    """Many replacements of the same keys leave exactly one document each, readable after a restart."""
    store = Store(tmp_path / "db.json")
    for round_ in range(5):
        await store.put_many("t", {f"k{i}": {"round": round_} for i in range(50)}, delete=("k0",))
    store.close()
    again = await Store(tmp_path / "db.json").load("t")
    assert again == {f"k{i}": {"round": 4} for i in range(50)}
    assert len(json.loads((tmp_path / "db.json").read_text())["t"]) == 50


def test_close_writes_changes_not_yet_on_disk(tmp_path: Path) -> None:
    """A change applied in memory whose writer never waited is written by close()."""
    store = Store(tmp_path / "db.json")
    store.apply("t", {"a": {"x": 1}})
    store.close()
    assert json.loads((tmp_path / "db.json").read_text())["t"]["1"] == {"x": 1, "_key": "a"}


async def test_a_cancelled_writer_still_reaches_the_disk(tmp_path: Path) -> None:
    """A change whose writer is cancelled while an earlier write is under way is written all the same."""
    store = Store(tmp_path / "db.json")
    first = asyncio.ensure_future(store.put("t", "a", {"x": 1}))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(store.put("t", "b", {"x": 2}))
    await asyncio.sleep(0)
    second.cancel()
    await first
    for _ in range(50):
        if "b" in await Store(tmp_path / "db.json").load("t"):
            break
        await asyncio.sleep(0.02)
    assert await Store(tmp_path / "db.json").load("t") == {"a": {"x": 1}, "b": {"x": 2}}


async def test_a_failed_write_fails_its_waiters_and_the_next_one_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the disk refuses an append half-way, its waiters get the error; the next append cuts the half
    line and writes both changes."""
    from services.common import store as module

    real = module.append_line

    def full(path: Path, line: bytes, keep: int | None = None) -> None:
        real(path, line[: len(line) // 2], keep)
        raise OSError(28, "No space left on device")

    store = Store(tmp_path / "db.json")
    await store.put("t", "0", {"x": 0})
    monkeypatch.setattr(module, "append_line", full)
    with pytest.raises(OSError, match="No space"):
        await store.put("t", "a", {"x": 1})
    monkeypatch.setattr(module, "append_line", real)
    await store.put("t", "b", {"x": 2})
    assert await Store(tmp_path / "db.json").load("t") == {"0": {"x": 0}, "a": {"x": 1}, "b": {"x": 2}}
    assert len(journal_of(tmp_path / "db.json").read_bytes().splitlines()) == 2


async def test_reopening_replays_the_journal(tmp_path: Path) -> None:
    """A store that was never closed (a crash) is rebuilt from the snapshot and the journal's lines."""
    store = Store(tmp_path / "db.json", journal_min=0)
    await store.put_many("t", {f"k{i}": {"i": i} for i in range(10)})  # compacted at once: a snapshot
    await store.put("t", "k1", {"i": 100})
    await store.delete("t", "k2")
    await store.put("u", "z", {"z": True})
    assert len(journal_of(tmp_path / "db.json").read_bytes().splitlines()) == 3
    again = Store(tmp_path / "db.json")
    assert await again.load("t") == {f"k{i}": {"i": 100 if i == 1 else i} for i in range(10) if i != 2}
    assert await again.load("u") == {"z": {"z": True}}
    await again.put("t", "k11", {"i": 11})  # new ids do not collide with replayed ones
    assert len(await Store(tmp_path / "db.json").load("t")) == 10


async def test_a_torn_last_line_is_dropped_and_cut(tmp_path: Path) -> None:
    """A half-written last line (a crash mid-append) is ignored, and cut before the next append, so that
    later lines follow good ones (opening alone changes no file)."""
    store = Store(tmp_path / "db.json")
    await store.put("t", "a", {"x": 1})
    await store.put("t", "b", {"x": 2})
    journal = journal_of(tmp_path / "db.json")
    good = journal.read_bytes()
    with open(journal, "ab") as handle:
        handle.write(b'[["t",{"3":{"x":3,"_k')
    again = Store(tmp_path / "db.json")
    assert await again.load("t") == {"a": {"x": 1}, "b": {"x": 2}}
    await again.put("t", "c", {"x": 3})
    assert journal.read_bytes().startswith(good)
    assert len(journal.read_bytes().splitlines()) == 3
    assert await Store(tmp_path / "db.json").load("t") == {"a": {"x": 1}, "b": {"x": 2}, "c": {"x": 3}}


def test_a_torn_line_of_zeros_is_dropped(tmp_path: Path) -> None:
    """Zeros after the last line (what a power cut may leave) read as a torn line."""
    journal = tmp_path / "db.json.journal"
    journal.write_bytes(b'[["t",{"1":{"_key":"a"}},[]]]\n' + bytes(64))
    changes, good, size = read_journal(journal)
    assert changes == [("t", {"1": {"_key": "a"}}, [])]
    assert (good, size) == (30, 94)


async def test_a_damaged_line_before_the_last_is_an_error(tmp_path: Path) -> None:
    """Only the last line may be torn: a bad line before it refuses to open, naming the line."""
    store = Store(tmp_path / "db.json")
    for key in "abc":
        await store.put("t", key, {"x": 1})
    journal = journal_of(tmp_path / "db.json")
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[0] + b"{oops\n" + lines[2])
    with pytest.raises(JournalError, match="line 2 of 3"):
        Store(tmp_path / "db.json")


async def test_compaction_keeps_everything_and_empties_the_journal(tmp_path: Path) -> None:
    """Once the journal outgrows the snapshot it is folded into it: nothing lost, the journal stays small,
    and the file is a TinyDB database that TinyDB itself reads."""
    path, journal = tmp_path / "db.json", journal_of(tmp_path / "db.json")
    store = Store(path, journal_min=2000)
    expected: dict[str, dict[str, Any]] = {}
    for i in range(300):
        await store.put_many("t", {f"k{i % 30}": {"i": i}}, delete=(f"k{(i + 7) % 30}",))
        expected[f"k{i % 30}"] = {"i": i}
        expected.pop(f"k{(i + 7) % 30}", None)
        assert journal.stat().st_size <= 2000 + 100
    assert store.file_writes >= 305  # 300 appends and a compaction every ~2,000 bytes of journal
    assert await Store(path).load("t") == expected
    store.close()
    assert not journal.exists()
    with TinyDB(path) as db:
        assert {doc["_key"]: doc["i"] for doc in db.table("t").all()} == {k: v["i"] for k, v in expected.items()}


async def test_a_crash_between_snapshot_and_journal_reset_loses_nothing(tmp_path: Path) -> None:
    """A snapshot that already holds the journal's changes, replayed over once more, is unchanged."""
    path, journal = tmp_path / "db.json", journal_of(tmp_path / "db.json")
    store = Store(path)
    await store.put_many("t", {f"k{i}": {"i": i} for i in range(5)})
    for i in range(20):
        await store.put_many("t", {f"k{i % 5}": {"i": i}, f"n{i}": {"i": i}}, delete=(f"n{i - 1}", "k3"))
    state, lines = await store.load("t"), journal.read_bytes()
    store.close()  # snapshot written, journal removed; now put the journal back as if the crash came before
    journal.write_bytes(lines)
    assert await Store(path).load("t") == state


async def test_bytes_per_change_do_not_grow_with_the_database(tmp_path: Path) -> None:
    """One small change writes the same few bytes to a database of 10 documents or of 5,000."""
    written = []
    for size in (10, 5000):
        store = Store(tmp_path / f"{size}.json")
        await store.put_many("t", {f"k{i:05d}": {"i": i, "pad": "x" * 100} for i in range(size)})
        before, journal = store.bytes_written, journal_of(tmp_path / f"{size}.json").stat().st_size
        await store.put("t", "k00003", {"i": -1, "pad": "y" * 100})
        assert journal_of(tmp_path / f"{size}.json").stat().st_size - journal == store.bytes_written - before
        written.append(store.bytes_written - before)
    assert written[0] < 200
    assert written[1] <= written[0] + 4  # a longer document id at most
