"""Placement constraints end to end through real brokers, and a third-party scheduler plugin
installed through its entry point and selected by name at startup."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from services.common import plugins
from tests.conftest import dumps, eventually, sla, sleeper
from tests.stack import Stack
from tests.test_three_tiers import _online_nodes, state

MUNICH, BERLIN = "48.137,11.575", "52.520,13.405"
PROFILE = ["--scheduler", "least-loaded,labels,geo,anti-affinity"]


async def settled(client: Any, job: str, count: int) -> list[dict[str, Any]]:
    """Instances of *job* once *count* of them exist and none is still on its way."""

    async def check() -> list[dict[str, Any]] | None:
        instances = (await state(client, job))["instances"]
        moving = {"REQUESTED", "CLUSTER_SCHEDULED", "NODE_SCHEDULED", "CREATING"}
        return instances if len(instances) == count and not any(i["status"] in moving for i in instances) else None

    return await eventually(check, 30, what=f"{job} settled")


@pytest.mark.timeout(150)
async def test_every_constraint_type(stack: Stack, api: Any) -> None:
    """direct cluster and node lists, needed labels, geo distance and anti-affinity, across two clusters."""
    stack.root(*PROFILE)
    stack.cluster("c1", "--location", MUNICH, *PROFILE)
    stack.cluster("c2", "--location", BERLIN, *PROFILE)
    stack.worker("w1", "c1", "--label", "gpu")
    stack.worker("w2", "c1")
    stack.worker("w3", "c2")
    stack.worker("w4", "c2")
    client = await api()
    await eventually(lambda: _online_nodes(client, 4), what="four workers")
    doc = sla(
        sleeper("incluster", 6301, constraints=[{"type": "direct", "cluster": "c2"}]),
        sleeper("onnodes", 6302, constraints=[{"type": "direct", "node": "w1;w4"}]),
        sleeper("needsgpu", 6303, constraints=[{"type": "addons", "needs": ["gpu"]}]),
        sleeper("nearmunich", 6304, constraints=[{"type": "geo", "location": "48.2,11.6", "threshold": 100}]),
        sleeper("spread", 6305),
        app="where",
    )
    await client.request("apps", "create", raw=dumps(doc))
    for name, replicas in [("incluster", 2), ("onnodes", 2), ("needsgpu", 1), ("nearmunich", 2), ("spread", 5)]:
        await client.request("services", "deploy", {"service": f"where.test.{name}.test", "replicas": replicas})

    def where(instances: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return sorted((i["cluster"], i["node"]) for i in instances if i["status"] == "RUNNING")

    assert where(await settled(client, "where.test.incluster.test", 2)) == [("c2", "w3"), ("c2", "w4")]
    assert where(await settled(client, "where.test.onnodes.test", 2)) == [("c1", "w1"), ("c2", "w4")]
    assert where(await settled(client, "where.test.needsgpu.test", 1)) == [("c1", "w1")]
    assert where(await settled(client, "where.test.nearmunich.test", 2)) == [("c1", "w1"), ("c1", "w2")]
    spread = await settled(client, "where.test.spread.test", 5)
    assert where(spread) == [("c1", "w1"), ("c1", "w2"), ("c2", "w3"), ("c2", "w4")]
    (left,) = [i for i in spread if i["status"] != "RUNNING"]
    assert left["status"] == "NoActiveClusterWithCapacity"
    assert "already runs a replica of where.test.spread.test" in left["reason"]
    await client.request("services", "scale", {"service": "where.test.spread.test", "replicas": 4})
    await client.request("services", "undeploy", {"service": "where.test.incluster.test"})
    assert where(await settled(client, "where.test.spread.test", 4)) == where(spread)


PLUGIN = '''
"""A throw-away third-party scheduler: always the candidate whose id sorts last."""
import pluggy

hookimpl = pluggy.HookimplMarker("oak")


class PickLast:
    name = "pick-last"

    def filter(self, demand, candidate):
        return None

    def score(self, demand, candidate):
        return 0.0

    def normalize(self, scores):
        last = max(scores)
        return {cid: 100.0 if cid == last else 0.0 for cid in scores}


@hookimpl
def oak_make_scheduler(name, args):
    return PickLast() if name == "pick-last" else None
'''


def install_plugin(site: Path) -> None:
    """Install the package the way an installer does: the module plus a dist-info with its entry point."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "oak_pick_last.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "oak_pick_last-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: oak-pick-last\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[oak.schedulers]\npick-last = oak_pick_last\n")
    (info / "RECORD").write_text("")


@pytest.mark.timeout(120)
async def test_third_party_scheduler_plugin(tmp_path: Path, api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin package found through the oak.schedulers entry point, selected with --scheduler, decides."""
    site = tmp_path / "site"
    install_plugin(site)
    monkeypatch.syspath_prepend(str(site))
    assert "pick-last" in plugins.available("scheduler")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    stack = Stack(tmp_path / "stack", env)
    try:
        stack.root("--scheduler", "pick-last")
        stack.cluster("c1", "--scheduler", "pick-last")
        for name in ("w1", "w2", "w3"):
            stack.worker(name, "c1")
        from tests.conftest import connect

        client = await connect(stack)
        await eventually(lambda: _online_nodes(client, 3), what="three workers")
        await client.request("apps", "create", raw=dumps(sla(sleeper("job", 6311), app="third")))
        await client.request("services", "deploy", {"service": "third.test.job.test", "replicas": 3})
        instances = await settled(client, "third.test.job.test", 3)
        assert {i["node"] for i in instances} == {"w3"}, "pick-last put every replica on the last worker"
        clusters = await client.request("clusters", "list")
        assert clusters[0]["name"] == "c1"
        await client.__aexit__(None, None, None)
    finally:
        stack.stop()


@pytest.mark.timeout(120)
async def test_latency_constraint_with_measured_coordinates(stack: Stack, api: Any) -> None:
    """Workers measure RTTs to each other; a latency constraint places next to its target, and an unknown
    target says so."""
    stack.root()
    stack.cluster("c1")
    for name in ("w1", "w2", "w3"):
        stack.worker(name, "c1")
    client = await api()
    await eventually(lambda: _online_nodes(client, 3), what="three workers")

    async def measured() -> bool:
        return all(n["coord"] for n in await client.request("nodes", "list"))

    await eventually(measured, 30, what="every worker has a Vivaldi coordinate")
    doc = sla(
        sleeper("nearw2", 6321, constraints=[{"type": "latency", "target": "w2", "threshold": 0.000001}]),
        sleeper("anywhere", 6322, constraints=[{"type": "latency", "target": "w2", "threshold": 10000}]),
        sleeper("lost", 6323, constraints=[{"type": "latency", "target": "w9", "threshold": 5}]),
        app="lat",
    )
    await client.request("apps", "create", raw=dumps(doc))
    for name, replicas in (("nearw2", 2), ("anywhere", 3), ("lost", 1)):
        await client.request("services", "deploy", {"service": f"lat.test.{name}.test", "replicas": replicas})
    near = await settled(client, "lat.test.nearw2.test", 2)
    assert {i["node"] for i in near} == {"w2"}, "only the target itself is within a microsecond"
    anywhere = await settled(client, "lat.test.anywhere.test", 3)
    assert [i["status"] for i in anywhere] == ["RUNNING"] * 3, "a generous threshold lets every worker qualify"
    (lost,) = (await state(client, "lat.test.lost.test"))["instances"]
    assert lost["status"] == "NoActiveClusterWithCapacity"
    assert "latency target w9 unknown" in lost["reason"]
