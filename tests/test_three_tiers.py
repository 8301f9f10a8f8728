"""The seed guide's set-ups end to end: real processes, real brokers on loopback, real OS processes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import psutil
import pytest

from plugins.runtimes import cgroups
from plugins.runtimes.cgroups import PARENT, Cgroup
from services.cli.client import ApiFailure, OakClient, Profile
from services.common import channels
from tests.conftest import Stack, dumps, eventually, sla, sleeper
from tests.conftest import online_nodes as _online_nodes


async def state(client: OakClient, service: str) -> dict[str, Any]:
    """The service as the root reports it."""
    return await client.request("services", "inspect", {"service": service})


async def running(client: OakClient, service: str, replicas: int, what: str = "", timeout: float = 30.0) -> dict:
    """Wait until *service* has exactly *replicas* instances, all RUNNING; return its state."""

    async def check() -> dict | None:
        s = await state(client, service)
        ok = len(s["instances"]) == replicas and all(i["status"] == "RUNNING" for i in s["instances"])
        return s if ok else None

    return await eventually(check, timeout, what=what or f"{service} x{replicas} RUNNING")


def sleeps(token: str, under: Path) -> list[psutil.Process]:
    """Live ``sleep <token>`` processes of the stack in *under* (their working directories are in it), so
    tests running side by side with the same tokens do not count each other's."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status", "cwd"]):
        if (proc.info["cmdline"] == ["sleep", token] and proc.info["status"] != psutil.STATUS_ZOMBIE
                and str(proc.info["cwd"] or "").startswith(str(under))):
            found.append(proc)
    return found


def instance_group(pid: int) -> str | None:
    """The name of the instance cgroup process *pid* is in (None without one)."""
    *parents, name = cgroups.process_path("" if cgroups.version() == 2 else "memory", pid).split("/")
    return name if PARENT in parents else None


async def two_on_one_worker(stack: Stack, api: Any, app: str, port: int) -> tuple[OakClient, dict[str, Any]]:
    """A root, cluster c1 and worker w1 running two instances of ``<app>.test.job.test`` (``sleep <port>``)."""
    stack.root()
    stack.cluster("c1")
    stack.worker("w1", "c1")
    client = await api()
    await eventually(lambda: _online_nodes(client, 1), what="w1 online")
    await client.request("apps", "create", raw=dumps(sla(sleeper("job", port), app=app)))
    await client.request("services", "deploy", {"service": f"{app}.test.job.test", "replicas": 2})
    return client, await running(client, f"{app}.test.job.test", 2)


TWO_SERVICES = sla(sleeper("web", 6001), sleeper("cache", 6002), app="shop")
WEB, CACHE = "shop.test.web.test", "shop.test.cache.test"


@pytest.mark.timeout(120)
async def test_mdoc_deploy_scale_undeploy(stack: Stack, api: Any) -> None:
    """One cluster, two workers: a two-service SLA runs, scales up and down, and undeploys cleanly."""
    stack.root()
    stack.cluster("c1")
    stack.worker("w1", "c1")
    stack.worker("w2", "c1")
    client = await api()
    await eventually(lambda: client.request("nodes", "list"), what="workers")
    await eventually(lambda: _online_nodes(client, 2), what="two workers online")
    beside = stack.worker("w3", "c1", home="c1")  # in the cluster's home: it would log in as the cluster
    assert beside.popen is not None
    assert await asyncio.to_thread(beside.popen.wait, 30) == 1
    assert f"oak: {stack.base / 'c1' / 'identity.json'} is cluster.c1's, not node.w3's" in beside.tail()

    apps = await client.request("apps", "create", raw=dumps(TWO_SERVICES))
    assert [s["job_name"] for s in apps[0]["services"]] == [WEB, CACHE]
    assert (await state(client, WEB))["status"] == "UNDEPLOYED"

    await client.request("services", "deploy", {"service": WEB, "replicas": 2})
    await client.request("services", "deploy", {"service": CACHE})
    web = await running(client, WEB, 2)
    await running(client, CACHE, 1)
    assert {i["node"] for i in web["instances"]} == {"w1", "w2"}, "least-loaded spreads replicas"
    assert {i["cluster"] for i in web["instances"]} == {"c1"}
    assert len(sleeps("6001", stack.base)) == 2
    assert len(sleeps("6002", stack.base)) == 1

    await client.request("services", "scale", {"service": WEB, "replicas": 3})
    web = await running(client, WEB, 3)
    assert [i["number"] for i in web["instances"]] == [0, 1, 2]
    await client.request("services", "scale", {"service": WEB, "replicas": 1})
    web = await running(client, WEB, 1)
    assert [i["number"] for i in web["instances"]] == [0]
    await eventually(lambda: len(sleeps("6001", stack.base)) == 1, what="scaled-down processes gone")

    await client.request("services", "undeploy", {"service": WEB})
    await eventually(lambda: not sleeps("6001", stack.base), what="undeployed processes gone")
    assert (await state(client, WEB))["status"] == "UNDEPLOYED"
    await client.request("apps", "delete", {"app": "shop"})
    await eventually(lambda: not sleeps("6002", stack.base), what="deleted app's processes gone")
    assert await client.request("apps", "list") == []



