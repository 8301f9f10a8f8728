"""The cluster's state report: throttled by its own cost, converting only what changed."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from plugins.schedulers.least_loaded import LeastLoaded
from services.cluster.orchestrator import ASSIGNED, DESIRED, ClusterOrchestrator
from services.cluster.placement import NodeView
from services.common import channels, envelope, models
from services.common.delta import DeltaPublisher, DeltaReceiver, DeltaSender
from services.common.models import InstanceSpec, NodeInfo, NodeState
from services.common.scheduling import Profile, Weighted
from services.common.sla import ServiceSpec
from services.common.store import Store
from services.common.throttle import ReportThrottle
from tests.fakes import FakeSession, deliver
from tests.stack import eventually

WHOLE = channels.downstream(channels.CLUSTER_DESIRED).topic()
UPSTREAM_STATE = channels.upstream(channels.CLUSTER_STATE)


def test_the_throttle_spaces_reports_by_their_cost() -> None:
    throttle = ReportThrottle(minimum=0.2, factor=10, coalesce=0.005)
    assert throttle.delay(100.0) == 0.005  # nothing ran yet: only coalesce
    throttle.ran(100.0, 100.001)  # cheap: the minimum spacing applies
    assert abs(throttle.delay(100.05) - 0.15) < 1e-9
    assert throttle.delay(101.0) == 0.005  # long after: only coalesce
    throttle.ran(200.0, 200.1)  # 100 ms: the next waits 10 x as long
    assert abs(throttle.delay(200.1) - 0.9) < 1e-9


async def test_state_reuses_the_documents_of_what_did_not_change(tmp_path: Path) -> None:
    session = FakeSession()
    orch = ClusterOrchestrator("c1", Store(tmp_path / "c.json"), Profile((Weighted(LeastLoaded()),)), session)  # type: ignore[arg-type]
    for name in ("w1", "w2"):
        orch.nodes[name] = NodeView(name, online=True, info=NodeInfo(name, 4, 4096, ["process"]))
    service = {"app_name": "a", "app_namespace": "t", "name": "s", "namespace": "t", "virtualization": "process",
               "code": "", "cmd": ["sleep", "1"], "memory": 10, "vcpus": 1}
    desired = {f"i{k}": InstanceSpec(f"i{k}", "u", "a.t.s.t", k, ServiceSpec.from_dict(service)).doc for k in range(4)}
    await deliver(orch, orch.session, WHOLE, envelope.encode("desired", {"instances": desired}, "root"), True)
    await orch.placed()
    first = orch.state()
    assert sorted(first["instances"]) == ["i0", "i1", "i2", "i3"]
    # the same as converting everything afresh
    assert first["nodes"] == {n: models.dump(s) for n, s in orch.summaries().items()}
    assert first["instances"] == {i: models.dump(s) for i, s in orch.statuses().items()}
    # the same desired map again keeps the specs, so nothing is converted again
    await deliver(orch, orch.session, WHOLE, envelope.encode("desired", {"instances": desired}, "root"), True)
    await orch.placed()
    second = orch.state()
    assert second == first
    assert all(second["instances"][i] is first["instances"][i] for i in desired)
    assert all(second["nodes"][n] is first["nodes"][n] for n in first["nodes"])
    # a worker reports one instance RUNNING: only that instance's document is new
    iid, node = next(iter(orch.assigned.items()))
    orch._on_state(orch.nodes[node], NodeState.load({"instances": {iid: {"status": "RUNNING"}}}))
    third = orch.state()
    assert third["instances"][iid]["status"] == "RUNNING"
    assert [i for i in desired if third["instances"][i] is not first["instances"][i]] == [iid]
    # a worker's published desired map holds its instances' specs
    maps = {t: envelope.decode(p).data for t, p in session.published if t.endswith("/desired")}
    assert sum(len(m["instances"]) for m in maps.values()) == 4


async def test_workers_lost_together_are_moved_in_one_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    orch = ClusterOrchestrator("c1", Store(tmp_path / "c.json"), Profile((Weighted(LeastLoaded()),)), FakeSession())  # type: ignore[arg-type]
    for name in ("w1", "w2", "w3"):
        orch.nodes[name] = NodeView(name, online=True, info=NodeInfo(name, 8, 4096, ["process"]))
    service = {"app_name": "a", "app_namespace": "t", "name": "s", "namespace": "t", "virtualization": "process",
               "code": "", "cmd": ["sleep", "1"], "memory": 10, "vcpus": 1}
    desired = {f"i{k}": InstanceSpec(f"i{k}", "u", "a.t.s.t", k, ServiceSpec.from_dict(service)).doc for k in range(6)}
    await deliver(orch, orch.session, WHOLE, envelope.encode("desired", {"instances": desired}, "root"), True)
    await orch.placed()
    assert set(orch.assigned.values()) == {"w1", "w2", "w3"}
    passes = 0
    place = orch.place_pending

    async def counted() -> None:
        nonlocal passes
        passes += 1
        await place()

    monkeypatch.setattr(orch, "place_pending", counted)
    await orch._on_avail(orch.nodes["w1"], False)
    await orch._on_avail(orch.nodes["w2"], False)
    assert orch._placing is not None
    await orch._placing
    assert passes == 1
    assert set(orch.assigned.values()) == {"w3"}
    assert len(orch.assigned) == 6


async def test_the_root_desired_map_arrives_as_deltas_and_the_state_leaves_as_deltas(tmp_path: Path) -> None:
    """Desired changes applied from deltas (only changed specs stored), a gap healed by the whole map, and
    the cluster's state published as deltas the root's receiver folds back into the whole state."""

    session = FakeSession()
    orch = ClusterOrchestrator("c1", Store(tmp_path / "c.json"), Profile((Weighted(LeastLoaded()),)), session)  # type: ignore[arg-type]
    orch.nodes["w1"] = NodeView("w1", online=True, info=NodeInfo("w1", 8, 4096, ["process"]))
    service = {"app_name": "a", "app_namespace": "t", "name": "s", "namespace": "t", "virtualization": "process",
               "code": "", "cmd": ["sleep", "1"], "memory": 10, "vcpus": 1}
    spec = {f"i{k}": InstanceSpec(f"i{k}", "u", "a.t.s.t", k, ServiceSpec.from_dict(service)).doc for k in range(6)}
    root = DeltaSender(("instances",), epoch="r1")
    whole, delta = WHOLE, channels.downstream(channels.CLUSTER_DESIRED_DELTA).topic()

    async def send(instances: dict[str, Any], lost: bool = False) -> None:
        change = root.diff({"instances": instances})
        assert change is not None
        if not lost:
            await deliver(orch, session, delta, envelope.encode("desired.delta", change.data(), "root"))
            await orch.placed()

    root.diff({"instances": {}})
    await deliver(orch, session, whole, envelope.encode("desired", root.whole(), "root"), True)
    await orch.placed()
    await send({"i0": spec["i0"], "i1": spec["i1"]})
    assert sorted(orch.assigned) == ["i0", "i1"]
    await send({"i1": spec["i1"]})
    assert sorted(orch.desired) == ["i1"]
    assert sorted(await Store(tmp_path / "c.json").load(DESIRED)) == ["i1"]  # on disk
    await send({"i1": spec["i1"], "i2": spec["i2"]}, lost=True)
    await send({"i1": spec["i1"], "i2": spec["i2"], "i3": spec["i3"]})
    assert sorted(orch.desired) == ["i1"]  # i3's delta waits for the lost one
    await deliver(orch, session, whole, envelope.encode("desired", root.whole(), "root"), True)
    await orch.placed()
    assert sorted(orch.desired) == ["i1", "i2", "i3"]
    assert sorted(orch.assigned) == ["i1", "i2", "i3"]

    # the state, as deltas: the root's receiver ends with the cluster's whole state
    out = DeltaPublisher(session, UPSTREAM_STATE, "cluster/c1")
    session.published.clear()
    out.update(orch.state())
    orch._on_state(orch.nodes["w1"], NodeState.load({"instances": {"i2": {"status": "RUNNING"}}}))
    out.update(orch.state())
    receiver = DeltaReceiver(UPSTREAM_STATE.sections)
    for topic, payload in session.published:
        data = envelope.decode(payload).data
        receiver.delta(data) if topic.endswith("/delta") else receiver.whole(data)
    assert [t for t, _ in session.published] == [UPSTREAM_STATE.topic(),
                                                 channels.upstream(channels.CLUSTER_STATE_DELTA).topic()]
    assert len(envelope.decode(session.published[1][1]).data["put"]["instances"]) == 1  # only i2
    assert receiver.docs == orch.state()
    out.close()


async def test_a_restarted_cluster_ignores_a_retained_desired_map_older_than_its_own(tmp_path: Path) -> None:
    """The root publishes its whole desired map only once changes settle: a cluster restarted meanwhile reads
    a retained map that still holds what was dropped since. Its stored copy says which version it is, so the
    older map is ignored and the next delta still applies."""
    service = {"app_name": "a", "app_namespace": "t", "name": "s", "namespace": "t", "virtualization": "process",
               "code": "", "cmd": ["sleep", "1"], "memory": 10, "vcpus": 1}
    spec = {f"i{k}": InstanceSpec(f"i{k}", "u", "a.t.s.t", k, ServiceSpec.from_dict(service)).doc for k in range(3)}
    root = DeltaSender(("instances",), epoch="r1")
    delta = channels.downstream(channels.CLUSTER_DESIRED_DELTA).topic()

    def cluster() -> tuple[ClusterOrchestrator, Store]:
        store = Store(tmp_path / "c.json")
        return ClusterOrchestrator("c1", store, Profile((Weighted(LeastLoaded()),)), FakeSession()), store  # type: ignore[arg-type]

    orch, store = cluster()
    await orch.restore()
    root.diff({"instances": {"i0": spec["i0"], "i1": spec["i1"]}})
    retained = root.whole()  # the whole map of i0 and i1, retained; then i1 is dropped by a delta
    await deliver(orch, orch.session, WHOLE, envelope.encode("desired", retained, "root"), True)
    change = root.diff({"instances": {"i0": spec["i0"]}})
    assert change is not None
    await deliver(orch, orch.session, delta, envelope.encode("desired.delta", change.data(), "root"))
    await orch.placed()
    store.close()

    orch, store = cluster()  # restarted: it reads the retained map first
    await orch.restore()
    assert sorted(orch.desired) == ["i0"]
    await deliver(orch, orch.session, WHOLE, envelope.encode("desired", retained, "root"), True)
    await orch.placed()
    assert sorted(orch.desired) == ["i0"], "the older retained map brought back a dropped instance"
    change = root.diff({"instances": {"i0": spec["i0"], "i2": spec["i2"]}})
    assert change is not None
    await deliver(orch, orch.session, delta, envelope.encode("desired.delta", change.data(), "root"))
    await orch.placed()
    assert sorted(orch.desired) == ["i0", "i2"]
    other = DeltaSender(("instances",), epoch="r2")  # a restarted root: its map is followed as it is
    other.diff({"instances": {"i2": spec["i2"]}})
    await deliver(orch, orch.session, WHOLE, envelope.encode("desired", other.whole(), "root"), True)
    await orch.placed()
    assert sorted(orch.desired) == ["i2"]
    store.close()


class GatedStore(Store):
    """A store whose writes wait until the test opens the gate (a slow disk, or a big file)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()

    async def sync(self) -> None:
        await self.gate.wait()
        await super().sync()


