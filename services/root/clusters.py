"""What the root knows of each cluster, rebuilt from the clusters' retained ``avail``/``info``/``state``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from services.common.hookspecs import Candidate, Demand
from services.common.models import ClusterInfo, InstanceStatus, NodeSummary

FAILOVER_GRACE = 2.0
STARTUP_GRACE = 10.0


@dataclass
class ClusterView:
    """One cluster: online or not, its workers, and the statuses of the instances it runs.

    ``move_after`` is when its instances should move elsewhere (None while it is online): shortly
    after it goes offline, or a while after the root starts if it has not been heard from.
    """

    name: str
    online: bool = False
    info: ClusterInfo | None = None
    nodes: dict[str, NodeSummary] = field(default_factory=dict)
    statuses: dict[str, InstanceStatus] = field(default_factory=dict)
    move_after: float | None = None

    def set_online(self, online: bool, grace: float = FAILOVER_GRACE) -> None:
        """Record a change of availability."""
        self.online = online
        self.move_after = None if online else time.monotonic() + grace

    def should_move(self) -> bool:
        """True when this cluster's instances should be placed elsewhere."""
        return not self.online and self.move_after is not None and time.monotonic() >= self.move_after

    def candidate(self, demand: Demand, reserved: dict[str, tuple[float, float]]) -> tuple[Candidate, str]:
        """This cluster as a scheduling candidate for *demand*, and the worker that would likely take it.

        Its free capacity is that of its best *single* worker for the demand (never a sum), after the
        root's own *reserved* ``{node: (vcpus, memory)}`` that the cluster has not reported yet.
        """
        nodes = [n for n in self.nodes.values() if n.online] if self.online else []
        free = {
            n.name: (n.cpu_free - reserved.get(n.name, (0.0, 0.0))[0],
                     n.memory_free_mb - reserved.get(n.name, (0.0, 0.0))[1])
            for n in nodes
        }
        fitting = [
            n for n in nodes
            if demand.virtualization in n.runtimes
            and (not demand.nodes or n.name in demand.nodes)
            and free[n.name][0] + 1e-9 >= demand.vcpus
            and free[n.name][1] + 1e-9 >= demand.memory_mb
        ]
        pool = fitting or [n for n in nodes if demand.virtualization in n.runtimes] or nodes
        best = max(pool, key=lambda n: (free[n.name][1], free[n.name][0], n.name), default=None)
        runtimes = tuple(best.runtimes) if fitting and best else tuple(sorted({r for n in nodes for r in n.runtimes}))
        return Candidate(
            id=self.name,
            cpu_free=free[best.name][0] if best else 0.0,
            memory_free_mb=free[best.name][1] if best else 0.0,
            cpu_total=sum(n.cpu_cores for n in nodes),
            memory_total_mb=sum(n.memory_mb for n in nodes),
            virtualizations=runtimes,
            cpu_percent=sum(n.cpu_percent for n in nodes) / len(nodes) if nodes else 0.0,
            location=self.info.location if self.info else "",
            node_names=tuple(n.name for n in nodes),
        ), best.name if best and fitting else ""
