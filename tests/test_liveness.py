"""Silence, loss and fencing as plain logic: who is gone (services/common/liveness.py), what a cut-off
tier stops (services/common/fencing.py), the SLA's ``disconnect`` policy, and what the cluster does with
an instance on a gone worker under each policy (services/cluster/orchestrator.py, on a fake session)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from plugins.schedulers.least_loaded import LeastLoaded
from services.cluster.orchestrator import ClusterOrchestrator
from services.cluster.placement import NodeView
from services.common import envelope, models
from services.common.channels import CLUSTER_DESIRED, downstream
from services.common.fencing import REJOIN_WAIT, Fencing, to_fence
from services.common.liveness import Liveness
from services.common.models import InstanceSpec, NodeInfo, NodeState
from services.common.scheduling import Profile, Weighted
from services.common.sla import DisconnectPolicy, ServiceSpec, SlaError, parse_sla
from services.common.store import Store
from tests.conftest import sla, sleeper
from tests.fakes import FakeSession, deliver

# ---- liveness -------------------------------------------------------------------------------------


def test_a_child_is_gone_once_silent_for_longer_than_it_may_be() -> None:
    live = Liveness()
    live.hear("w1", 100.0, 5.0)
    live.hear("w2", 100.0, 5.0)
    assert live.check(104.5) == []
    live.hear("w2", 104.5, 5.0)
    assert live.check(105.25) == ["w1"], "w1 said nothing for 5.25 s"
    assert live.since("w1") == 105.0, "gone from the moment its silence ran out"
    assert live.check(105.5) == [], "found once"
    assert live.hear("w1", 106.0, 5.0), "heard again: it is back"
    assert live.since("w1") is None


def test_silence_is_counted_only_up_to_the_oldest_message_not_yet_read() -> None:
    """A busy parent has not read what its children sent: their silence ends at its horizon."""
    live = Liveness()
    live.hear("w1", 100.0, 5.0)
    assert live.check(110.0, horizon=104.0) == [], "a message received at 104 still waits: w1 may be in it"
    assert live.check(110.2, horizon=110.2) == ["w1"]


def test_with_many_children_silence_is_counted_against_the_freshest() -> None:
    """A parent whose input stalls where it cannot see (a broker's queues) hears all its children fall
    silent at once: that is its own lag, and nobody is called silent; one child that stops while the others
    report still is."""
    live = Liveness()
    for k in range(20):
        live.hear(f"w{k}", 100.0 + k * 0.05, 5.0)  # the last reports, 100.0-100.95
    assert live.upto(108.0) == 100.0 + 19 * 0.05 + 1.0, "a second after the freshest message"
    assert [live.check(t) for t in (107.5, 108.0)] == [[], []], "everybody late together: nobody silent"
    for k in range(1, 20):
        live.hear(f"w{k}", 108.1, 5.0)  # the input flows again; w0 alone stays quiet
    assert live.check(108.25) == ["w0"]
    few = Liveness()
    few.hear("a", 100.0, 5.0)
    few.hear("b", 100.0, 5.0)
    assert few.upto(110.0) == 110.0, "with a few children each one is judged alone"


def test_silence_is_counted_only_up_to_as_long_ago_as_messages_take_to_arrive() -> None:
    """Reports that arrive 20 s after they were sent (an overloaded broker): nobody is silent until it
    has been quiet for that long on top; the children's clocks may be off (only the lag beyond each one's
    fastest counts)."""
    live = Liveness()
    live.hear("w1", 100.0, 5.0, lag=3600.0)  # its clock is an hour behind, its messages were quick
    live.hear("w2", 100.0, 5.0, lag=0.01)
    live.hear("w1", 105.0, 5.0, lag=3620.0)  # then 20 s late, like the others
    live.hear("w2", 105.0, 5.0, lag=20.01)
    assert live.delay(105.5) == 20.0
    assert live.check(110.5) == [], "5.5 s since the last, but messages take 20 s: nobody is silent"
    assert envelope.sent_at(envelope.encode("node.state", {"x": 1}, "node/w1")) is not None
    assert envelope.sent_at(b'{"n": 3, "ts": 1796587787.533}') == 1796587787.533
    assert envelope.sent_at(b"{}") is None


def test_many_children_silent_at_once_are_held_back() -> None:
    """More than a quarter of the children (and more than ten) silent within one silence: the parent's own
    pause, not theirs; nobody is called gone until they are heard or the mass is over."""
    live = Liveness()
    for k in range(40):
        live.hear(f"w{k}", 99.0 if k < 15 else 104.0, 5.0)
    assert live.check(105.5) == [], "15 of 40 at once: held"
    assert live.held == 15
    for k in range(15, 40):
        live.hear(f"w{k}", 105.6, 5.0)
    assert live.check(105.75) == [], "still held: looked at again each check"
    assert live.held == 15
    alone = Liveness()
    for k in range(40):
        alone.hear(f"w{k}", 99.0 if k == 0 else 104.0, 5.0)
    assert alone.check(105.5) == ["w0"], "one of forty"


def test_a_late_check_decides_nothing() -> None:
    """After a stall (this process was frozen or starved) nothing that arrived meanwhile has been read."""
    live = Liveness()
    live.hear("w1", 100.0, 5.0)
    assert live.check(100.5) == []
    assert live.check(130.0) == [], "30 s since the last check: a stall, not 30 s of silence"
    assert live.check(130.25) == ["w1"], "the next check, on time, does decide"


def test_a_closed_connection_is_gone_at_once_and_expect_gives_time() -> None:
    live = Liveness()
    assert live.closed("w1", 50.0), "a last will: gone, even if never heard live"
    assert not live.closed("w1", 51.0), "once"
    live.expect("w2", until=70.0, silent_after=5.0)  # a restarted parent waits for it
    assert live.check(69.9) == []
    assert live.check(70.1) == ["w2"]


# ---- fencing --------------------------------------------------------------------------------------


def _spec(iid: str, policy: DisconnectPolicy | None = None) -> InstanceSpec:
    service = ServiceSpec("a", "t", iid, "t", "process", "", cmd=("sleep", "1"), memory=10, vcpus=0.1,
                          disconnect=policy)
    return InstanceSpec(iid, "u", service.job_name, 0, service)


def test_fencing_stops_what_asks_for_it_and_starts_it_once_the_link_is_steady() -> None:
    """Cut off once the link has been quiet as long as the parent waits before calling this tier gone (5 s
    here), an instance stops stop_after seconds later: on the parent's lost_after clock."""
    desired = {"edge": _spec("edge", DisconnectPolicy(stop_after=2)), "web": _spec("web")}
    assert to_fence(desired, 1.9) == frozenset()
    assert to_fence(desired, 2.0) == {"edge"}, "only the service with stop_after"
    fencing = Fencing(cut_after=5.0)
    assert fencing.wanted(lambda: desired, frozenset(), 6.9, 9.75) == frozenset(), "cut off for 1.9 s only"
    fenced = fencing.wanted(lambda: desired, frozenset(), 7.0, 10.0)
    assert fenced == {"edge"}
    fenced = fencing.wanted(lambda: desired, fenced, 0.1, 10.25)
    assert fenced == {"edge"}, "the link is back, but not for long enough to have the parent's map"
    fenced = fencing.wanted(lambda: desired, fenced, 0.1, 10.25 + REJOIN_WAIT * 0.9)
    assert fenced == {"edge"}
    assert fencing.wanted(lambda: desired, fenced, 0.1, 10.25 + REJOIN_WAIT) == frozenset()
    late = Fencing(cut_after=5.0)
    late.wanted(lambda: desired, frozenset(), 0.0, 20.0)
    assert late.wanted(lambda: desired, frozenset(), 9.0, 40.0) == frozenset(), "a late look (a stall) changes nothing"
    assert late.wanted(lambda: {}, frozenset({"gone"}), 0.0, 40.25) == frozenset(), "no longer desired: not fenced"


