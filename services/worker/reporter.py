"""Reports the node's metrics and its instances' statuses: every few seconds, and at once on a change."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from services.common import channels, models
from services.common.mqtt import MqttSession
from services.common.plugin_api import Collector
from services.common.throttle import IDLE_BURST, ReportThrottle, behind

if TYPE_CHECKING:
    from services.worker.engine import Engine
    from services.worker.prober import Prober

COALESCE = 0.005  # seconds a busy worker's report waits for more changes, at least
# Seconds a change waits, at most, while instances are starting: a start's CREATING goes with its RUNNING
# (one report, not two crossing the tiers beside the start), and a slow start (an image pulled) still shows
# CREATING and its progress this often.
START_HOLD = 0.25
COST_FACTOR = 10  # reports start at least this many times what the last one cost apart


class Reporter:
    """Publishes the retained ``state`` of one node."""

    def __init__(self, node: str, collector: Collector) -> None:
        self.node = node
        self.collector = collector
        self.engine: Engine | None = None
        self.prober: Prober | None = None
        self._changed = asyncio.Event()
        self.throttle = ReportThrottle(0.0, COST_FACTOR, COALESCE, burst=IDLE_BURST)

    def poke(self) -> None:
        """Ask for a report now (an instance changed)."""
        self._changed.set()

    def state(self) -> dict[str, object]:
        """The node state as published."""
        statuses = self.engine.statuses() if self.engine else {}
        return {
            **self.collector.sample(),
            "instances": {iid: models.dump(status) for iid, status in statuses.items()},
            "coord": self.prober.coord.to_list() if self.prober and self.prober.samples else [],
            "volumes": dict(self.engine.volume_sizes) if self.engine else {},
        }

    def busy(self, session: MqttSession) -> bool:
        """Whether changes should be batched: the worker is behind on its messages, or instances are starting."""
        return behind(session.waited()) or self._starting()

    def _starting(self) -> bool:
        return self.engine is not None and self.engine.starting()

    async def _until_started(self, hold: float) -> None:
        """Wait while instances are starting, at most *hold* seconds (each change wakes it to look again)."""
        deadline = asyncio.get_running_loop().time() + hold
        while self._starting() and (left := deadline - asyncio.get_running_loop().time()) > 0:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def run(self, session: MqttSession, interval: float) -> None:
        """Publish now, then whenever poked and at least every *interval* seconds. While instances are
        starting a change waits for them, up to START_HOLD, so a start is one report (RUNNING), not two.
        Over time reports are spaced by ten times what they cost (a worker holding a thousand instances is
        not kept busy re-sending all of them per change); an idle worker reports at once, and may run 0.1 s
        of that spacing ahead; a busy one (behind on its messages, or instances still starting after the
        hold) waits 5 ms for more changes and keeps the spacing after each."""
        loop = asyncio.get_running_loop()
        while True:
            self._changed.clear()
            began = loop.time()
            session.send(channels.NODE_STATE, self.state(), f"node/{self.node}", node=self.node)
            self.throttle.ran(began, loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), interval)
                await self._until_started(START_HOLD)
                await asyncio.sleep(self.throttle.delay(loop.time(), self.busy(session)))
                continue
            if self.engine:
                await self.engine.sample()
