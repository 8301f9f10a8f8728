"""Store write cost (issue 7): one journal line per change instead of the whole file.

A store holding 10,000 documents of the size of a cluster's instance spec (``_spec_doc``: an
``InstanceSpec`` with its service, ~700 bytes), then 1,000 changes of one document each, awaited one
after another (a desired delta's ``put_many``), timed from the call to its return:

* new: :class:`services.common.store.Store` (a journal line appended and fsynced per change; the
  snapshot rewritten once the journal outgrows it, in the timed path of the change that triggers it);
* old, same run: ``services/common/store.py`` as of commit ``6128cb2`` (read from git), which dumps the
  whole database and writes it to a temp file, fsyncs and renames it on every change.

Then 20,000 more changes of the new store, so that its compactions (every ~10,000 changes) are in its
means. Bytes written are what each store writes to its files, compactions included.
Run: ``flock /tmp/oak-bench.lock .venv/bin/python -m bench.store [--docs 10000] [--changes 1000]``
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import tempfile
import time
import types
from pathlib import Path
from typing import Any

from bench.common import percentile, record, summary
from services.common.models import InstanceSpec
from services.common.sla import ServiceSpec
from services.common.store import Store

OLD = "6128cb2"  # the last commit with the whole-file store
ROOT = Path(__file__).resolve().parents[1]


def old_store_module() -> tuple[Any, list[int]]:
    """The store module as of :data:`OLD`, and a counter of the bytes it writes."""
    source = subprocess.run(["git", "show", f"{OLD}:services/common/store.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    module: Any = types.ModuleType("old_store")
    exec(compile(source, f"{OLD}:services/common/store.py", "exec"), module.__dict__)  # noqa: S102
    write, written = module.write_atomically, [0]

    def counting(path: Path, text: str) -> None:
        written[0] += len(text.encode())
        write(path, text)

    module.write_atomically = counting
    return module, written


def spec_doc(k: int, rng: random.Random) -> dict[str, Any]:
    """An instance spec as the cluster stores it in its ``desired`` table."""
    service = ServiceSpec(f"app{k // 100}", "prod", f"svc{k % 100}", "prod", "container",
                          f"registry.example.com/team/svc{k % 100}:1.{rng.randrange(40)}",
                          cmd=("/bin/server", "--port", "8080"), environment=("LOG_LEVEL=info", "MODE=edge"),
                          memory=256, vcpus=0.5, port="80:8080", clusters=("c1",),
                          constraints=({"type": "geo", "location": "48.1,11.6", "threshold": 100},))
    spec = InstanceSpec(f"i{k:05d}", "admin", service.job_name, k, service,
                        sid=f"s{k:032x}", rr_ip=f"10.30.{k // 250}.{k % 250}", closest_ip="")
    return spec.doc


async def fill(store: Any, docs: int, rng: random.Random) -> None:
    """Put *docs* instance specs into *store* at once."""
    await store.put_many("desired", {f"i{k:05d}": spec_doc(k, rng) for k in range(docs)})


async def changes(store: Any, docs: int, count: int, written: Any, rng: random.Random) -> dict[str, Any]:
    """Time *count* single-document changes of *store*; *written*() reads its byte count."""
    latencies, sizes = [], []
    for n in range(count):
        k = rng.randrange(docs)
        doc = {**spec_doc(k, rng), "instance_number": docs + n}
        before, t0 = written(), time.perf_counter()
        await store.put("desired", f"i{k:05d}", doc)
        latencies.append((time.perf_counter() - t0) * 1000)
        sizes.append(written() - before)
    return {"latency_ms": {k: round(v, 3) for k, v in summary(latencies).items()} | {
                "p99": round(percentile(latencies, 99), 3), "mean": round(statistics.mean(latencies), 3)},
            "bytes_per_change": {"median": statistics.median(sizes), "mean": round(statistics.mean(sizes)),
                                 "max": max(sizes)}}


async def main(docs: int, count: int, long: int) -> None:
    with tempfile.TemporaryDirectory(prefix="oak-bench-store-") as tmp:
        store = Store(Path(tmp) / "new.json")
        await fill(store, docs, random.Random(7))
        store.close()  # the compaction that follows the fill is not one of the changes
        store, rng = Store(Path(tmp) / "new.json"), random.Random(8)
        new = await changes(store, docs, count, lambda: store.bytes_written, rng)
        new["file_writes"] = store.file_writes
        new["snapshot_bytes"] = (Path(tmp) / "new.json").stat().st_size
        new["journal_bytes"] = (Path(tmp) / "new.json.journal").stat().st_size
        writes = store.file_writes
        steady = await changes(store, docs, long, lambda: store.bytes_written, rng)
        steady["compactions"] = store.file_writes - writes - long
        store.close()
        module, written = old_store_module()
        old_store = module.Store(Path(tmp) / "old.json")
        await fill(old_store, docs, random.Random(7))
        old = await changes(old_store, docs, count, lambda: written[0], random.Random(8))
        old["file_writes"] = old_store.file_writes
        old_store.close()
    ratio = {"median_latency_old_over_new": round(old["latency_ms"]["median"] / new["latency_ms"]["median"], 1),
             "mean_latency_old_over_steady_new": round(old["latency_ms"]["mean"] / steady["latency_ms"]["mean"], 1),
             "mean_bytes_old_over_steady_new": round(old["bytes_per_change"]["mean"]
                                                     / steady["bytes_per_change"]["mean"], 1)}
    record("store", {"command": "flock /tmp/oak-bench.lock .venv/bin/python -m bench.store", "documents": docs,
                     "changes": count, "new_journal": new, f"new_journal_next_{long}_changes": steady,
                     f"old_whole_file_{OLD}": old, "ratios": ratio})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--changes", type=int, default=1000, help="timed changes of each store")
    parser.add_argument("--long", type=int, default=20_000, help="further changes of the new store, compactions "
                        "included")
    args = parser.parse_args()
    asyncio.run(main(args.docs, args.changes, args.long))