# ---- the SLA --------------------------------------------------------------------------------------


def test_the_disconnect_policy_is_read_checked_and_kept() -> None:
    policy = {"lost_after": 30, "replace": False, "stop_after": 10, "reconcile": "keep_original"}
    spec = parse_sla(sla(sleeper("db", disconnect=policy)))[0].services[0]
    assert spec.disconnect == DisconnectPolicy(30.0, False, 10.0, "keep_original")
    assert ServiceSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_sla()["disconnect"] == spec.disconnect.to_dict()
    assert parse_sla(sla(sleeper("web")))[0].services[0].on_disconnect == DisconnectPolicy(), "the defaults"
    for bad, field in (({"lost_after": -1}, "lost_after"), ({"stop_after": "soon"}, "stop_after"),
                       ({"replace": "no"}, "replace"), ({"reconcile": "newest"}, "reconcile"),
                       ({"lost_afer": 5}, "lost_afer"), ({"lost_after": 1e9}, "lost_after"), ("5s", "disconnect")):
        with pytest.raises(SlaError) as caught:
            parse_sla(sla(sleeper("db", disconnect=bad)))
        assert caught.value.field.endswith(field), (bad, caught.value)


# ---- the cluster's policies -----------------------------------------------------------------------


async def _cluster(tmp_path: Path, policies: dict[str, dict[str, Any] | None]) -> ClusterOrchestrator:
    """A cluster with workers w1 and w2, and one instance per service of *policies* placed on w1."""
    orch = ClusterOrchestrator("c1", Store(tmp_path / "c.json"), Profile((Weighted(LeastLoaded()),)),
                               FakeSession())  # type: ignore[arg-type]
    orch.nodes["w1"] = NodeView("w1", online=True, info=NodeInfo("w1", 8, 8192, ["process"]))
    desired = {}
    for name, policy in policies.items():
        extra: dict[str, Any] = {"disconnect": policy} if policy else {}
        service = parse_sla(sla(sleeper(name, **extra)))[0].services[0]
        desired[name] = InstanceSpec(name, "u", service.job_name, 0, service).doc
    await deliver(orch, orch.session, downstream(CLUSTER_DESIRED).topic(),
                  envelope.encode("desired", {"instances": desired}, "root"), True)
    await orch.placed()
    assert set(orch.assigned.values()) == {"w1"}
    orch.nodes["w2"] = NodeView("w2", online=True, info=NodeInfo("w2", 8, 8192, ["process"]))
    orch._on_state(orch.nodes["w1"], NodeState.load({"instances": {n: {"status": "RUNNING"} for n in policies}}))
    return orch


