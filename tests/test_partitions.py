"""Partitions without double-running, with real processes: a worker or a cluster that goes silent
without closing its connection (SIGSTOP: a hung device, or a link that drops without a reset).

* A frozen worker is found gone by its missing reports, long before MQTT's keepalive (15-20 s) would
  say so: an instance of a default service runs elsewhere, one whose service says ``replace: false``
  shows LOST and waits; when the worker thaws, its stale copy stops and the waiting one is RUNNING again.
* ``reconcile: keep_original``: the original is kept when its worker comes back, the replacement stops.
* ``stop_after``: a worker cut off from its frozen cluster stops that service's instance by itself, and
  starts it again once the link is back.

Every count of copies is taken from the process table, not only from the state.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from broker.join import obtain_login
from services.common import channels, models
from services.common.models import NodeInfo
from services.common.mqtt import BrokerUrl, MqttSession
from tests.conftest import Stack, dumps, eventually, online_nodes, sla, sleeper
from tests.test_cli_and_scripts import run_oak
from tests.test_three_tiers import running, sleeps, state

WEB, DB, PG, EDGE = (f"part.test.{name}.test" for name in ("web", "db", "pg", "edge"))
SILENCE_BOUND = 12.0  # found gone and replaced well before the keepalive's 15 s (the bench measures the real time)


async def _instance(client: Any, service: str) -> dict[str, Any]:
    return (await state(client, service))["instances"][0]


async def _deployed(stack: Stack, api: Any, services: dict[str, Any], first: int = 7001) -> tuple[Any, dict[str, str]]:
    """Root, cluster c1 and worker w1 running one instance of each of *services* (job name -> extra SLA
    fields), each a ``sleep`` of its own token (from *first* on); the admin's client and the tokens."""
    stack.root()
    stack.cluster("c1")
    stack.worker("w1", "c1")
    client = await api()
    await eventually(lambda: online_nodes(client, 1), timeout=30, what="w1 online")
    tokens = {job: str(first + k) for k, job in enumerate(services)}
    micro = [sleeper(job.split(".")[2], int(tokens[job]), **extra) for job, extra in services.items()]
    await client.request("apps", "create", raw=dumps(sla(*micro, app="part")))
    for job in services:
        await client.request("services", "deploy", {"service": job})
    for job in services:
        await running(client, job, 1)
    return client, tokens


async def _two_workers_after_deploy(stack: Stack, api: Any, services: dict[str, Any]) -> tuple[Any, dict[str, str]]:
    """:func:`_deployed`, then w2 joins c1."""
    client, tokens = await _deployed(stack, api, services)
    stack.worker("w2", "c1")
    await eventually(lambda: online_nodes(client, 2), timeout=30, what="w2 online")
    return client, tokens


@pytest.mark.timeout(150)
async def test_a_frozen_worker_is_found_gone_by_its_silence(stack: Stack, api: Any) -> None:
    """Freeze w1 holding a default service and a ``replace: false`` one: the first runs on w2 within
    seconds while the second is LOST; thawed, w1's stale copy stops and the second runs again on w1."""
    client, tokens = await _two_workers_after_deploy(
        stack, api, {WEB: {}, DB: {"disconnect": {"replace": False}}})
    stack.procs["w1"].freeze()
    try:
        moved = await eventually(lambda: _on(client, WEB, "w2", "RUNNING"), SILENCE_BOUND,
                                 what="web RUNNING on w2 before the keepalive could tell")
        assert moved
        db = await eventually(lambda: _on(client, DB, "w1", "LOST"), 5, what="db LOST on w1")
        assert "worker w1 silent since" in db["reason"], db
        assert "last seen RUNNING" in db["reason"], db
        assert len(sleeps(tokens[WEB], stack.base)) == 2, "the frozen worker's copy still runs: nobody can stop it"
        nodes = {n["name"]: n for n in await client.request("nodes", "list")}
        assert nodes["w1"]["state"] == "LOST", nodes["w1"]
        assert nodes["w1"]["silent_since"] > 0, nodes["w1"]
        listed = run_oak(stack.base / "root", "node", "list").stdout
        assert "LOST since" in listed, listed
    finally:
        stack.procs["w1"].thaw()
    await eventually(lambda: len(sleeps(tokens[WEB], stack.base)) == 1, 15, what="the stale copy of web stopped")
    await eventually(lambda: f"removed {moved['iid']}" in stack.procs["w1"].log.read_text(), 15, what="w1 done")
    survivors = sleeps(tokens[WEB], stack.base)
    assert [p.cwd().split("/")[-3] for p in survivors] == ["w2"], "the replacement survives the original's stop"
    await eventually(lambda: _on(client, DB, "w1", "RUNNING"), 15, what="db RUNNING on w1 again")
    assert len(sleeps(tokens[DB], stack.base)) == 1, "db never ran twice"
    assert (await _instance(client, WEB))["node"] == "w2", "the replacement stays (keep_replacement)"


