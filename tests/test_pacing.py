"""Adaptive pacing (services/common/throttle.py): an idle tier runs its batched work at once, a busy one
(behind on its messages) spaces it; a Trigger runs once for the asks made before it starts and once more
for those during it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from services.cluster.orchestrator import ClusterOrchestrator
from services.common.mqtt import BrokerUrl, MqttSession
from services.common.scheduling import Profile
from services.common.store import Store
from services.common.throttle import BUSY_WAIT, ReportThrottle, TimeSlices, Trigger, behind
from tests.fakes import FakeSession


def test_an_idle_tier_waits_only_for_the_cost_spacing() -> None:
    pacing = ReportThrottle(minimum=0.2, factor=10, coalesce=0.005)
    pacing.ran(100.0, 100.001)  # a cheap run: 10 x its cost is 10 ms
    assert abs(pacing.delay(100.002, busy=True) - 0.198) < 1e-9  # busy: the minimum spacing
    assert abs(pacing.delay(100.002, busy=False) - 0.008) < 1e-9  # idle: only 10 x the cost (10 ms after the start)
    assert pacing.delay(100.5, busy=False) == 0.0  # long after: at once
    assert pacing.delay(100.5, busy=True) == 0.005  # busy: still coalesces
    placing = ReportThrottle(minimum=0.05, factor=0, coalesce=0.002)  # the cluster's placement passes
    assert placing.delay(0.0, busy=False) == 0.0  # idle: at once
    assert placing.delay(0.0, busy=True) == 0.002  # busy: waits for more


def test_an_idle_tier_may_run_a_few_times_in_a_row_within_its_burst() -> None:
    pacing = ReportThrottle(minimum=0.2, factor=10, coalesce=0.005, burst=0.1)
    pacing.ran(100.0, 100.004)  # owes 40 ms
    assert pacing.delay(100.004, busy=False) == 0.0  # within the burst: at once
    pacing.ran(100.004, 100.008)
    assert pacing.delay(100.008, busy=False) == 0.0  # 80 ms owed, still within
    pacing.ran(100.008, 100.012)  # 120 ms owed: 20 ms past the burst
    assert abs(pacing.delay(100.012, busy=False) - 0.008) < 1e-9  # paid at 100.12; may run 0.1 s before
    assert abs(pacing.delay(100.012, busy=True) - 0.196) < 1e-9  # busy: the minimum spacing, as before
    pacing.ran(100.02, 100.024)  # ran at 100.02, before it was paid: now owes up to 100.16
    assert abs(pacing.delay(100.024, busy=False) - 0.036) < 1e-9  # a stream is spaced by its cost
    assert pacing.delay(101.0, busy=False) == 0.0  # paid long ago: the burst is whole again
    pacing.ran(101.0, 101.004)
    assert pacing.delay(101.004, busy=False) == 0.0


async def test_a_trigger_runs_once_for_asks_before_and_once_for_asks_during_a_run() -> None:
    runs = []
    release = asyncio.Event()

    async def work() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            await release.wait()

    trigger = Trigger(work, ReportThrottle(0.0, factor=0.0, coalesce=0.0), "work", busy=lambda: False)
    trigger.pull()
    trigger.pull()  # before the run starts: the same run
    await asyncio.sleep(0.01)
    assert runs == [0]
    trigger.pull()
    trigger.pull()  # during the run: one more run after it
    release.set()
    await trigger.settled()
    assert runs == [0, 1]


async def test_a_failing_run_is_logged_and_the_trigger_goes_on() -> None:
    calls = []

    async def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a bug")

    trigger = Trigger(flaky, ReportThrottle(0.0, factor=0.0, coalesce=0.0), "flaky", busy=lambda: False)
    trigger.pull()
    await trigger.settled()
    trigger.pull()
    await trigger.settled()
    assert len(calls) == 2


async def test_a_long_pass_lets_the_loop_turn_once_its_slice_is_used_up() -> None:
    """A pass that calls ``turn`` between steps lets a waiting task run within about one slice; a pass
    still inside its slice does not yield (no cost while it is short)."""
    ran: list[float] = []

    async def other() -> None:
        ran.append(time.perf_counter())

    slices = TimeSlices(budget=0.01)
    waiting = asyncio.get_running_loop().create_task(other())
    await slices.turn()
    assert not ran, "inside its slice the pass keeps the loop"
    began = time.perf_counter()
    while not ran:
        time.sleep(0.001)  # one step of busy work
        await slices.turn()
    assert ran[0] - began < 0.05, "the waiting task ran once the slice was used up"
    await waiting


async def test_a_tier_is_behind_only_while_a_message_has_waited() -> None:
    """One message that just arrived (a heartbeat beside a report) is no backlog; one that has waited past
    BUSY_WAIT is, until it is taken."""
    session = MqttSession(BrokerUrl("127.0.0.1", 1), "probe", "u", "p")
    assert not behind(session.waited())
    session._on_message(None, "oak/x", b"{}", 1, {})  # type: ignore[arg-type]  # as gmqtt hands one over
    assert not behind(session.waited())
    await asyncio.sleep(2 * BUSY_WAIT)
    assert behind(session.waited())
    await session.get(1)
    assert not behind(session.waited())


async def test_a_cluster_batches_only_while_it_is_behind(tmp_path: Path) -> None:
    session = FakeSession()
    orch = ClusterOrchestrator("c1", Store(tmp_path / "c.json"), Profile(()), session)  # type: ignore[arg-type]
    session.backlog, session.lag = 1, 0.001
    assert not orch._busy()
    session.lag = 5 * BUSY_WAIT
    assert orch._busy()
