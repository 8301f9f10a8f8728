"""The cluster's part of the overlay: a subnet of its block per worker, and each worker's net table.

The root sends the cluster its block and the whole net table (``oak/downstream/net``). The cluster
gives every worker that has the overlay a /26 of the block (kept in TinyDB; freed when the worker
has been offline for ``HOLD`` seconds), replaces its own part of the root's table with what its
workers reported a moment ago, and sends each overlay worker, retained on
``oak/nodes/<id>/down/net``, its subnet and that table. Changes inside the cluster therefore reach
its workers without waiting for the root, and keep doing so while the root is away.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

from services.common import addressing, channels
from services.common.models import InstanceSpec, InstanceStatus, NodeInfo
from services.common.mqtt import MqttSession
from services.common.nettable import Backend, NetTable, NodeRoute, ServiceRoute, TableSender
from services.common.store import Store

log = logging.getLogger(__name__)
SUBNETS = "subnets"
HOLD = 600.0


class Worker(Protocol):
    """What the network needs to know of a worker."""

    name: str
    online: bool
    info: NodeInfo | None
    statuses: dict[str, InstanceStatus]


class ClusterNetwork:
    """Subnets for this cluster's workers and the net table they are sent."""

    def __init__(self, cluster: str, store: Store, session: MqttSession) -> None:
        self.cluster, self.store, self.session = cluster, store, session
        self.block = ""
        self.root_table = NetTable()
        self.subnets: dict[str, str] = {}
        self._offline_since: dict[str, float] = {}
        self.sender = TableSender(session, f"cluster/{cluster}")

    async def load(self) -> None:
        """Read the subnets handed out before (and the block they came from)."""
        stored = await self.store.load(SUBNETS)
        self.subnets = {name: str(doc["subnet"]) for name, doc in stored.items() if name != "_block"}
        self.block = str(stored.get("_block", {}).get("block", ""))

    async def on_root(self, data: dict[str, Any]) -> None:
        """Take the block and table the root sent."""
        try:
            block, table = str(data["block"]), NetTable.from_json(data["table"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"net: {exc!r}") from None
        if block != self.block:
            if self.block:
                log.warning("the root moved this cluster from block %s to %s; workers get new subnets", self.block,
                            block)
                await self.store.put_many(SUBNETS, {}, tuple(self.subnets))
                self.subnets = {}
            self.block = block
            await self.store.put(SUBNETS, "_block", {"block": block})
            log.info("overlay block %s", block)
        self.root_table = table

    async def allocate(self, workers: Mapping[str, Worker]) -> None:
        """Give each overlay worker a subnet; free those of workers gone for longer than HOLD."""
        now = time.monotonic()
        for name, worker in workers.items():
            if worker.online:
                self._offline_since.pop(name, None)
            else:
                self._offline_since.setdefault(name, now)
        stale = [n for n, since in self._offline_since.items() if now - since > HOLD and n in self.subnets]
        for name in stale:
            log.info("worker %s has been away for %.0f s: its subnet %s is free again", name, HOLD, self.subnets[name])
            del self.subnets[name]
        if stale:
            await self.store.put_many(SUBNETS, {}, tuple(stale))
        if not self.block:
            return
        for name, worker in sorted(workers.items()):
            if worker.online and worker.info and worker.info.overlay and name not in self.subnets:
                try:
                    subnet = addressing.free_subnet(self.block, addressing.WORKER_PREFIX, self.subnets.values())
                except addressing.Exhausted as exc:
                    log.warning("worker %s gets no overlay subnet: %s", name, exc)
                    continue
                self.subnets[name] = subnet
                await self.store.put(SUBNETS, name, {"subnet": subnet})
                log.info("worker %s gets the overlay subnet %s", name, subnet)

    def routes(self, workers: Mapping[str, Worker]) -> dict[str, NodeRoute]:
        """This cluster's overlay workers: subnet and endpoint."""
        return {
            name: NodeRoute(self.cluster, subnet, worker.info.overlay)
            for name, subnet in self.subnets.items()
            if (worker := workers.get(name)) and worker.info and worker.info.overlay
        }

    def table(self, workers: Mapping[str, Worker], desired: Mapping[str, InstanceSpec],
              assigned: Mapping[str, str]) -> NetTable:
        """The root's table with this cluster's part replaced by its workers' latest reports."""
        backends: dict[str, list[Backend]] = {}
        for iid, node in assigned.items():
            status = workers[node].statuses.get(iid) if node in workers else None
            spec = desired.get(iid)
            if spec and spec.sid and status and status.serves:
                backends.setdefault(spec.sid, []).append(Backend(status.ip, node, self.cluster))
        services = {s.sid: ServiceRoute(s.job_name, s.rr_ip, s.closest_ip) for s in desired.values() if s.rr_ip}
        return self.root_table.with_cluster(self.cluster, self.routes(workers), backends, services)

    def publish(self, workers: Mapping[str, Worker], desired: Mapping[str, InstanceSpec],
                assigned: Mapping[str, str]) -> None:
        """Send each overlay worker its subnet and the table, when they changed."""
        if not self.subnets:
            return
        self.sender.send(self.table(workers, desired, assigned),
                         {channels.NODE_NET.topic(node=name): {"subnet": subnet, "cluster": self.cluster}
                          for name, subnet in self.subnets.items()})

    def state(self, workers: Mapping[str, Worker]) -> dict[str, dict[str, str]]:
        """The ``overlay`` part of the cluster's state for the root: every worker with the overlay, and its
        subnet ("" until the cluster has a block to give one from)."""
        return {n: {"subnet": self.subnets.get(n, ""), "endpoint": w.info.overlay}
                for n, w in sorted(workers.items()) if w.info and w.info.overlay}
