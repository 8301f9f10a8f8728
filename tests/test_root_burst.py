"""The root places a burst in one pass (candidates built once, lowered per decision) after answering."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from plugins.schedulers.least_loaded import LeastLoaded
from services.common import channels, envelope, models
from services.common.delta import DeltaReceiver, DeltaSender
from services.common.models import InstanceSpec, InstanceStatus, NodeSummary
from services.common.plugin_api import Demand
from services.common.scheduling import Profile, Weighted
from services.common.sla import ServiceSpec, parse_sla
from services.common.store import Store
from services.root.catalog import Catalog, Service
from services.root.clusters import ClusterView, Pool, choose
from services.root.orchestrator import RootOrchestrator
from tests.fakes import FakeSession, deliver

PROFILE = Profile((Weighted(LeastLoaded()),))


def view(name: str, workers: int, cores: float = 4, memory: float = 4096) -> ClusterView:
    out = ClusterView(name)
    out.set_online(True)
    out.nodes = {f"{name}-w{i}": NodeSummary(f"{name}-w{i}", True, cores, memory, cores, memory, 0.0, ["process"])
                 for i in range(workers)}
    return out


async def one_service(tmp_path: Path, replicas: int) -> tuple[Catalog, Service]:
    """A catalog holding one user's service of *replicas* instances (0.5 vcpus each), and that service."""
    catalog = Catalog(Store(tmp_path / "root.json"))
    micro = [{"microserviceID": "", "microservice_name": "s", "microservice_namespace": "t",
              "virtualization": "process", "code": "", "cmd": ["sleep", "1"], "memory": 10, "vcpus": 0.5}]
    sla = json.dumps({"sla_version": "v2.0", "customerID": "u", "applications": [{
        "applicationID": "", "application_name": "a", "application_namespace": "t",
        "application_desc": "", "microservices": micro}]})
    app = await catalog.create_app("u", parse_sla(sla)[0])
    await catalog.set_replicas(catalog.services[app.services[0]], replicas)
    return catalog, catalog.services[app.services[0]]


def test_a_pool_is_lowered_by_each_decision() -> None:
    """Decisions sharing a pool see each other: a 1-core worker takes one 1-vcpu instance, not two."""
    clusters = [view("c", 2, cores=1)]
    pools: dict[str, Pool] = {}
    taken = []
    for _ in range(3):
        decision, worker = choose(Demand(1, 10, "process"), clusters, {}, PROFILE, pools)
        if decision.choice is None:
            taken.append("")
            continue
        pools[decision.choice.id].take(worker, Demand(1, 10, "process"))
        taken.append(worker)
    assert sorted(taken[:2]) == ["c-w0", "c-w1"]
    assert taken[2] == ""


async def test_a_burst_is_placed_after_the_answer_with_reservations_built_once(tmp_path: Path) -> None:
    catalog, service = await one_service(tmp_path, 64)
    orchestrator = RootOrchestrator(catalog, PROFILE, FakeSession())  # type: ignore[arg-type]
    orchestrator.clusters = {"c1": view("c1", 4), "c2": view("c2", 4)}
    calls = 0
    build = orchestrator.placement.reservations

    def counted() -> Any:
        nonlocal calls
        calls += 1
        return build()

    orchestrator.placement.reservations = counted  # type: ignore[method-assign]
    orchestrator.kick()
    orchestrator.kick()
    assert all(not i.cluster for i in catalog.instances.values())  # nothing placed inside the request
    await orchestrator.settled()
    assert calls == 1
    assert all(i.cluster for i in catalog.instances.values())
    per_worker: dict[str, int] = {}
    for _, worker, _ in orchestrator.placement.reserved.values():
        per_worker[worker] = per_worker.get(worker, 0) + 1
    assert sorted(per_worker.values()) == [8] * 8  # 4 cores / 0.5 vcpus each: every worker full, none over
    await asyncio.sleep(0)


