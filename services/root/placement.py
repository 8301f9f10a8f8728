"""The root's placement, as plain logic: which cluster each instance goes to.

No broker, no store, no event loop. :class:`Placement` keeps what placing needs between passes (the
reservations of workers the clusters have not reported yet, the clusters that refused an instance, why
an instance waits) and decides: :meth:`Placement.moves` takes instances off failed clusters, and
:meth:`Placement.decisions` yields one decision at a time, so the orchestrator can turn the event loop
between them during a burst and stay responsive. Tested by calling it (tests/test_root_placement.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from services.common import models
from services.common.models import InstanceStatus
from services.common.plugin_api import Demand
from services.common.scheduling import Profile, with_targets
from services.root.catalog import Instance, Service
from services.root.clusters import ClusterView, Pool, choose


@dataclass(frozen=True)
class Decided:
    """One decision: the cluster chosen for *iid* ("" when none can take it, then *reason* says why);
    *news* when the reason is new (the service's state should say so)."""

    iid: str
    cluster: str
    reason: str = ""
    news: bool = False


class Placement:
    """Placement across clusters, with the state it keeps between passes."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.unplaced: dict[str, str] = {}  # why each waiting instance waits
        self.reserved: dict[str, tuple[str, str, Demand]] = {}  # iid -> (cluster, worker, demand)
        self.excluded: dict[str, set[str]] = {}  # iid -> clusters that said they cannot place it

    # ---- what the clusters say -----------------------------------------------------------------

    def absorb(self, cluster: str, iid: str, status: InstanceStatus) -> None:
        """A cluster's status of its instance *iid*: a reservation it accounted for is dropped; one it
        cannot place is moved to another cluster."""
        if status.node or status.status == models.NO_WORKER_CAPACITY:
            self.reserved.pop(iid, None)
        if status.status == models.NO_WORKER_CAPACITY:
            self.excluded.setdefault(iid, set()).add(cluster)

    def cluster_online(self, cluster: str) -> None:
        """*cluster* came back: it may be asked again for what it refused."""
        for excluded in self.excluded.values():
            excluded.discard(cluster)

    def forget(self, iid: str) -> None:
        """*iid* was removed."""
        self.unplaced.pop(iid, None)
        self.reserved.pop(iid, None)
        self.excluded.pop(iid, None)

    def reservations(self) -> dict[str, dict[str, Demand]]:
        """What the root placed and the clusters have not reported yet: ``{cluster: {worker: demand}}``."""
        out: dict[str, dict[str, Demand]] = {}
        for cluster, node, demand in self.reserved.values():
            per_node = out.setdefault(cluster, {})
            prev = per_node.get(node)
            per_node[node] = demand if prev is None else Demand(
                prev.vcpus + demand.vcpus, prev.memory_mb + demand.memory_mb, demand.virtualization,
                service=demand.service, gpus=prev.gpus + demand.gpus)
        return out

    # ---- deciding ------------------------------------------------------------------------------

    @staticmethod
    def moves(gone: Mapping[str, float], instances: Mapping[str, Instance], services: Mapping[str, Service],
              now: float) -> tuple[dict[str, list[str]], float | None]:
        """The instances on clusters *gone* (name -> when it was found gone) whose services' ``disconnect``
        policies say to replace them by *now*, by cluster; and when the next one is due (None: none waits)."""
        out: dict[str, list[str]] = {}
        soonest: float | None = None
        if not gone:
            return out, soonest
        for instance in instances.values():
            gone_at = gone.get(instance.cluster)
            if gone_at is None:
                continue
            at = services[instance.sid].spec.on_disconnect.replace_at(gone_at)
            if at is not None and at <= now:
                out.setdefault(instance.cluster, []).append(instance.iid)
            elif at is not None:
                soonest = at if soonest is None else min(soonest, at)
        return out, soonest

    def decisions(self, instances: Mapping[str, Instance], services: Mapping[str, Service],
                  clusters: Mapping[str, ClusterView], moving: set[str]) -> Iterator[Decided]:
        """Decide, one instance at a time, for every instance without a cluster, *moving*, or refused by
        its cluster. One pass builds each cluster's candidates (after the reservations) once and lowers
        them per decision. *instances* may shrink between two decisions (one removed is skipped)."""
        excluded = self.excluded
        # Only these need a decision: found in one quick pass over the catalog (10,000 instances).
        todo = [iid for iid, instance in instances.items() if not instance.cluster or iid in moving or iid in excluded]
        pools: dict[str, Pool] = {}
        reserved: dict[str, dict[str, Demand]] | None = None
        coords: dict[str, tuple[float, ...]] = {}
        for iid in todo:
            instance = instances.get(iid)
            if instance is None:
                continue  # removed meanwhile
            cluster = "" if iid in moving else instance.cluster
            if cluster and cluster not in excluded.get(iid, ()):
                continue
            if reserved is None:
                reserved = self.reservations()
                coords = {n.name: tuple(n.coord) for v in clusters.values() for n in v.nodes.values() if n.coord}
            yield self._choose(instance, services[instance.sid], clusters, pools, reserved, coords)

    def _choose(self, instance: Instance, service: Service, clusters: Mapping[str, ClusterView],
                pools: dict[str, Pool], reserved: dict[str, dict[str, Demand]],
                coords: dict[str, tuple[float, ...]]) -> Decided:
        """Choose the cluster of *instance* and reserve its worker there, in *pools* and ``self.reserved``."""
        demand = with_targets(service.demand, coords)
        avoid = self.excluded.get(instance.iid, set())
        views = [v for name, v in clusters.items() if name not in avoid]
        decision, worker = choose(demand, views, reserved, self.profile, pools)
        if decision.choice is None:
            reason = decision.why_not() if views else no_cluster_left(clusters, avoid)
            news = self.unplaced.get(instance.iid) != reason
            self.unplaced[instance.iid] = reason
            return Decided(instance.iid, "", reason, news)
        self.unplaced.pop(instance.iid, None)
        cluster = decision.choice.id
        pools[cluster].take(worker, demand)
        self.reserved[instance.iid] = (cluster, worker, demand)
        return Decided(instance.iid, cluster)


def no_cluster_left(clusters: Mapping[str, ClusterView], refused: set[str]) -> str:
    """Why an instance has no cluster to go to, when none is left to ask."""
    if not clusters:
        return "no cluster has joined"
    return f"no cluster can place it: {', '.join(sorted(refused & set(clusters)))} found no worker for it"