@pytest.mark.timeout(150)
async def test_keep_original_stops_the_replacement_when_the_original_returns(stack: Stack, api: Any) -> None:
    """``reconcile: keep_original``: while w1 is frozen its instance runs on w2 too; thawed, w1's copy is
    the one kept and w2's stops."""
    client, tokens = await _two_workers_after_deploy(stack, api, {PG: {"disconnect": {"reconcile": "keep_original"}}})
    stack.procs["w1"].freeze()
    try:
        await eventually(lambda: _on(client, PG, "w2", "RUNNING"), SILENCE_BOUND, what="pg replaced on w2")
        assert len(sleeps(tokens[PG], stack.base)) == 2
    finally:
        stack.procs["w1"].thaw()
    await eventually(lambda: _on(client, PG, "w1", "RUNNING"), 15, what="pg kept on w1")
    await eventually(lambda: len(sleeps(tokens[PG], stack.base)) == 1, 15, what="the replacement on w2 stopped")
    survivor = sleeps(tokens[PG], stack.base)[0]
    assert "/w1/" in survivor.cwd(), f"the original (w1's) is the one running: {survivor.cwd()}"


@pytest.mark.timeout(150)
@pytest.mark.parametrize(("frozen", "fencer", "said"), [("c1", "w1", "cut off from the cluster"),
                                                         ("root", "c1", "cut off from the root")])
async def test_stop_after_fences_what_is_cut_off(stack: Stack, api: Any, frozen: str, fencer: str, said: str) -> None:
    """Freeze the cluster (its broker with it: w1's link goes silent) or the root (c1 stops hearing its
    heartbeat): the ``stop_after: 2`` service's instance is stopped there without anyone's word, while the
    other keeps running; once the frozen one thaws, it starts again."""
    client, tokens = await _deployed(stack, api, {EDGE: {"disconnect": {"stop_after": 2}}, WEB: {}}, 7101)
    stack.procs[frozen].freeze()
    try:
        await eventually(lambda: not sleeps(tokens[EDGE], stack.base), 15, what=f"{fencer} fenced edge by itself")
        assert len(sleeps(tokens[WEB], stack.base)) == 1, "a service without stop_after keeps running, cut off or not"
    finally:
        stack.procs[frozen].thaw()
    await eventually(lambda: len(sleeps(tokens[EDGE], stack.base)) == 1, 20, what="edge started again")
    await running(client, EDGE, 1, timeout=20)
    assert len(sleeps(tokens[WEB], stack.base)) == 1
    assert said in stack.procs[fencer].log.read_text()


async def _on(client: Any, service: str, node: str, status: str) -> dict[str, Any] | None:
    """The service's one instance when it is on *node* with *status*."""
    instance = await _instance(client, service)
    return instance if instance["node"] == node and instance["status"] == status else None


