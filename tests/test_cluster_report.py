"""The cluster's state report: throttled by its own cost, converting only what changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugins.schedulers.least_loaded import LeastLoaded
from services.cluster.orchestrator import ClusterOrchestrator, NodeView, ReportThrottle
from services.common import envelope, models
from services.common.models import InstanceSpec, NodeInfo
from services.common.scheduling import Profile, Weighted
from services.common.store import Store
from tests.test_root_burst import FakeSession


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
    desired = {f"i{k}": models.dump(InstanceSpec(f"i{k}", "u", "a.t.s.t", k, service)) for k in range(4)}
    await orch._on_desired(envelope.encode("desired", {"instances": desired}, "root"))
    first = orch.state()
    assert sorted(first["instances"]) == ["i0", "i1", "i2", "i3"]
    # the same as converting everything afresh
    assert first["nodes"] == {n: models.dump(s) for n, s in orch.summaries().items()}
    assert first["instances"] == {i: models.dump(s) for i, s in orch.statuses().items()}
    # the same desired map again keeps the specs, so nothing is converted again
    await orch._on_desired(envelope.encode("desired", {"instances": desired}, "root"))
    second = orch.state()
    assert second == first
    assert all(second["instances"][i] is first["instances"][i] for i in desired)
    assert all(second["nodes"][n] is first["nodes"][n] for n in first["nodes"])
    # a worker reports one instance RUNNING: only that instance's document is new
    iid, node = next(iter(orch.assigned.items()))
    orch._on_state(orch.nodes[node], {"instances": {iid: {"status": "RUNNING"}}})
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
    desired = {f"i{k}": models.dump(InstanceSpec(f"i{k}", "u", "a.t.s.t", k, service)) for k in range(6)}
    await orch._on_desired(envelope.encode("desired", {"instances": desired}, "root"))
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
