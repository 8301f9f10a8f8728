"""TinyDB store: atomic writes, survives a crash mid-way, keyed tables."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.store import Store


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
    """SIGKILL in the middle of a write storm leaves a readable database with a prefix of the writes."""
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
    subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], check=False)
    data = json.loads((tmp_path / "db.json").read_text())
    keys = {doc["_key"] for doc in data["t"].values()}
    assert keys == {f"k{i}" for i in range(len(keys))}
    assert 100 <= len(keys) <= 151


async def test_concurrent_writes_share_file_writes(tmp_path: Path) -> None:
    """200 writers at once cost a few file writes (group commit), and every one of them is on disk."""
    store = Store(tmp_path / "db.json")
    await asyncio.gather(*(store.put("t", f"k{i}", {"i": i}) for i in range(200)))
    assert store.file_writes <= 3
    on_disk = json.loads((tmp_path / "db.json").read_text())["t"]
    assert sorted(doc["i"] for doc in on_disk.values()) == list(range(200))
    store.close()


async def test_a_write_returns_once_on_disk(tmp_path: Path) -> None:
    """Whatever a write's await returned for is in the file, even while another write is under way."""
    store = Store(tmp_path / "db.json")
    first = asyncio.ensure_future(store.put("t", "a", {"x": 1}))
    await asyncio.sleep(0)
    await store.put_many("t", {"b": {"x": 2}}, delete=("a",))
    await first
    assert {d["_key"] for d in json.loads((tmp_path / "db.json").read_text())["t"].values()} == {"b"}
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
    """When the disk refuses a write, its waiters get the error; a later write succeeds with both changes."""
    from services.common import store as module

    real = module.write_atomically

    def full(path: Path, text: str) -> None:
        raise OSError(28, "No space left on device")

    store = Store(tmp_path / "db.json")
    monkeypatch.setattr(module, "write_atomically", full)
    with pytest.raises(OSError, match="No space"):
        await store.put("t", "a", {"x": 1})
    monkeypatch.setattr(module, "write_atomically", real)
    await store.put("t", "b", {"x": 2})
    assert await Store(tmp_path / "db.json").load("t") == {"a": {"x": 1}, "b": {"x": 2}}