async def test_the_root_folds_state_deltas_into_its_view_of_the_cluster(tmp_path: Path) -> None:
    """Whole state, then a delta: only the changed status is read; its service is marked for republishing."""

    catalog = Catalog(Store(tmp_path / "root.json"))
    orchestrator = RootOrchestrator(catalog, PROFILE, FakeSession())  # type: ignore[arg-type]
    cluster = DeltaSender(("nodes", "instances", "overlay"), epoch="c1")
    state = {"nodes": {}, "instances": {"i1": {"status": "CREATING"}, "i2": {"status": "CREATING"}}, "overlay": {}}
    cluster.diff(state)
    session = FakeSession()
    orchestrator.session = session  # type: ignore[assignment]
    topic = channels.CLUSTER_STATE.topic(cluster="c1")
    await deliver(orchestrator, session, topic, envelope.encode("cluster.state", cluster.whole(), "c"), True)
    statuses = orchestrator.clusters["c1"].statuses
    assert {i: s.status for i, s in statuses.items()} == {"i1": "CREATING", "i2": "CREATING"}
    delta = cluster.diff({**state, "instances": {"i1": {"status": "RUNNING"}}})
    assert delta is not None
    await deliver(orchestrator, session, channels.CLUSTER_STATE_DELTA.topic(cluster="c1"),
                  envelope.encode("cluster.state.delta", delta.data(), "c"))
    assert {i: s.status for i, s in orchestrator.clusters["c1"].statuses.items()} == {"i1": "RUNNING"}
    await orchestrator.settled()


def test_dump_reads_flat_dataclasses_field_by_field_and_the_rest_as_asdict_does() -> None:
    """models.dump's fast path gives what dataclasses.asdict gives, and copies what asdict copies."""
    status = InstanceStatus("RUNNING", node="w1", cluster="c1", cpu_percent=1.5, exit_code=None)
    assert models.dump(status) == dataclasses.asdict(status)
    node = NodeSummary("w1", True, 4, 4096, 3, 4000, 1.0, ["process"], labels=["a"], services={"s": 1})
    dumped = models.dump(node)
    assert dumped == dataclasses.asdict(node)
    assert dumped["runtimes"] is not node.runtimes  # a copy, as asdict makes
    spec = InstanceSpec("i1", "u", "a.t.s.t", 1, ServiceSpec("a", "t", "s", "t", "process", "", cmd=("x",)))
    assert json.loads(json.dumps(spec.doc)) == json.loads(json.dumps(dataclasses.asdict(spec)))
    assert models.load(InstanceSpec, json.loads(json.dumps(spec.doc))) == spec, "read back, typed as it was"
    assert models.load(InstanceStatus, {**models.dump(status), "unknown": 1}) == status


async def test_a_service_state_is_published_with_its_rows_json_reused(tmp_path: Path) -> None:
    """The published state is what encoding it whole gives; a row is encoded again only when it changed."""
    catalog, service = await one_service(tmp_path, 3)
    session = FakeSession()
    orchestrator = RootOrchestrator(catalog, PROFILE, session)  # type: ignore[arg-type]
    orchestrator.clusters = {"c1": view("c1", 2)}
    orchestrator.kick()
    await orchestrator.settled()
    topic = channels.API_SERVICE_STATE.topic(user="u", job=service.job_name)
    first = [p for t, p in session.published if t == topic][-1]
    assert json.loads(first)["data"] == orchestrator.service_state(service)
    assert envelope.decode(first, "service.state").data == envelope.decode(
        envelope.encode("service.state", orchestrator.service_state(service), "root")).data
    texts = {iid: orchestrator.views.text(iid) for iid in catalog.instances}
    changed = next(iter(catalog.instances))
    orchestrator.clusters["c1"].statuses[changed] = InstanceStatus("RUNNING", node="c1-w0", cluster="c1")
    orchestrator.mark(service)
    await orchestrator.flush_states()
    second = json.loads([p for t, p in session.published if t == topic][-1])["data"]
    assert second == orchestrator.service_state(service)
    assert [r["status"] for r in second["instances"] if r["iid"] == changed] == ["RUNNING"]
    assert [iid for iid in catalog.instances if orchestrator.views.text(iid) is not texts[iid]] == [changed]


