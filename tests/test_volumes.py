"""Volumes: a service's named directory on its worker, kept across restarts, updates and worker restarts,
the instance placed back where its data is, listed, and removed on request or with the application."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.cli.client import ApiFailure, OakClient
from tests.conftest import Stack, dumps, eventually, online_nodes, sla

pytestmark = pytest.mark.timeout(240)
JOB = "vol.test.keeper.test"


def runs(stack: Stack, node: str) -> int:
    """How many times an instance of the keeper started on *node*, by the lines in its volume."""
    path = stack.base / node / "volumes" / "admin" / JOB / "store" / "runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


async def running(client: OakClient) -> dict[str, Any] | None:
    (row,) = (await client.request("services", "inspect", {"service": JOB}))["instances"] or [None]
    return row if row and row["status"] == "RUNNING" else None


async def test_data_survives_updates_and_worker_restarts(stack: Stack, api: Any, tmp_path: Path) -> None:
    """The keeper appends a line to its volume at each start: the count grows across an update (the new
    instance placed on the same worker) and a restart of its worker; `volumes/list` shows it; deleting is
    refused while it runs; redeployed beside a second, emptier worker it goes back to its data; with that
    worker gone it starts elsewhere with an empty volume and says so; deleting the application removes
    the volumes from both."""
    stack.root()
    stack.cluster("c1")
    stack.worker("w2", "c1", "--stop-grace", "1")  # the holder: last by name, so only its volume draws the keeper
    client = await api()
    await eventually(lambda: online_nodes(client, 1), 30, what="w2 online")
    mount = tmp_path / "mnt"  # the mount point the process sees (made, empty, on the worker)
    keeper = {"microservice_name": "keeper", "cmd": ["sh", "-c", f"echo run >> {mount}/runs; sleep 600"],
              "environment": ["V=1"], "volumes": [{"name": "store", "path": str(mount)}],
              "update": {"min_healthy_time": 0.5, "healthy_deadline": 30}}
    await client.request("apps", "create", raw=dumps(sla(keeper, app="vol")))
    await client.request("services", "deploy", {"service": JOB})
    await eventually(lambda: running(client), 30, what="the keeper RUNNING")
    await eventually(lambda: runs(stack, "w2") == 1, 10, what="its first line")
    assert not list(mount.iterdir()), "the volume is mounted in the instance's namespace only"
    listed = await eventually(lambda: client.request("volumes", "list"), 20, what="the volume listed")
    assert [(v["service"], v["volume"], v["node"], v["bytes"]) for v in listed] == [(JOB, "store", "w2", 4)]
    with pytest.raises(ApiFailure, match="undeploy it before deleting its volumes"):
        await client.request("volumes", "delete", {"service": JOB})

    await client.request("services", "update", {"service": JOB, "microservice": {"environment": ["V=2"]}})

    async def updated() -> bool:
        row = await running(client)
        return bool(row and row["revision"] == 2)

    await eventually(updated, 30, what="revision 2 running")
    await eventually(lambda: runs(stack, "w2") == 2, 10, what="the line of revision 2, beside the first")
    stack.procs["w2"].stop()
    stack.procs["w2"].start()
    await eventually(lambda: runs(stack, "w2") == 3, 30, what="a third line after the worker restart")

    stack.worker("w1", "c1", "--stop-grace", "1")
    await eventually(lambda: online_nodes(client, 2), 30, what="w1 online too")
    await client.request("services", "undeploy", {"service": JOB})
    await eventually(lambda: _no_instance(client), 20, what="undeployed")
    await client.request("services", "deploy", {"service": JOB})
    row = await eventually(lambda: running(client), 30, what="redeployed")
    assert row["node"] == "w2", "placed back on the worker holding its data, not the emptier w1"
    await eventually(lambda: runs(stack, "w2") == 4, 10, what="a fourth line")

    await client.request("services", "undeploy", {"service": JOB})
    await eventually(lambda: _no_instance(client), 20, what="undeployed")
    stack.procs["w2"].stop()
    await client.request("services", "deploy", {"service": JOB})
    row = await eventually(lambda: running(client), 30, what="deployed with its worker gone")
    assert row["node"] == "w1"
    assert "its volumes start empty here: their data is on w2" in row["reason"]
    await eventually(lambda: runs(stack, "w1") == 1, 10, what="a first line in the new, empty volume")
    stack.procs["w2"].start()
    await eventually(lambda: _volumes_on(client, {"w1", "w2"}), 30, what="both volumes listed")

    stack.procs["w2"].stop()  # offline while the application is deleted: it misses the order
    deleted = await client.request("apps", "delete", {"app": "vol"})
    assert deleted["deleted_volumes"] == [f"admin/{JOB}/store"]
    volume = {worker: stack.base / worker / "volumes" / "admin" / JOB / "store" for worker in ("w1", "w2")}
    await eventually(lambda: not volume["w1"].exists(), 20, what="the volume gone from w1")
    assert volume["w2"].exists()
    stack.procs["c1"].stop()  # and the order its cluster's broker kept for it is lost
    stack.procs["c1"].start()
    stack.procs["w2"].start()  # it reports a volume of no service: the root asks again
    await eventually(lambda: not volume["w2"].exists(), 30, what="the volume gone from w2 once it is back")
    await eventually(lambda: _volumes_on(client, set()), 20, what="no volume listed")


async def test_a_container_keeps_its_volume_across_an_update(stack: Stack, api: Any, busybox_image: Path) -> None:
    """A busybox container writes to its volume; the instance of the next revision, on the same worker, reads
    what the first wrote and adds its own line."""
    stack.root()
    stack.cluster("c1")
    stack.worker("w2", "c1", "--runtime", "container", "--stop-grace", "1")
    client = await api()
    await eventually(lambda: online_nodes(client, 1), 30, what="w2 online")
    keeper = {"microservice_name": "keeper", "virtualization": "container", "code": str(busybox_image),
              "cmd": ["sh", "-c", "echo run >> /srv/data/runs; sleep 600"], "environment": ["V=1"],
              "volumes": [{"name": "store", "path": "/srv/data"}],
              "update": {"min_healthy_time": 0.5, "healthy_deadline": 60}}
    await client.request("apps", "create", raw=dumps(sla(keeper, app="vol")))
    await client.request("services", "deploy", {"service": JOB})
    await eventually(lambda: runs(stack, "w2") == 1, 60, what="the container's first line")
    await client.request("services", "update", {"service": JOB, "microservice": {"environment": ["V=2"]}})
    await eventually(lambda: runs(stack, "w2") == 2, 60, what="revision 2's line beside the first")
    await client.request("apps", "delete", {"app": "vol"})
    gone = stack.base / "w2" / "volumes" / "admin" / JOB / "store"
    await eventually(lambda: not gone.exists(), 30, what="the volume gone with the application")


async def _no_instance(client: OakClient) -> bool:
    return not (await client.request("services", "inspect", {"service": JOB}))["instances"]


async def _volumes_on(client: OakClient, nodes: set[str]) -> bool:
    return {v["node"] for v in await client.request("volumes", "list")} == nodes


async def test_the_root_remembers_volumes_deleted_with_their_application(tmp_path: Path) -> None:
    """Deleted volumes are remembered across a restart of the root (so a worker away then is asked again), and
    forgotten when a service of that name is created again (its volumes are its own then)."""
    from services.common.sla import parse_sla
    from services.common.store import Store
    from services.root.catalog import Catalog
    from tests.conftest import sleeper

    store = Store(tmp_path / "root.json")
    catalog = Catalog(store)
    app = await catalog.create_app("u", parse_sla(sla(sleeper("a"), sleeper("b"), app="one"))[0])
    await catalog.delete_app(app, ["u/one.test.a.test/data", "u/one.test.b.test/logs"])
    store.close()
    store = Store(tmp_path / "root.json")
    catalog = Catalog(store)
    await catalog.load()
    assert catalog.deleted_volumes == {"u/one.test.a.test/data", "u/one.test.b.test/logs"}
    await catalog.create_app("u", parse_sla(sla(sleeper("a"), app="one"))[0])
    assert catalog.deleted_volumes == {"u/one.test.b.test/logs"}
    await catalog.create_app("v", parse_sla(sla(sleeper("b"), app="one"))[0])
    assert catalog.deleted_volumes == {"u/one.test.b.test/logs"}, "another user's service of that name"
    store.close()
