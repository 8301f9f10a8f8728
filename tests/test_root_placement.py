"""Root placement over clusters: a cluster is judged by its best single worker, never by sums."""

from __future__ import annotations

from plugins.schedulers.least_loaded import LeastLoaded
from services.common.hookspecs import Demand
from services.common.models import NodeSummary
from services.common.scheduling import place
from services.root.clusters import ClusterView


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
    demand = Demand(1, 1536, "process")
    cands = [small.candidate(demand, {})[0], big.candidate(demand, {})[0]]
    decision = place(demand, cands, LeastLoaded(), "cluster")
    assert decision.choice is not None
    assert decision.choice.id == "big"
    assert decision.reasons == {"small": "memory 1024 < 1536"}


def test_reservations_lower_the_free_capacity() -> None:
    """What the root placed but the cluster has not reported yet counts as used."""
    view = cluster("c", ("a", 4, 1024))
    cand, node = view.candidate(Demand(1, 512, "process"), {"a": (1.0, 768.0)})
    assert node == ""
    assert cand.memory_free_mb == 256


def test_offline_cluster_offers_nothing() -> None:
    """An offline cluster has no capacity and its reason says so."""
    view = cluster("gone", ("a", 4, 4096), online=False)
    decision = place(Demand(1, 10, "process"), [view.candidate(Demand(1, 10, "process"), {})[0]], LeastLoaded(),
                     "cluster")
    assert decision.choice is None
    assert decision.reasons["gone"].startswith("no process runtime")


def test_direct_node_picks_that_worker() -> None:
    """A direct node constraint makes the cluster's candidate that worker."""
    view = cluster("c", ("a", 4, 4000), ("b", 1, 100))
    cand, node = view.candidate(Demand(1, 50, "process", nodes=("b",)), {})
    assert node == "b"
    assert cand.memory_free_mb == 100