async def test_a_gone_workers_instances_are_lost_then_replaced_as_their_policies_say(tmp_path: Path) -> None:
    orch = await _cluster(tmp_path, {"web": None, "slow": {"lost_after": 30}, "db": {"replace": False}})
    orch.liveness.hear("w1", time.monotonic(), 5.0)
    await orch._on_avail(orch.nodes["w1"], False)  # its last will
    await orch.placed()
    assert orch.assigned == {"web": "w2", "slow": "w1", "db": "w1"}, "only the default one moved at once"
    statuses = orch.statuses()
    assert statuses["slow"].status == statuses["db"].status == models.LOST
    assert "worker w1 silent since" in statuses["db"].reason
    assert orch.summaries()["w1"].silent_since > 0
    orch.liveness.gone["w1"] -= 31  # 31 s later
    orch.watch()
    await orch.placed()
    assert orch.assigned == {"web": "w2", "slow": "w2", "db": "w1"}, "replace: false waits for its worker"


@pytest.mark.parametrize(("reconcile", "kept"), [("keep_original", "w1"), ("keep_replacement", "w2")])
async def test_the_original_or_the_replacement_is_kept_when_the_worker_returns(
        tmp_path: Path, reconcile: str, kept: str) -> None:
    orch = await _cluster(tmp_path, {"pg": {"reconcile": reconcile}})
    await orch._on_avail(orch.nodes["w1"], False)
    await orch.placed()
    assert orch.assigned["pg"] == "w2"
    maps = orch._maps({"w1", "w2"})
    assert ("pg" in maps["w1"]) == (reconcile == "keep_original"), "held in w1's map only when it may be kept"
    orch.liveness.hear("w1", time.monotonic(), 5.0)  # it is back, and still runs its copy
    await orch._on_avail(orch.nodes["w1"], True)
    orch._on_state(orch.nodes["w1"], NodeState.load({"instances": {"pg": {"status": "RUNNING"}}}))
    await orch.placed()
    assert orch.assigned["pg"] == kept
    maps = orch._maps({"w1", "w2"})
    assert [n for n in ("w1", "w2") if "pg" in maps[n]] == [kept], "exactly one worker's map holds it"


async def test_an_original_that_no_longer_runs_leaves_the_replacement_in_place(tmp_path: Path) -> None:
    orch = await _cluster(tmp_path, {"pg": {"reconcile": "keep_original"}})
    await orch._on_avail(orch.nodes["w1"], False)
    await orch.placed()
    await orch._on_avail(orch.nodes["w1"], True)
    orch._on_state(orch.nodes["w1"], NodeState.load({"instances": {}}))  # restarted empty, or fenced
    await orch.placed()
    assert orch.assigned["pg"] == "w2"
    assert "pg" not in orch._maps({"w1"})["w1"]


async def test_a_cluster_cut_off_from_the_root_fences_by_policy(tmp_path: Path) -> None:
    orch = await _cluster(tmp_path, {"edge": {"stop_after": 2}, "web": None})
    orch.watch()
    orch._root_heard -= 5.5  # the root's heartbeat stopped 5.5 s ago: cut off (4 s) for 1.5 s
    orch.watch()
    assert orch.fenced == frozenset(), "stop_after 2 is not over"
    orch._root_heard -= 0.5
    orch.watch()
    await orch.placed()
    assert orch.fenced == {"edge"}
    assert set(orch._maps({"w1"})["w1"]) == {"web"}, "w1 stops edge"