@pytest.mark.timeout(120)
async def test_worker_killed_moves_its_instances(stack: Stack, api: Any) -> None:
    """kill -9 of a worker: its instances run on the other worker within seconds (last will, no poll)."""
    client, first = await two_on_one_worker(stack, api, "move", 6011)
    assert {i["node"] for i in first["instances"]} == {"w1"}
    stack.worker("w2", "c1")
    await eventually(lambda: _online_nodes(client, 2), what="w2 online")

    stack.procs["w1"].kill9()
    groups = []
    for orphan in sleeps("6011", stack.base):  # the dead worker's children; a real machine would have died with them
        groups.append(instance_group(orphan.pid))
        orphan.kill()

    async def moved() -> bool:
        s = await state(client, "move.test.job.test")
        return all(i["node"] == "w2" and i["status"] == "RUNNING" for i in s["instances"])

    await eventually(moved, timeout=20, what="instances RUNNING on w2")
    after = await state(client, "move.test.job.test")
    assert [i["iid"] for i in after["instances"]] == [i["iid"] for i in first["instances"]]
    for group in filter(None, groups):  # what the dead worker would have removed
        Cgroup(group).remove()


@pytest.mark.timeout(150)
async def test_mdnc_cluster_killed_moves_instances_to_other_cluster(stack: Stack, api: Any) -> None:
    """One root, two clusters of two workers: kill -9 a cluster and its instances run in the other."""
    stack.root()
    for cluster in ("c1", "c2"):
        stack.cluster(cluster)
        stack.worker(f"{cluster}w1", cluster)
        stack.worker(f"{cluster}w2", cluster)
    client = await api()
    await eventually(lambda: _online_nodes(client, 4), what="four workers online")
    clusters = await client.request("clusters", "list")
    assert [(c["name"], c["online"], c["nodes"]) for c in clusters] == [("c1", True, 2), ("c2", True, 2)]

    await client.request("apps", "create", raw=dumps(TWO_SERVICES))
    await client.request("services", "deploy", {"service": WEB, "replicas": 4})
    await client.request("services", "deploy", {"service": CACHE, "replicas": 1})
    web = await running(client, WEB, 4)
    await running(client, CACHE, 1)
    assert {i["cluster"] for i in web["instances"]} == {"c1", "c2"}, "spread over both clusters"

    stack.procs["c1"].kill9()

    async def all_in_c2() -> bool:
        s = await state(client, WEB)
        return all(i["cluster"] == "c2" and i["status"] == "RUNNING" for i in s["instances"])

    await eventually(all_in_c2, timeout=30, what="every web instance RUNNING in c2")
    clusters = {c["name"]: c for c in await client.request("clusters", "list")}
    assert clusters["c1"]["online"] is False


@pytest.mark.timeout(120)
async def test_root_killed_and_restarted_loses_nothing(stack: Stack, api: Any) -> None:
    """kill -9 of the root: after a restart it has every app, service and instance, still RUNNING."""
    stack.root()
    stack.cluster("c1")
    stack.worker("w1", "c1")
    client = await api()
    await eventually(lambda: _online_nodes(client, 1), what="w1 online")
    await client.request("apps", "create", raw=dumps(TWO_SERVICES))
    await client.request("services", "deploy", {"service": WEB, "replicas": 2})
    before = await running(client, WEB, 2)
    pids = {p.pid for p in sleeps("6001", stack.base)}
    await client.__aexit__(None, None, None)

    stack.procs["root"].kill9()
    stack.procs["root"].start()
    client = await api()
    after = await running(client, WEB, 2, what="web RUNNING after the root restarted")
    assert [i["iid"] for i in after["instances"]] == [i["iid"] for i in before["instances"]]
    assert {p.pid for p in sleeps("6001", stack.base)} == pids, "the instances were not restarted"
    assert [a["name"] for a in await client.request("apps", "list")] == ["shop"]
    await client.request("services", "deploy", {"service": CACHE})
    await running(client, CACHE, 1, what="a new deployment after the restart")


