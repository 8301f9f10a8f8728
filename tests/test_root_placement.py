"""Root placement over clusters: a cluster is judged by its best single worker, never by sums."""

from __future__ import annotations

import dataclasses

from plugins.schedulers.least_loaded import LeastLoaded
from services.common import models
from services.common.models import InstanceStatus, NodeSummary
from services.common.plugin_api import Demand
from services.common.scheduling import Profile, Weighted
from services.common.sla import DisconnectPolicy, ServiceSpec
from services.root.catalog import Instance, Service
from services.root.clusters import ClusterView, choose
from services.root.placement import Placement

PROFILE = Profile((Weighted(LeastLoaded()),))


def cluster(name: str, *nodes: tuple[str, float, float], online: bool = True) -> ClusterView:
    """A cluster whose workers have (name, free vcpus, free memory MB) and 4 cores / 4096 MB each."""
    view = ClusterView(name)
    view.set_online(online)
    view.nodes = {n: NodeSummary(n, True, 4, 4096, cpu, mem, 0.0, ["process"]) for n, cpu, mem in nodes}
    return view


def test_sum_of_small_workers_does_not_fit_a_big_instance() -> None:
    """Two workers with 1 GB free each cannot hold a 1.5 GB instance, though they sum to 2 GB."""
    small = cluster("small", ("a", 4, 1024), ("b", 4, 1024))
    big = cluster("big", ("c", 4, 2048))
    decision, worker = choose(Demand(1, 1536, "process"), [small, big], {}, PROFILE)
    assert decision.choice is not None
    assert (decision.choice.id, worker) == ("big", "c")
    assert decision.reasons == {"small": "no worker fits (a: memory 1024 < 1536; b: memory 1024 < 1536)"}


def test_reservations_lower_the_free_capacity() -> None:
    """What the root placed but the cluster has not reported yet counts as used."""
    view = cluster("c", ("a", 4, 1024))
    decision, _ = choose(Demand(1, 512, "process"), [view], {"c": {"a": Demand(1, 768, "process")}}, PROFILE)
    assert decision.choice is None
    assert decision.why_not() == "c: no worker fits (a: memory 256 < 512)"


def test_offline_cluster_offers_nothing() -> None:
    """An offline cluster is never chosen, and says so."""
    decision, _ = choose(Demand(1, 10, "process"), [cluster("gone", ("a", 4, 4096), online=False)], {}, PROFILE)
    assert decision.choice is None
    assert decision.reasons == {"gone": "offline"}


def test_direct_constraints_pick_the_cluster_and_worker() -> None:
    """Direct cluster and node lists narrow the choice at both levels."""
    c1, c2 = cluster("c1", ("a", 4, 4000)), cluster("c2", ("b", 1, 100), ("d", 4, 4000))
    decision, worker = choose(Demand(1, 50, "process", nodes=("b",)), [c1, c2], {}, PROFILE)
    assert decision.choice is not None
    assert (decision.choice.id, worker) == ("c2", "b")
    decision, worker = choose(Demand(1, 50, "process", clusters=("c1",)), [c1, c2], {}, PROFILE)
    assert decision.choice is not None
    assert (decision.choice.id, worker) == ("c1", "a")
    assert decision.reasons == {"c2": "not in direct cluster list c1"}


def test_placement_decides_one_instance_at_a_time_without_a_broker() -> None:
    """The root's placement as plain logic: decisions come one by one (the orchestrator turns the loop
    between them), each sees the reservations of those before it, a refused instance goes elsewhere, and
    the moves off a failed cluster are reported once."""
    spec = ServiceSpec("a", "t", "web", "t", "process", "", memory=1024, vcpus=1)
    service = Service("s1", "u", "app", spec, replicas=5)
    instances = {f"i{k}": Instance(f"i{k}", "s1", k) for k in range(5)}
    clusters = {"c1": cluster("c1", ("a", 4, 2048)), "c2": cluster("c2", ("b", 4, 2048))}
    placement = Placement(PROFILE)
    decided = list(placement.decisions(instances, {"s1": service}, clusters, set()))
    assert [d.iid for d in decided] == list(instances)
    assert sorted(d.cluster for d in decided) == ["", "c1", "c1", "c2", "c2"], "2 GB each: two per cluster"
    waiting = next(d for d in decided if not d.cluster)
    assert waiting.news
    assert "memory" in placement.unplaced[waiting.iid]
    placed = {d.iid: d.cluster for d in decided if d.cluster}
    assert sorted(c for c, _, _ in placement.reserved.values()) == sorted(placed.values())
    instances.update({iid: dataclasses.replace(instances[iid], cluster=c) for iid, c in placed.items()})
    refused = next(iid for iid, c in placed.items() if c == "c1")
    placement.absorb("c1", refused, InstanceStatus(models.NO_WORKER_CAPACITY, "full"))
    again = [d for d in placement.decisions(instances, {"s1": service}, clusters, set()) if d.iid == refused]
    assert [d.cluster for d in again] in (["c2"], [""]), "never c1 again"
    placement.absorb("c2", refused, InstanceStatus(models.NO_WORKER_CAPACITY, "full"))
    (last,) = [d for d in placement.decisions(instances, {"s1": service}, clusters, set()) if d.iid == refused]
    assert last.reason == "no cluster can place it: c1, c2 found no worker for it", "not 'no cluster has joined'"
    moved, due = placement.moves({"c1": 10.0}, instances, {"s1": service}, 10.0)
    assert sorted(moved["c1"]) == sorted(iid for iid, i in instances.items() if i.cluster == "c1")
    assert due is None


def test_moves_follow_each_services_disconnect_policy() -> None:
    """Off a gone cluster, an instance moves once its service's lost_after is over, never when it says not
    to replace it; the next due time is given so the root can come back for it."""
    def service(sid: str, policy: DisconnectPolicy) -> Service:
        spec = ServiceSpec("a", "t", sid, "t", "process", "", memory=10, vcpus=0.1, disconnect=policy)
        return Service(sid, "u", "app", spec, replicas=1)
    services = {"fast": service("fast", DisconnectPolicy()), "slow": service("slow", DisconnectPolicy(lost_after=30)),
                "kept": service("kept", DisconnectPolicy(replace=False))}
    instances = {sid: Instance(sid, sid, 0, cluster="c1") for sid in services}
    assert Placement.moves({}, instances, services, 100.0) == ({}, None), "nothing gone"
    assert Placement.moves({"c1": 100.0}, instances, services, 100.0) == ({"c1": ["fast"]}, 130.0)
    assert Placement.moves({"c1": 100.0}, instances, services, 130.0) == ({"c1": ["fast", "slow"]}, None)
    assert Placement.moves({"c2": 100.0}, instances, services, 500.0) == ({}, None), "another cluster"
