"""The worker engine with the real process runtime: start, exit statuses, backoff restarts, adoption."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from plugins.collectors.sim import SimCollector
from plugins.runtimes.process import ProcessRuntime
from plugins.runtimes.sim import SimRuntime
from services.common import envelope, models
from services.common.models import InstanceSpec
from services.common.sla import ServiceSpec
from services.common.store import Store, parse_line
from services.worker import engine as engine_module
from services.worker import gpus
from services.worker.engine import Engine, backoff
from services.worker.reporter import Reporter
from tests.conftest import eventually
from tests.fakes import FakeSession


def spec(iid: str, cmd: list[str], one_shot: bool = False) -> InstanceSpec:
    service = ServiceSpec(app_name="a", app_namespace="n", name="s", namespace="n", virtualization="process",
                          code="", cmd=tuple(cmd), one_shot=one_shot)
    return InstanceSpec(iid, "admin", service.job_name, 0, service)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Restart after 0.1 s instead of 1 s, so the tests are quick."""
    monkeypatch.setattr(engine_module, "BACKOFF_FIRST", 0.1)


def make(tmp_path: Path) -> Engine:
    return Engine("w1", {"process": ProcessRuntime(data_dir=str(tmp_path))}, Store(tmp_path / "w.json"), tmp_path)


