"""A bad message from a child never stops its parent, retained or not, on either broker (issues 14, 21).

A worker's retained ``up/info`` with ``"cpu_cores": "x"`` used to stop the cluster, and on mosquitto
(which keeps retained messages across restarts) to stop it again at every start; a cluster's state with
a string for a number stopped the root. Now each is dropped with one log line naming the field, and a
bad retained message is cleared.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack, either_broker, eventually, fleet, machine_login

MOSQUITTO = ("--broker", "mosquitto")


@pytest.fixture(params=["embedded", "mosquitto"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """A stack on either broker."""
    yield from either_broker(request.param, tmp_path)


def _publish_as(stack: Stack, machine: str, port: int, topic: str, payload: str, retain: bool) -> None:
    """Publish as *machine*, with its own certificate (as a broken or hostile worker or cluster would)."""
    subprocess.run(["mosquitto_pub", *machine_login(stack, machine, port), "-q", "1", "-t", topic, "-m", payload,
                    *(["-r"] if retain else [])], check=True, timeout=10)


async def _w1_online(admin: Any) -> bool:
    """w2, whose info was cleared, shows again only once it has sent a good one: w1 is what counts."""
    return any(n["name"] == "w1" and n["online"] for n in await admin.request("nodes", "list"))


def _envelope(kind: str, data: dict[str, Any]) -> str:
    return json.dumps({"v": 1, "kind": kind, "ts": 0, "src": "test", "data": data})


@pytest.mark.timeout(150)
async def test_bad_messages_from_children_stop_no_parent(stack: Stack, api: Any) -> None:
    """A poisoned retained worker info survives a cluster restart without stopping it, and is cleared; a
    cluster state with a string for a number leaves the root serving."""
    admin = await fleet(stack, api, {"c1": ("w1", "w2")})
    cluster = stack.cluster_ports["c1"]

    bad_info = _envelope("node.info", {"name": "w2", "cpu_cores": "x", "memory_mb": 100, "runtimes": None})
    _publish_as(stack, "w2", cluster, "oak/nodes/w2/up/info", bad_info, retain=True)
    await eventually(lambda: "NodeInfo.cpu_cores: expected a number" in (stack.base / "c1.log").read_text(),
                     timeout=10, what="the cluster naming the bad field")
    stack.procs["c1"].stop()
    stack.procs["c1"].start()  # it reads the retained info again (mosquitto keeps it across restarts)
    await eventually(lambda: _w1_online(admin), timeout=30, what="the restarted cluster serving w1")
    assert stack.procs["c1"].popen is not None
    assert stack.procs["c1"].popen.poll() is None, f"the cluster stopped:\n{stack.logs()}"

    bad_state = _envelope("cluster.state", {"epoch": "e", "seq": 1, "nodes": {"w1": {"name": "w1", "cpu_cores": "x"}},
                                            "instances": {}})
    _publish_as(stack, "c1", stack.root_port, "oak/clusters/c1/up/state", bad_state, retain=False)
    assert await admin.request("services", "list") == []
    assert stack.procs["root"].popen is not None
    assert stack.procs["root"].popen.poll() is None, f"the root stopped:\n{stack.logs()}"
    assert [c["name"] for c in await admin.request("clusters", "list")] == ["c1"]
