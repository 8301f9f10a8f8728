"""What the root knows of each cluster, rebuilt from the clusters' retained ``avail``/``info``/``state``."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from services.common.liveness import CLUSTER_SILENT_AFTER
from services.common.models import ClusterInfo, InstanceStatus, NodeSummary
from services.common.nettable import NodeRoute
from services.common.plugin_api import Candidate, Demand
from services.common.scheduling import Decision, Profile, place, reserve

# A cluster whose bridge went offline has FAILOVER_GRACE to be heard again (a reconnecting bridge is not a lost
# cluster); one the root has not heard since it started, STARTUP_GRACE. One that sends nothing (its heartbeat
# comes every second) for SILENT_AFTER is gone.
FAILOVER_GRACE = 2.0
STARTUP_GRACE = 10.0
SILENT_AFTER = CLUSTER_SILENT_AFTER
STUCK_AFTER = 20.0  # an instance a cluster accepted and has not reported for this long goes to another one
MIN_CLUSTER_SAMPLE = 10  # workers of one cluster that pass the filters before the root stops looking


@dataclass
class ClusterView:
    """One cluster: online or not, its workers, and the statuses of the instances it runs.

    ``online`` while its bridge is connected and it is heard; ``lost_since`` is when it was last heard,
    once it is found gone (epoch seconds; 0 while it is not): its instances are LOST from then on.
    """

    name: str
    online: bool = False
    info: ClusterInfo | None = None
    nodes: dict[str, NodeSummary] = field(default_factory=dict)
    statuses: dict[str, InstanceStatus] = field(default_factory=dict)
    lost_since: float = 0.0
    suspect: str = ""  # why it is passed over for an instance it accepted and never reported
    overlay: dict[str, NodeRoute] = field(default_factory=dict)

    def set_online(self, online: bool) -> None:
        """Record whether the cluster can take instances now."""
        self.online = online

    def worker_candidates(self, reserved: dict[str, Demand]) -> list[Candidate]:
        """The cluster's online workers as candidates, after the root's *reserved* demands per worker
        (placed by the root, not reported by the cluster yet)."""
        if not self.online or self.suspect:
            return []
        location = self.info.location if self.info else ""
        out = []
        for node in self.nodes.values():
            if not node.online:
                continue
            candidate = node.candidate()
            if not candidate.location:
                candidate = replace(candidate, location=location)
            if node.name in reserved:
                candidate = reserve(candidate, reserved[node.name])
            out.append(candidate)
        return out


@dataclass
class Pool:
    """One cluster's online workers as candidates during one placement pass: built once (after the
    root's reservations), then lowered by each decision with :meth:`take`, so a burst of placements
    costs one decision each instead of rebuilding every candidate for every instance."""

    workers: list[Candidate]
    index: dict[str, int]
    load: float
    names: tuple[str, ...]
    _best: dict[tuple[int, int], tuple[Demand, Decision, Candidate | None]] = field(default_factory=dict)

    @classmethod
    def of(cls, view: ClusterView, reserved: dict[str, Demand]) -> Pool:
        """The pool of *view* after *reserved* (``{worker: demand}``)."""
        workers = view.worker_candidates(reserved)
        load = sum(w.cpu_percent for w in workers) / len(workers) if workers else 0.0
        return cls(workers, {w.id: i for i, w in enumerate(workers)}, load, tuple(w.id for w in workers))

    def take(self, worker: str, demand: Demand) -> None:
        """Lower *worker*'s free resources by *demand* (the root placed an instance there)."""
        i = self.index.get(worker)
        if i is not None:
            self.workers[i] = reserve(self.workers[i], demand)
            self._best.clear()

    def best(self, demand: Demand, profile: Profile, cluster: str = "") -> tuple[Decision, Candidate | None]:
        """The decision among this pool's workers for *demand*, and the chosen worker as a stand-in for
        *cluster* (see :func:`choose`), remembered until the pool changes: in a burst of one service's
        replicas the clusters not chosen last time are asked the same again."""
        key = (id(demand), profile.sample)  # the demand is held below, so its id is not reused meanwhile
        hit = self._best.get(key)
        if hit is None or hit[0] is not demand:
            decision = place(demand, self.workers, profile, "node")
            # The stand-in is the worker that would take the instance, named after its cluster: its
            # resources, labels, location and replicas are what the plugins judge at this level too.
            # Its measured load is the cluster's average, which is steadier than one worker's sample.
            stand_in = None if decision.choice is None else replace(
                decision.choice, id=cluster, node_names=self.names, cpu_percent=self.load)
            hit = self._best[key] = (demand, decision, stand_in)
        return hit[1], hit[2]


def choose(demand: Demand, clusters: list[ClusterView], reserved: dict[str, dict[str, Demand]],
           profile: Profile, pools: dict[str, Pool] | None = None) -> tuple[Decision, str]:
    """Choose a cluster for *demand*, and the worker of it that would take the instance.

    Each cluster is judged by its best worker for this demand, chosen with the same profile (so fit,
    filters and scores all see one real worker, never sums); the clusters are then ranked with the
    profile as candidates that look like their best worker.

    *pools* (cluster -> :class:`Pool`) carries the candidates across the decisions of one pass: a
    cluster's pool is built from *reserved* the first time it is needed; the caller ``take``s from
    it after each decision.
    """
    pools = {} if pools is None else pools
    # Each cluster's best worker is sought among a share of the profile's sample, so one decision looks
    # at about as many workers with 10 clusters as with one.
    inner_profile = profile.sampling(max(MIN_CLUSTER_SAMPLE, profile.sample // max(1, len(clusters))))
    reasons: dict[str, str] = {}
    stand_ins: dict[str, tuple[Candidate, str]] = {}
    for view in clusters:
        if demand.clusters and view.name not in demand.clusters:
            reasons[view.name] = f"not in direct cluster list {','.join(demand.clusters)}"
            continue
        pool = pools.get(view.name)
        if pool is None:
            pool = pools[view.name] = Pool.of(view, reserved.get(view.name, {}))
        workers = pool.workers
        if not workers:
            reasons[view.name] = "offline" if not view.online else view.suspect or "no worker online"
            continue
        inner, stand_in = pool.best(demand, inner_profile, view.name)
        if inner.choice is None or stand_in is None:
            reasons[view.name] = f"no worker fits ({inner.why_not()})"
            continue
        stand_ins[view.name] = (stand_in, inner.choice.id)
    outer = place(demand, [c for c, _ in stand_ins.values()], profile, "cluster")
    decision = Decision(outer.choice, {**reasons, **outer.reasons}, outer.totals)
    return decision, stand_ins[outer.choice.id][1] if outer.choice else ""