def test_backoff_doubles_up_to_a_cap() -> None:
    """First delay, then doubling (0.1 s first here; 1 s in production), never more than 30 s."""
    assert [backoff(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.8]
    assert backoff(50) == 30.0


async def test_statuses_running_completed_dead_failed(tmp_path: Path) -> None:
    """RUNNING while it runs, COMPLETED for a one_shot exit 0, DEAD (restarted) otherwise, FAILED if it can't start."""
    eng = make(tmp_path)
    await eng.apply({
        "run": spec("run", ["sleep", "7001"]),
        "once": spec("once", ["true"], one_shot=True),
        "crash": spec("crash", ["sh", "-c", "exit 3"]),
        "nope": spec("nope", ["/no/such/binary"]),
    })
    await eventually(lambda: eng.statuses()["run"].status == models.RUNNING, what="run RUNNING")
    await eventually(lambda: eng.statuses()["once"].status == models.COMPLETED, what="once COMPLETED")
    await eventually(lambda: eng.statuses()["crash"].restarts >= 2, what="crash restarted twice")
    crash = eng.statuses()["crash"]
    assert crash.status in (models.DEAD, models.RUNNING)
    await eventually(lambda: eng.statuses()["nope"].status == models.FAILED, what="nope FAILED")
    assert "no such file" in eng.statuses()["nope"].reason.lower()
    await eng.apply({})
    await eventually(lambda: not eng.slots, what="all removed")
    await asyncio.sleep(0.1)
    await eng.close()


async def test_restarted_engine_adopts_running_instances(tmp_path: Path) -> None:
    """A new engine on the same store finds the running process and does not start a second one."""
    first = make(tmp_path)
    await first.apply({"run": spec("run", ["sleep", "7002"])})
    await eventually(lambda: first.statuses()["run"].status == models.RUNNING, what="RUNNING")
    pid = first.slots["run"].handle.pid  # type: ignore[union-attr]
    for slot in first.slots.values():  # simulate kill -9 of the worker: supervisors vanish, processes stay
        slot.task.cancel()  # type: ignore[union-attr]
    second = make(tmp_path)
    await second.restore()
    assert second.slots["run"].handle is not None
    assert second.slots["run"].handle.pid == pid
    await second.apply({})
    await eventually(lambda: not second.slots, what="removed")
    await asyncio.sleep(0.2)
    await second.close()


def gated_runtime() -> tuple[SimRuntime, asyncio.Event]:
    """A simulated runtime whose starts wait for the event returned with it."""
    runtime, gate = SimRuntime(), asyncio.Event()
    start = runtime.start

    async def gated_start(launch: Any) -> Any:
        await gate.wait()
        return await start(launch)

    runtime.start = gated_start  # type: ignore[method-assign,assignment]
    return runtime, gate


async def test_many_new_instances_share_one_store_write(tmp_path: Path) -> None:
    """A desired map bringing 300 instances writes their CREATING records once, not 300 times in a row."""
    store, (runtime, gate) = Store(tmp_path / "w.json"), gated_runtime()
    eng = Engine("w1", {"process": runtime}, store, tmp_path)  # type: ignore[dict-item]
    before = store.file_writes
    await eng.apply({f"i{n}": spec(f"i{n}", ["sleep", "1"]) for n in range(300)})  # returns before they start
    assert store.file_writes - before == 1, f"{store.file_writes - before} writes for one desired map"
    gate.set()  # their RUNNING records come next (held until now: they might otherwise share or follow that write)
    await eventually(lambda: all(s.status == models.RUNNING for s in eng.statuses().values()), what="all RUNNING")
    await eng.apply({})
    await eventually(lambda: not eng.slots, what="all removed")
    await eng.close()


async def test_an_instance_removed_while_it_starts_leaves_nothing_running(tmp_path: Path) -> None:
    """A removal landing at any moment of a start (the process runtime's start spawns and waits in threads
    and child processes, which a cancel cannot call back) ends what the start started."""
    eng = make(tmp_path)
    marker = "7012"
    for delay_ms in range(0, 40, 2):
        await eng.apply({"i1": spec("i1", ["sleep", marker])})
        await asyncio.sleep(delay_ms / 1000)
        await eng.apply({})
        await eventually(lambda: not eng.slots and not eng._stopping, what="i1 removed")
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", marker]]
        assert not left, f"removed {delay_ms} ms into its start, yet still running: {left}"
    await eng.close()


class Slow:
    """A collector whose sample takes 20 ms, as a report of a thousand instances may."""

    def sample(self) -> dict[str, object]:
        time.sleep(0.02)
        return {}


async def test_costly_reports_are_spaced_by_their_cost() -> None:
    """A burst of changes on a worker whose report costs 20 ms makes a report at most every ~200 ms."""
    reporter, sent = Reporter("w1", Slow()), FakeSession()  # type: ignore[arg-type]
    task = asyncio.create_task(reporter.run(sent, 60))  # type: ignore[arg-type]
    for _ in range(100):  # changes for a second
        reporter.poke()
        await asyncio.sleep(0.01)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert reporter.throttle.gap >= 0.2
    assert 2 <= len(sent.published) <= 8, f"{len(sent.published)} reports in a second of changes"


async def test_a_worker_batches_its_reports_only_while_busy(tmp_path: Path) -> None:
    """Idle, a worker's reports may run ahead of their cost spacing (a lone deploy's RUNNING is not held up
    behind its CREATING); while an instance is starting, or the worker is behind on its messages, they keep it."""
    runtime, gate = gated_runtime()
    eng = Engine("w1", {"process": runtime}, Store(tmp_path / "w.json"), tmp_path)  # type: ignore[dict-item]
    reporter, session = Reporter("w1", Slow()), FakeSession()  # type: ignore[arg-type]
    reporter.engine = eng
    assert not reporter.busy(session)  # type: ignore[arg-type]
    await eng.apply({"i1": spec("i1", ["sleep", "30"])})
    assert eng.starting()
    assert reporter.busy(session)  # type: ignore[arg-type]
    gate.set()
    await eventually(lambda: not eng.starting(), what="i1 started")
    assert not reporter.busy(session)  # type: ignore[arg-type]
    session.lag = 0.001  # a message that just arrived is no backlog
    assert not reporter.busy(session)  # type: ignore[arg-type]
    session.lag = 0.05  # one that has waited 50 ms is
    assert reporter.busy(session)  # type: ignore[arg-type]
    await eng.apply({})
    await eventually(lambda: not eng.slots, what="i1 removed")
    await eng.close()


async def test_new_instances_start_while_their_creating_is_written(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A start does not wait for the store to write CREATING; its RUNNING (with the handle the worker adopts
    by, and before any report of it) is written with it or after it."""
    store = Store(tmp_path / "w.json")
    runtime = SimRuntime()
    events: list[str] = []
    append = store._append

    def slow_append(line: bytes, version: int) -> None:
        time.sleep(0.2)  # a slow disk (runs in the store's thread)
        append(line, version)
        events.append("written " + ",".join(sorted({d["status"]["status"] for c in store_lines(line) for d in c})))

    start = runtime.start

    async def recorded_start(launch: Any) -> Any:
        events.append("started")
        return await start(launch)

    monkeypatch.setattr(store, "_append", slow_append)
    monkeypatch.setattr(runtime, "start", recorded_start)
    eng = Engine("w1", {"process": runtime}, store, tmp_path)  # type: ignore[dict-item]
    await eng.apply({"i1": spec("i1", ["sleep", "7005"])})
    await eventually(lambda: any("RUNNING" in e for e in events), what="RUNNING written")
    assert events[0] == "started", events  # before anything was on disk
    assert "CREATING" in events[1], events  # RUNNING in the same line (one write), or a later one
    await eng.close()


def store_lines(line: bytes) -> list[list[dict[str, Any]]]:
    """The documents of one journal line, per change."""
    return [list(docs.values()) for _, docs, _ in parse_line(line)]


async def test_a_start_on_an_idle_worker_is_one_report_of_running(tmp_path: Path) -> None:
    """A start's CREATING waits for its RUNNING (up to START_HOLD): one report crosses the tiers, not two."""
    reporter, session = Reporter("w1", SimCollector()), FakeSession()  # type: ignore[arg-type]
    eng = Engine("w1", {"process": ProcessRuntime(data_dir=str(tmp_path))}, Store(tmp_path / "w.json"), tmp_path,
                 on_change=reporter.poke)
    reporter.engine = eng
    task = asyncio.create_task(reporter.run(session, 60))  # type: ignore[arg-type]
    await eventually(lambda: session.published, what="the first report")
    await eng.apply({"i1": spec("i1", ["sleep", "7004"])})
    await eventually(lambda: len(session.published) > 1, what="the start reported")
    await eventually(lambda: not eng.starting(), what="i1 started")
    reported = [envelope.decode(payload).data["instances"] for _, payload in session.published[1:]]
    assert [r["i1"]["status"] for r in reported] == [models.RUNNING]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await eng.apply({})
    await eventually(lambda: not eng.slots, what="i1 removed")
    await eng.close()


async def test_gpus_are_held_across_restarts_and_freed_on_removal(tmp_path: Path) -> None:
    """Each instance asking for a GPU gets one nobody else holds, as ``CUDA_VISIBLE_DEVICES``; a restarted
    engine knows who holds which; one asking for more than is free waits, saying so, and starts once an
    instance is removed."""
    found = gpus.parse("0, GPU-aaaa, NVIDIA T4, 15360\n1, GPU-bbbb, NVIDIA T4, 15360\n")

    def cuda(iid: str, count: int = 1) -> InstanceSpec:
        job = spec(iid, ["sh", "-c", "echo $CUDA_VISIBLE_DEVICES; sleep 7003"])
        return dataclasses.replace(job, service=dataclasses.replace(job.service, vgpus=count))

    def engine() -> Engine:
        return Engine("w1", {"process": ProcessRuntime(data_dir=str(tmp_path))}, Store(tmp_path / "w.json"), tmp_path,
                      gpus=found)

    first = engine()
    await first.apply({"a": cuda("a"), "b": cuda("b")})
    await eventually(lambda: all(s.status == models.RUNNING for s in first.statuses().values()), what="RUNNING")
    assert {first.slots["a"].gpus, first.slots["b"].gpus} == {("GPU-aaaa",), ("GPU-bbbb",)}
    for slot in first.slots.values():  # the worker killed: its instances run on
        slot.task.cancel()  # type: ignore[union-attr]
    second = engine()
    await second.restore()
    assert second.gpu_holders == {"GPU-aaaa": first.gpu_holders["GPU-aaaa"], "GPU-bbbb": first.gpu_holders["GPU-bbbb"]}
    log = tmp_path / "logs" / "a.log"
    assert log.read_text().split() == list(second.slots["a"].gpus)
    await second.apply({"a": cuda("a"), "b": cuda("b"), "c": cuda("c", 2)})
    await eventually(lambda: second.statuses()["c"].status == models.FAILED, what="c waiting")
    assert "needs 2 GPU(s); this worker has 2, 0 free" in second.statuses()["c"].reason
    await second.apply({"c": cuda("c", 2)})
    await eventually(lambda: second.statuses()["c"].status == models.RUNNING, 10, what="c RUNNING once freed")
    assert second.slots["c"].gpus == ("GPU-aaaa", "GPU-bbbb")
    await second.apply({})
    await eventually(lambda: not second.slots and not second.gpu_holders, what="all removed, GPUs free")
    await second.close()
