"""Reports the node's metrics and its instances' statuses: every few seconds, and at once on a change."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from services.common import envelope, models, topics
from services.common.hookspecs import Collector
from services.common.mqtt import MqttSession

if TYPE_CHECKING:
    from services.worker.engine import Engine
    from services.worker.prober import Prober

COALESCE = 0.005  # seconds a report waits for more changes, at least
COST_FACTOR = 10  # ... and this many times what the last report cost


class Reporter:
    """Publishes the retained ``state`` of one node."""

    def __init__(self, node: str, collector: Collector) -> None:
        self.node = node
        self.collector = collector
        self.engine: Engine | None = None
        self.prober: Prober | None = None
        self._changed = asyncio.Event()
        self.pause = COALESCE  # how long the next report waits for more changes

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
        }

    async def run(self, session: MqttSession, interval: float) -> None:
        """Publish now, then whenever poked and at least every *interval* seconds. Changes in a burst
        share a report: after one, the next waits at least 5 ms and ten times what the last one cost
        (a worker holding a thousand instances is not kept busy re-sending all of them per change)."""
        topic = topics.up(topics.NODES, self.node, "state")
        while True:
            self._changed.clear()
            began = time.perf_counter()
            session.publish(topic, envelope.encode("node.state", self.state(), f"node/{self.node}"), retain=True)
            self.pause = max(COALESCE, COST_FACTOR * (time.perf_counter() - began))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), interval)
                await asyncio.sleep(self.pause)
                continue
            if self.engine:
                await self.engine.sample()
