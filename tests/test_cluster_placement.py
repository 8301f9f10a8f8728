"""The cluster's placement and peers as plain logic: no broker, no store, no event loop."""

from __future__ import annotations

from plugins.schedulers.least_loaded import LeastLoaded
from services.cluster.peers import rings
from services.cluster.placement import NodeView, plan, summaries
from services.cluster.reporting import StateReport, status_of
from services.common import models
from services.common.models import InstanceSpec, InstanceStatus, NodeInfo
from services.common.scheduling import Profile, Weighted
from services.common.sla import ServiceSpec

PROFILE = Profile((Weighted(LeastLoaded()),))
WEB = ServiceSpec("a", "t", "web", "t", "process", "", cmd=("sleep", "1"), memory=100, vcpus=1)


def wanted(count: int) -> dict[str, InstanceSpec]:
    return {f"i{k}": InstanceSpec(f"i{k}", "u", WEB.job_name, k, WEB) for k in range(count)}


def workers(*names: str, cores: float = 2) -> dict[str, NodeView]:
    return {n: NodeView(n, online=True, info=NodeInfo(n, cores, 4096, ["process"])) for n in names}


def candidates(nodes: dict[str, NodeView], desired: dict[str, InstanceSpec], assigned: dict[str, str]) -> list:  # type: ignore[type-arg]
    return [s.candidate() for s in summaries(nodes, desired, assigned).values() if s.online]


def test_a_pass_places_what_fits_and_says_why_the_rest_waits() -> None:
    """Two 2-core workers take four 1-vcpu instances, each decision seeing those before it; the fifth
    waits with the reason; what was placed before is not moved."""
    desired, nodes = wanted(5), workers("w1", "w2")
    result = plan(desired, {}, candidates(nodes, desired, {}), PROFILE)
    assert sorted(result.placed) == ["i0", "i1", "i2", "i3"]
    assert sorted(result.placed.values()) == ["w1", "w1", "w2", "w2"]
    assert list(result.unplaced) == ["i4"]
    assert "cpu" in result.unplaced["i4"]
    again = plan(desired, result.placed, candidates(nodes, desired, result.placed), PROFILE)
    assert again.placed == {}, "nothing new to place"
    assert list(again.unplaced) == ["i4"]


def test_no_worker_online_is_the_reason() -> None:
    result = plan(wanted(1), {}, [], PROFILE)
    assert result.unplaced == {"i0": "no worker online"}


def test_summaries_count_declared_demand_and_replicas() -> None:
    desired, nodes = wanted(3), workers("w1", "w2", cores=4)
    summary = summaries(nodes, desired, {"i0": "w1", "i1": "w1", "i2": "w2"}, location="48.1,11.6")
    assert (summary["w1"].cpu_free, summary["w1"].instances) == (2, 2)
    assert summary["w1"].services == {"u/" + WEB.job_name: 2}
    assert summary["w2"].location == "48.1,11.6", "the cluster's location for a worker that gives none"


def test_peers_are_a_small_ring() -> None:
    got = rings([(f"w{k}", f"10.0.0.{k}:1") for k in range(10)], size=3)
    assert [p["name"] for p in got["w0"]] == ["w1", "w2", "w3"]
    assert [p["name"] for p in got["w9"]] == ["w0", "w1", "w2"]
    assert rings([("w0", "a:1")]) == {"w0": []}


def test_the_state_report_converts_only_what_changed() -> None:
    desired, nodes = wanted(2), workers("w1")
    report, assigned = StateReport("c1"), {"i0": "w1"}
    first = report.instances(desired, assigned, nodes, {"i1": "no worker online"})
    assert first["i1"]["status"] == models.NO_WORKER_CAPACITY
    assert first["i0"] == models.dump(status_of("c1", "w1", None, ""))
    nodes["w1"].statuses = {"i0": InstanceStatus(models.RUNNING)}
    second = report.instances(desired, assigned, nodes, {"i1": "no worker online"})
    assert (second["i0"]["status"], second["i0"]["cluster"]) == (models.RUNNING, "c1")
    assert second["i1"] is first["i1"], "unchanged: the same document"
