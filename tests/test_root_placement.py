"""Root placement over clusters: a cluster is judged by its best single worker, never by sums."""

from __future__ import annotations

import time

from plugins.schedulers.least_loaded import LeastLoaded
from services.common.models import NodeSummary
from services.common.plugin_api import Demand
from services.common.scheduling import Profile, Weighted
from services.root.clusters import FAILOVER_GRACE, STARTUP_GRACE, ClusterView, choose

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


def test_an_offline_report_keeps_the_startup_grace() -> None:
    """A restarted root reads a cluster's retained "offline" first; its instances wait the startup grace."""
    view = ClusterView("c1")
    view.set_online(False, grace=STARTUP_GRACE)
    view.set_online(False)
    assert view.move_after is not None
    assert view.move_after - time.monotonic() > FAILOVER_GRACE + 1, "the short failover grace did not replace it"
    view.set_online(True)
    view.set_online(False)
    assert view.move_after is not None
    assert view.move_after - time.monotonic() <= FAILOVER_GRACE, "once it was back, a new outage waits the short one"