def _desired_maps(session: FakeSession) -> dict[str, dict[str, Any]]:
    """Each cluster's desired map as a cluster folds what the root published (wholes and deltas)."""
    receivers: dict[str, DeltaReceiver] = {}
    for topic, payload in session.published:
        found = channels.find(topic, (channels.CLUSTER_DESIRED, channels.CLUSTER_DESIRED_DELTA))
        if found is None:
            continue
        channel, names = found
        receiver = receivers.setdefault(names["cluster"], DeltaReceiver(channels.CLUSTER_DESIRED.sections))
        data = envelope.decode(payload).data
        receiver.whole(data) if channel is channels.CLUSTER_DESIRED else receiver.delta(data)
    return {cluster: receiver.docs["instances"] for cluster, receiver in receivers.items()}


async def test_desired_maps_follow_placements_moves_and_removals(tmp_path: Path) -> None:
    """The root sends each cluster only what changed in its map (no whole-map rebuild per pass), and what
    a cluster folds from it is always the catalog's placement: after a burst, after a cluster fails and
    its instances move, and after instances are removed."""
    catalog, service = await one_service(tmp_path, 16)
    session = FakeSession()
    orchestrator = RootOrchestrator(catalog, PROFILE, session)  # type: ignore[arg-type]
    orchestrator.clusters = {"c1": view("c1", 2), "c2": view("c2", 2)}

    def expected() -> dict[str, set[str]]:
        out: dict[str, set[str]] = {"c1": set(), "c2": set()}
        for instance in catalog.instances.values():
            if instance.cluster:
                out[instance.cluster].add(instance.iid)
        return out

    orchestrator.kick()
    await orchestrator.settled()
    assert {c: set(m) for c, m in _desired_maps(session).items()} == expected()
    assert all(set(m) for m in expected().values()), "both clusters got instances"
    sample = next(iter(_desired_maps(session)["c1"].values()))
    assert models.load(InstanceSpec, sample).service == service.spec, "the spec travels typed and whole"

    orchestrator.clusters["c1"].set_online(False)
    orchestrator.liveness.closed("c1", time.monotonic())  # gone now
    orchestrator.clusters["c2"].nodes.update(view("c2x", 2).nodes)  # room for what moves
    await orchestrator.reconcile()
    assert {c: set(m) for c, m in _desired_maps(session).items()} == expected()
    assert not expected()["c1"], "everything moved off the failed cluster"

    _, removed = await catalog.set_replicas(catalog.services[service.sid], 4)
    await orchestrator.forget(removed)
    assert {c: set(m) for c, m in _desired_maps(session).items()} == expected()
    assert sum(len(m) for m in expected().values()) == 4


async def test_two_users_creating_apps_at_once_get_different_service_ips(tmp_path: Path) -> None:
    """Users' requests run side by side, and creating an app waits for its write: the catalog makes one
    change at a time, so two apps created together never share a round-robin or closest IP."""
    catalog = Catalog(Store(tmp_path / "root.json"))

    def sla(name: str) -> str:
        micro = [{"microserviceID": "", "microservice_name": f"s{i}", "microservice_namespace": "t",
                  "virtualization": "process", "code": "", "cmd": ["true"], "memory": 1, "vcpus": 0.1}
                 for i in range(3)]
        return json.dumps({"sla_version": "v2.0", "customerID": name, "applications": [{
            "applicationID": "", "application_name": name, "application_namespace": "t",
            "application_desc": "", "microservices": micro}]})

    await asyncio.gather(*(catalog.create_app(user, parse_sla(sla(user))[0]) for user in ("ann", "bob", "cy")))
    ips = [ip for s in catalog.services.values() for ip in (s.rr_ip, s.closest_ip)]
    assert len(catalog.services) == 9
    assert len(set(ips)) == len(ips) == 18
