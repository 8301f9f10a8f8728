"""TinyDB store: atomic writes, survives a crash mid-way, keyed tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
