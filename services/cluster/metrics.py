"""What a cluster holds, as Prometheus families read at scrape time (services/common/metrics.py serves them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.metrics_core import Metric

from services.cluster.orchestrator import ClusterOrchestrator
from services.common.metrics import broker_clients, by_state, instance_families


def reader(orchestrator: ClusterOrchestrator, clients: Callable[[], int] | None) -> Callable[[], Iterator[Metric]]:
    """The cluster's instances by service and status, its workers by state, and its broker's clients."""

    def read() -> Iterator[Metric]:
        desired = orchestrator.desired
        yield instance_families((desired[iid].service_key, status.status)
                                for iid, status in orchestrator.statuses().items() if iid in desired)
        views = list(orchestrator.nodes.values())
        online = sum(1 for v in views if v.online)
        yield by_state("oak_workers", "This cluster's workers by state",
                       {"online": online, "offline": len(views) - online})
        if clients is not None:
            yield broker_clients(clients)

    return read
