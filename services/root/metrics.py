"""What the root holds, as Prometheus families read at scrape time (services/common/metrics.py serves them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.metrics_core import Metric

from services.common.metrics import broker_clients, by_state, instance_families
from services.root.orchestrator import RootOrchestrator


def reader(orchestrator: RootOrchestrator, clients: Callable[[], int] | None) -> Callable[[], Iterator[Metric]]:
    """The root's instances by service and status, clusters and workers online, and its broker's clients."""

    def read() -> Iterator[Metric]:
        catalog = orchestrator.catalog
        yield instance_families(
            (f"{catalog.services[i.sid].owner}/{catalog.services[i.sid].job_name}",
             orchestrator.instance_status(i).status)
            for i in list(catalog.instances.values()) if i.sid in catalog.services)
        views = list(orchestrator.clusters.values())
        online = sum(1 for v in views if v.online)
        yield by_state("oak_clusters", "Clusters by state", {"online": online, "offline": len(views) - online})
        nodes = [(n, v.online) for v in views for n in list(v.nodes.values())]
        up = sum(1 for n, reachable in nodes if n.online and reachable)
        yield by_state("oak_workers", "Workers of every cluster by state", {"online": up, "offline": len(nodes) - up})
        if clients is not None:
            yield broker_clients(clients)

    return read