class DiskCheckingSession(FakeSession):
    """Notes, for every worker map and cluster state published, what the store's file held at that moment."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.on_disk: list[tuple[str, set[str], set[str]]] = []

    def publish(self, topic: str, payload: bytes, retain: bool = False, qos: int = 1) -> None:
        super().publish(topic, payload, retain)
        self.on_disk.append((topic, set(stored(self.path, DESIRED)), set(stored(self.path, ASSIGNED))))


def stored(path: Path, table: str) -> dict[str, Any]:
    """What a fresh store on *path* reads of *table* (as a restarted cluster would), from any thread."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, Store(path).load(table)).result()


async def test_the_dispatch_never_waits_for_the_store_and_nothing_is_told_before_it_is_on_disk(tmp_path: Path) -> None:
    """A desired delta is taken at once while the store's write is held up; the placements it causes reach
    the workers, and the state reaches the root, only once they are on disk. An idle cluster places the
    first delta at once; the deltas arriving while that pass waits for its write share the next pass."""
    path = tmp_path / "c.json"
    session = DiskCheckingSession(path)
    store = GatedStore(path)
    orch = ClusterOrchestrator("c1", store, Profile((Weighted(LeastLoaded()),)), session)  # type: ignore[arg-type]
    for name in ("w1", "w2"):
        orch.nodes[name] = NodeView(name, online=True, info=NodeInfo(name, 8, 4096, ["process"]))
    service = {"app_name": "a", "app_namespace": "t", "name": "s", "namespace": "t", "virtualization": "process",
               "code": "", "cmd": ["sleep", "1"], "memory": 10, "vcpus": 1}
    spec = {f"i{k}": InstanceSpec(f"i{k}", "u", "a.t.s.t", k, ServiceSpec.from_dict(service)).doc for k in range(6)}
    root = DeltaSender(("instances",), epoch="r1")
    root.diff({"instances": {}})
    whole, delta = WHOLE, channels.downstream(channels.CLUSTER_DESIRED_DELTA).topic()
    await asyncio.wait_for(deliver(orch, session, whole, envelope.encode("desired", root.whole(), "root"), True), 1)
    await orch.placed()
    passes: list[int] = []  # instances waiting for a worker, at each placement pass
    place = orch._place_pending

    async def counted() -> None:
        passes.append(len(orch.desired) - len(orch.assigned))
        await place()

    orch._place_pending = counted  # type: ignore[method-assign]
    everything = set(spec)
    for k in (2, 4, 6):  # three deltas in a row, each taken at once
        change = root.diff({"instances": {i: spec[i] for i in list(spec)[:k]}})
        assert change is not None
        await asyncio.wait_for(deliver(orch, session, delta, envelope.encode("desired.delta", change.data(), "root")),
                               1)
        if k == 2:
            for _ in range(5):  # a few turns of the event loop, no timer: an idle cluster places at once
                await asyncio.sleep(0)
            assert passes == [2]
            await eventually(lambda: sorted(orch.assigned) == ["i0", "i1"], 5, 0.01,
                             what="the first delta placed (its pass waits for the write)")
    assert set(orch.desired) == everything
    out = DeltaPublisher(session, UPSTREAM_STATE, "cluster/c1")
    report = asyncio.create_task(orch.report(out))
    await asyncio.sleep(0.1)
    assert not report.done()
    assert session.published == []  # neither the workers' maps nor the state: nothing is on disk yet
    store.gate.set()
    await orch.placed()
    await report
    assert [p for p in passes if p] == [2, 4]  # the second pass placed what the next two deltas brought
    assert set(orch.assigned) == everything
    maps = [(t, d, a) for t, d, a in session.on_disk if t.endswith("/desired")]
    assert {t for t, _, _ in maps} == {channels.NODE_DESIRED.topic(node=w) for w in ("w1", "w2")}
    for (topic, payload), (_, desired, assigned) in zip(session.published, session.on_disk, strict=True):
        told = set(envelope.decode(payload).data["instances"])  # a worker's map, or every instance (the state)
        stored = assigned if topic.endswith("/desired") else desired
        assert told <= stored, f"{topic} told of {sorted(told - stored)} before they were on disk"
    states = [envelope.decode(p).data for t, p in session.published if t == UPSTREAM_STATE.topic()]
    assert len(states) == 1
    assert sorted(states[0]["instances"]) == sorted(everything)
    out.close()


def test_a_change_of_health_is_reported_at_once(tmp_path: Path) -> None:
    """A worker's report where only an instance's health changed wakes the cluster's report (readiness: the
    root and every worker's net table wait for it), as a new status does; new metrics alone do not."""
    orch = ClusterOrchestrator("c1", Store(tmp_path / "c.json"), Profile((Weighted(LeastLoaded()),)), FakeSession())  # type: ignore[arg-type]
    node = orch.nodes["w1"] = NodeView("w1", online=True)
    running = {"status": "RUNNING", "ip": "10.18.0.2", "health": "starting"}
    orch._on_state(node, NodeState.load({"instances": {"i1": running}}))
    orch._changed.clear()
    orch._on_state(node, NodeState.load({"instances": {"i1": running}, "cpu_percent": 50.0}))
    assert not orch._changed.is_set()
    orch._on_state(node, NodeState.load({"instances": {"i1": {**running, "health": "healthy"}}}))
    assert orch._changed.is_set()
