"""What a cluster holds, as Prometheus families read at scrape time (services/common/metrics.py serves them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from services.cluster.orchestrator import ClusterOrchestrator
from services.common.metrics import broker_clients, instance_families


def reader(orchestrator: ClusterOrchestrator, clients: Callable[[], int] | None) -> Callable[[], Iterator[Metric]]:
    """The cluster's instances by service and status, its workers by state, and its broker's clients."""

    def read() -> Iterator[Metric]:
        desired = orchestrator.desired
        yield instance_families((desired[iid].service_key, status.status)
                                for iid, status in orchestrator.statuses().items() if iid in desired)
        workers = GaugeMetricFamily("oak_workers", "This cluster's workers by state", labels=["state"])
        views = list(orchestrator.nodes.values())
        online = sum(1 for v in views if v.online)
        workers.add_metric(["online"], online)
        workers.add_metric(["offline"], len(views) - online)
        yield workers
        if clients is not None:
            yield broker_clients(clients)

    return read