@pytest.mark.timeout(150)
async def test_a_frozen_cluster_is_found_gone_by_its_missing_heartbeats(stack: Stack, api: Any) -> None:
    """Freeze cluster c1 (its bridge falls silent, nothing closes): the root replaces its default
    service's instance on c2 within seconds and shows the ``replace: false`` one LOST; thawed, c1 stops
    its stale copy and the waiting one is RUNNING there again."""
    client, tokens = await _deployed(stack, api, {WEB: {}, DB: {"disconnect": {"replace": False}}}, 7201)
    stack.cluster("c2")
    stack.worker("w2", "c2")
    await eventually(lambda: online_nodes(client, 2), timeout=30, what="w2 online")
    stack.procs["c1"].freeze()
    try:
        await eventually(lambda: _on(client, WEB, "w2", "RUNNING"), SILENCE_BOUND, what="web RUNNING on c2")
        db = await eventually(lambda: _lost_on_cluster(client, DB, "c1"), 5, what="db LOST with c1")
        assert "cluster c1 silent since" in db["reason"], db
        clusters = {c["name"]: c for c in await client.request("clusters", "list")}
        assert clusters["c1"]["state"] == "LOST", clusters
        assert len(sleeps(tokens[WEB], stack.base)) == 2, "c1's worker still runs its copy: nobody there can stop it"
    finally:
        stack.procs["c1"].thaw()
    await eventually(lambda: len(sleeps(tokens[WEB], stack.base)) == 1, 20, what="c1's stale copy of web stopped")
    await eventually(lambda: _on(client, DB, "w1", "RUNNING"), 20, what="db RUNNING on c1 again")
    assert len(sleeps(tokens[DB], stack.base)) == 1, "db never ran twice"


async def _lost_on_cluster(client: Any, service: str, cluster: str) -> dict[str, Any] | None:
    instance = await _instance(client, service)
    return instance if instance["cluster"] == cluster and instance["status"] == "LOST" else None


async def _liar(stack: Stack, name: str, cluster: str) -> None:
    """A worker that joins like any other, claims 10,000 free CPUs, reports every 2 s and never runs what it
    is given (Oakestra's oakestra#419 class of bug): run as a task, until cancelled."""
    url = BrokerUrl("127.0.0.1", stack.cluster_ports[cluster], tls=True)
    login = await obtain_login(stack.base / name, url, "node", name, stack.token, fingerprint=stack.pin()[1])
    session = MqttSession(login.at(url), login.username, login.username, login.password, clean_session=False,
                          avail_topic=channels.NODE_AVAIL.topic(node=name), tls=login.tls())
    async with session:
        info = NodeInfo(name, cpu_cores=10_000, memory_mb=10_000_000, runtimes=["process"])
        session.send(channels.NODE_INFO, models.dump(info), f"node/{name}", node=name)
        while True:
            session.send(channels.NODE_STATE, {"instances": {}, "cpu_percent": 0.0}, f"node/{name}", node=name)
            await asyncio.sleep(2)


@pytest.mark.timeout(150)
async def test_a_worker_that_accepts_and_runs_nothing_is_found_out(stack: Stack, api: Any) -> None:
    """A lying worker attracts both replicas of a new deployment (it has the most room); after the
    cluster's --stuck-after (4 s here) they run on the honest worker, and the liar is SUSPECT."""
    stack.root()
    stack.cluster("c1", "--stuck-after", "4")
    stack.worker("w1", "c1")
    client = await api()
    liar = asyncio.create_task(_liar(stack, "liar", "c1"))
    try:
        await eventually(lambda: online_nodes(client, 2), timeout=30, what="w1 and the liar online")
        await client.request("apps", "create", raw=dumps(sla(sleeper("web", 7401), app="part")))
        await client.request("services", "deploy", {"service": WEB, "replicas": 2})
        placed = await eventually(lambda: _all_on(client, WEB, "liar"), 15, what="both replicas sent to the liar")
        assert all(i["status"] == "NODE_SCHEDULED" for i in placed), placed
        served = await running(client, WEB, 2, timeout=30)
        assert {i["node"] for i in served["instances"]} == {"w1"}
        # RUNNING is reported once the process is spawned; its exec into `sleep` may come a moment later
        await eventually(lambda: len(sleeps("7401", stack.base)) == 2, 10, what="two `sleep 7401` on w1")
        nodes = {n["name"]: n for n in await client.request("nodes", "list")}
        assert nodes["liar"]["state"] == "SUSPECT", nodes["liar"]
        assert "no progress" in nodes["liar"]["suspect"]
        await client.request("services", "scale", {"service": WEB, "replicas": 3})
        served = await running(client, WEB, 3, timeout=30)
        assert {i["node"] for i in served["instances"]} == {"w1"}, "a suspect worker gets no new instance"
    finally:
        liar.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await liar


async def _all_on(client: Any, service: str, node: str) -> list[dict[str, Any]] | None:
    instances = (await state(client, service))["instances"]
    return instances if instances and all(i["node"] == node for i in instances) else None
