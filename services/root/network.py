"""The root's part of the overlay: a block of the worker pool per cluster, and the whole net table.

A cluster that reports workers with the overlay gets a block (kept in TinyDB, so it survives
restarts); every cluster with a block gets, retained on ``oak/clusters/<cid>/down/net``, its block
and the table of every overlay worker and every service's IPs and running instances, whenever that
changes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from services.common import addressing, channels
from services.common.mqtt import MqttSession
from services.common.nettable import Backend, NetTable, NodeRoute, ServiceRoute, TableSender
from services.common.store import Store
from services.root.catalog import Catalog
from services.root.clusters import ClusterView

log = logging.getLogger(__name__)
BLOCKS = "blocks"


def build_table(catalog: Catalog, clusters: Iterable[ClusterView]) -> NetTable:
    """Every overlay worker, and every service with where its running instances are."""
    views = list(clusters)
    nodes = {name: route for view in views for name, route in view.overlay.items() if route.subnet}
    backends: dict[str, list[Backend]] = {}
    for view in views:
        for iid, status in view.statuses.items():
            instance = catalog.instances.get(iid)
            if instance and instance.cluster == view.name and status.serves:
                backends.setdefault(instance.sid, []).append(Backend(status.ip, status.node, view.name))
    services = {
        sid: ServiceRoute(s.job_name, s.rr_ip, s.closest_ip, tuple(sorted(backends.get(sid, []), key=lambda b: b.ip)))
        for sid, s in catalog.services.items() if s.rr_ip
    }
    return NetTable(nodes, services)


class RootNetwork:
    """Blocks for clusters and the net table they are sent."""

    def __init__(self, store: Store, session: MqttSession) -> None:
        self.store, self.session = store, session
        self.blocks: dict[str, str] = {}
        self.sender = TableSender(session, "root")

    async def load(self) -> None:
        """Read the blocks handed out before."""
        self.blocks = {name: str(doc["block"]) for name, doc in (await self.store.load(BLOCKS)).items()}

    async def grant(self, clusters: Iterable[ClusterView]) -> None:
        """Give a block to each cluster that has overlay workers and none yet."""
        for view in clusters:
            if view.overlay and view.name not in self.blocks:
                try:
                    block = addressing.free_subnet(addressing.WORKER_POOL, addressing.CLUSTER_PREFIX,
                                                   self.blocks.values())
                except addressing.Exhausted as exc:
                    log.warning("cluster %s gets no overlay block: %s", view.name, exc)
                    continue
                self.blocks[view.name] = block
                await self.store.put(BLOCKS, view.name, {"block": block})
                log.info("cluster %s gets the overlay block %s", view.name, block)

    def publish(self, catalog: Catalog, clusters: Iterable[ClusterView]) -> None:
        """Send every cluster with a block its block and the table, when they changed."""
        if not self.blocks:
            return
        self.sender.send(build_table(catalog, clusters),
                         {channels.CLUSTER_NET.topic(cluster=name): {"block": block}
                          for name, block in self.blocks.items()})


def overlay_routes(cluster: str, data: object) -> dict[str, NodeRoute]:
    """The ``overlay`` part of a cluster's state: its workers' subnets and endpoints."""
    if not isinstance(data, dict):
        return {}
    return {str(n): NodeRoute(cluster, str(r["subnet"]), str(r["endpoint"])) for n, r in data.items()}
