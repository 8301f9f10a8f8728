"""Several workers die at once (``kill -9`` of the ``oak sim`` process that runs them): every one is
detected and every instance they held runs elsewhere. On the embedded broker and on mosquitto.

No timing is asserted (generous timeouts only): how fast belongs to bench/scale.py and BENCHMARKS.md.
"""

from __future__ import annotations

from typing import Any

import pytest

from services.cli.client import OakClient
from tests.conftest import dumps, eventually, sla
from tests.stack import Proc, Stack, oak
from tests.test_mosquitto import _need_mosquitto
from tests.test_three_tiers import state

VICTIMS, SURVIVORS, REPLICAS = 6, 4, 60
SERVICE = "mass.test.fleet.test"


def _sim(stack: Stack, prefix: str, workers: int) -> Proc:
    proc = Proc(f"sim-{prefix}", oak("sim", "--workers", str(workers), "--prefix", prefix,
                                     "--cluster", f"127.0.0.1:{stack.cluster_ports['c1']}",
                                     "--data-dir", str(stack.base / "sims"), "--report-interval", "2",
                                     f"--join-token={stack.token}", *stack.pin()),
                stack.base).start()
    stack.procs[proc.name] = proc
    return proc


async def _placement(client: OakClient) -> dict[str, str] | None:
    """Instance number -> node, once all REPLICAS instances are RUNNING."""
    s = await state(client, SERVICE)
    if len(s["instances"]) != REPLICAS or any(i["status"] != "RUNNING" for i in s["instances"]):
        return None
    return {str(i["number"]): i["node"] for i in s["instances"]}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("broker", ["embedded", "mosquitto"])
async def test_workers_killed_at_once_are_all_detected_and_replaced(stack: Stack, api: Any, broker: str) -> None:
    """kill -9 of 6 of 10 simulated workers: all 6 go offline and their instances run on the other 4."""
    if broker == "mosquitto":
        _need_mosquitto()
    stack.root("--broker", broker)
    stack.cluster("c1", "--broker", broker)
    victims = _sim(stack, "v", VICTIMS)
    _sim(stack, "s", SURVIVORS)
    client = await api()

    async def online() -> bool:
        return sum(n["online"] for n in await client.request("nodes", "list")) == VICTIMS + SURVIVORS

    await eventually(online, 90, 0.5, what="10 simulated workers online")
    await client.request("apps", "create", raw=dumps(sla({"microservice_name": "fleet", "cmd": ["sleep", "1"],
                                                           "memory": 1, "vcpus": 0.01}, app="mass")))
    await client.request("services", "deploy", {"service": SERVICE, "replicas": REPLICAS})
    before = await eventually(lambda: _placement(client), 90, 0.5, what=f"{REPLICAS} instances RUNNING")
    assert {node[0] for node in before.values()} == {"v", "s"}, "least-loaded uses every worker"

    victims.kill9()

    async def all_offline() -> bool:
        nodes = await client.request("nodes", "list")
        return all(not n["online"] for n in nodes if n["name"].startswith("v-")) and \
            sum(n["online"] for n in nodes) == SURVIVORS

    await eventually(all_offline, 90, 0.5, what=f"all {VICTIMS} killed workers offline")

    async def replaced() -> dict[str, str] | None:
        after = await _placement(client)
        return after if after and all(node.startswith("s-") for node in after.values()) else None

    after = await eventually(replaced, 120, 0.5, what="every instance RUNNING on a surviving worker")
    kept = {n for n, node in before.items() if node.startswith("s-")}
    assert all(after[n] == before[n] for n in kept), "instances on surviving workers stayed where they were"