@pytest.mark.timeout(120)
async def test_cluster_and_worker_restart_resume(stack: Stack, api: Any) -> None:
    """kill -9 of a cluster and of a worker, then restart: same instances, adopted, not duplicated."""
    client, before = await two_on_one_worker(stack, api, "resume", 6021)
    pids = {p.pid for p in sleeps("6021", stack.base)}

    stack.procs["c1"].kill9()  # the cluster first: else it may see the worker die and rightly move its instances
    stack.procs["w1"].kill9()
    stack.procs["c1"].start()
    stack.procs["w1"].start()
    await eventually(lambda: stack.procs["w1"].log.read_text().count("adopted") == 2, what="w1 adopted both")
    await eventually(lambda: stack.procs["w1"].log.read_text().count("connected to its cluster") == 2,
                     what="w1 back with its cluster")
    after = await running(client, "resume.test.job.test", 2, what="RUNNING after restarts")
    assert [i["iid"] for i in after["instances"]] == [i["iid"] for i in before["instances"]]
    await eventually(lambda: {p.pid for p in sleeps("6021", stack.base)} == pids, what="the same processes, adopted")


async def test_a_cluster_restarted_after_a_delete_does_not_bring_it_back(stack: Stack, api: Any) -> None:
    """An application deleted just before its cluster restarts stays deleted: the retained desired map the
    restarted cluster reads is older than its own copy (the root sends the whole map once changes settle),
    and it must not place the deleted instances again."""
    client, _ = await two_on_one_worker(stack, api, "gone", 6031)
    await client.request("apps", "delete", {"app": "gone"})
    await eventually(lambda: not sleeps("6031", stack.base), what="the instances stopped")
    stack.procs["c1"].stop()  # before the root's whole map, without them, replaced the retained one
    stack.procs["c1"].start()
    await eventually(lambda: "worker w1 is online" in stack.procs["c1"].log.read_text().split("serving workers")[-1],
                     what="w1 back with its restarted cluster")
    for _ in range(40):  # past the moment the root's whole map, without them, settles
        assert not sleeps("6031", stack.base), "a deleted instance was started again"
        await asyncio.sleep(0.1)
    assert "placed" not in stack.procs["c1"].log.read_text().split("serving workers")[-1]


@pytest.mark.timeout(90)
async def test_bad_requests_get_errors_and_change_nothing(stack: Stack, api: Any) -> None:
    """Invalid SLAs and garbage get an error naming the problem; nothing is created."""
    stack.root()
    client = await api()
    bad = sla(sleeper("web"))
    bad["applications"][0]["microservices"][0]["memory"] = "lots"
    with pytest.raises(ApiFailure) as err:
        await client.request("apps", "create", raw=dumps(bad))
    assert err.value.code == "invalid_sla"
    assert "applications[0].microservices[0].memory" in str(err.value)
    for garbage in (b'{"sla_version": "v2.0"', b"\xff\xfe", b"[1, 2]"):
        create = channels.API_REQUEST.topic(user=client.profile.username, resource="apps", action="create")
        client.session.publish(create, garbage)
        answer = json.loads((await asyncio.wait_for(client.updates.get(), 10)).payload)
        assert answer["ok"] is False
        assert answer["error"]["code"] in ("bad_request", "invalid_sla")
    with pytest.raises(ApiFailure) as err:
        await client.request("services", "deploy", {"service": "nope.test.x.test"})
    assert err.value.code == "not_found"
    with pytest.raises(ApiFailure) as err:
        await client.request("services", "frobnicate", {})
    assert err.value.code == "unknown_action"
    with pytest.raises(ApiFailure):
        await client.request("services", "scale", {"service": 3, "replicas": "two"})
    assert await client.request("apps", "list") == []
    await client.request("apps", "create", raw=dumps(TWO_SERVICES))
    with pytest.raises(ApiFailure) as err:
        await client.request("apps", "create", raw=dumps(TWO_SERVICES))
    assert err.value.code == "conflict"
    assert len(await client.request("apps", "list")) == 1


@pytest.mark.timeout(120)
async def test_statuses_reach_the_user(stack: Stack, api: Any) -> None:
    """COMPLETED for a one_shot exit 0, DEAD then restarted for a crash, FAILED with the reason, and a
    placement no worker can hold says why per cluster and is retried."""
    stack.root()
    stack.cluster("c1")
    stack.worker("w1", "c1")
    client = await api()
    await eventually(lambda: _online_nodes(client, 1), what="w1 online")
    doc = sla(
        {"microservice_name": "once", "cmd": ["true"], "one_shot": True},
        {"microservice_name": "crash", "cmd": ["sh", "-c", "sleep 0.2; exit 7"]},
        {"microservice_name": "missing", "cmd": ["/no/such/program"]},
        sleeper("huge", 6031, memory=10_000_000),
        app="status",
    )
    await client.request("apps", "create", raw=dumps(doc))
    for name in ("once", "crash", "missing", "huge"):
        await client.request("services", "deploy", {"service": f"status.test.{name}.test"})

    async def instance(name: str) -> dict[str, Any]:
        return (await state(client, f"status.test.{name}.test"))["instances"][0]

    async def completed() -> bool:
        return (await state(client, "status.test.once.test"))["status"] == "COMPLETED"

    await eventually(completed, what="once COMPLETED")

    async def restarted() -> dict[str, Any] | None:
        i = await instance("crash")
        return i if i["restarts"] >= 2 else None

    crash = await eventually(restarted, what="crash restarted twice")
    assert crash["status"] in ("DEAD", "RUNNING")

    async def failed() -> dict[str, Any] | None:
        i = await instance("missing")
        return i if i["status"] == "FAILED" else None

    assert "no such file" in (await eventually(failed, what="missing FAILED"))["reason"].lower()
    huge = await instance("huge")
    assert huge["status"] == "NoActiveClusterWithCapacity"
    assert huge["reason"].startswith("c1: no worker fits (w1: memory ")
    assert huge["reason"].endswith("< 10000000)")


@pytest.mark.timeout(90)
async def test_users_cannot_see_or_touch_each_others_services(stack: Stack, api: Any) -> None:
    """bob, created by the admin, sees none of the admin's services and cannot change them."""
    stack.root()
    admin = await api()
    await admin.request("apps", "create", raw=dumps(TWO_SERVICES))
    created = await admin.request("users", "create", {"username": "bob", "password": "bob-password-1"})
    assert created == {"username": "bob", "admin": False}
    with pytest.raises(ApiFailure) as err:
        await admin.request("users", "create", {"username": "bob", "password": "another-password"})
    assert err.value.code == "conflict"
    bob = await OakClient(Profile("bob", "bob-password-1", admin.profile.root, admin.profile.ca)).__aenter__()
    try:
        assert await bob.request("services", "list") == []
        assert await bob.request("apps", "list") == []
        for resource, action, body in [("services", "inspect", {"service": WEB}),
                                       ("services", "deploy", {"service": WEB}),
                                       ("apps", "delete", {"app": "shop"})]:
            with pytest.raises(ApiFailure) as err:
                await bob.request(resource, action, body)
            assert err.value.code == "not_found"
        with pytest.raises(ApiFailure) as err:
            await bob.request("users", "create", {"username": "eve", "password": "eve-password"})
        assert err.value.code == "forbidden"
        bob.session.subscribe("oak/api/admin/state/#")
        bob.session.publish(channels.API_REQUEST.topic(user="admin", resource="apps", action="delete"),
                            dumps({"app": "shop"}))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(bob.updates.get(), 1.0)
        # bob may use the same names as the admin: job names are unique per user only
        await bob.request("apps", "create", raw=dumps(TWO_SERVICES))
        assert [s["job_name"] for s in await bob.request("services", "list")] == [CACHE, WEB]
    finally:
        await bob.__aexit__(None, None, None)
    assert [a["name"] for a in await admin.request("apps", "list")] == ["shop"]
    assert (await state(admin, WEB))["status"] == "UNDEPLOYED"
