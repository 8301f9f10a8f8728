"""A simulated fleet: `oak sim` starts 50 real worker agents (simulated workloads) against a real cluster."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from services.common.mqtt import BrokerUrl
from services.worker import app
from tests.conftest import dumps, eventually, sla
from tests.stack import Proc, Stack, oak
from tests.test_three_tiers import _online_nodes, state

WORKERS = 50


@pytest.mark.timeout(180)
async def test_fifty_simulated_workers(stack: Stack, api: Any) -> None:
    """All 50 join and report; 200 instances run, spread over them; a sim worker fleet shuts down cleanly."""
    stack.root()
    stack.cluster("c1")
    sim = Proc("sim", oak("sim", "--workers", str(WORKERS), "--cluster", f"127.0.0.1:{stack.cluster_ports['c1']}",
                          "--data-dir", str(stack.base / "sim"), "--report-interval", "2",
                          f"--join-token={stack.token}", *stack.pin()), stack.base).start()
    stack.procs["sim"] = sim
    client = await api()
    await eventually(lambda: _online_nodes(client, WORKERS), 90, 0.5, what=f"{WORKERS} simulated workers online")
    said = await eventually(lambda: f"oak sim: all {WORKERS} workers connected" in sim.log.read_text()
                            and sim.log.read_text(), 10, what="the sim saying all are connected")
    assert f"of {WORKERS} workers connected" in said, "and how many on the way"
    doc = sla({"microservice_name": "fleet", "cmd": ["sleep", "1"]},
              {"microservice_name": "batch", "cmd": ["exit", "0", "1"], "one_shot": True}, app="sim")
    await client.request("apps", "create", raw=dumps(doc))
    await client.request("services", "deploy", {"service": "sim.test.fleet.test", "replicas": 200})
    await client.request("services", "deploy", {"service": "sim.test.batch.test", "replicas": 20})

    async def fleet_running() -> dict[str, Any] | None:
        s = await state(client, "sim.test.fleet.test")
        return s if s["status"] == "RUNNING" and len(s["instances"]) == 200 else None

    fleet = await eventually(fleet_running, 90, 0.5, what="200 instances RUNNING")
    per_node: dict[str, int] = {}
    for instance in fleet["instances"]:
        per_node[instance["node"]] = per_node.get(instance["node"], 0) + 1
    assert len(per_node) == WORKERS, "least-loaded with reservations spreads the replicas over every worker"
    assert max(per_node.values()) == 4

    async def batch_completed() -> bool:
        return (await state(client, "sim.test.batch.test"))["status"] == "COMPLETED"

    await eventually(batch_completed, 60, 0.5, what="the one_shot batch COMPLETED")


async def test_a_failing_simulated_worker_is_retried_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``oak sim`` runs each worker under run_worker_retrying: a failure is logged and retried later."""
    attempts: list[str] = []

    async def flaky(cfg: app.WorkerConfig) -> None:
        attempts.append(cfg.name)
        if len(attempts) < 3:
            raise TimeoutError("join not answered")

    monkeypatch.setattr(app, "run_worker", flaky)
    monkeypatch.setattr(app, "RETRY_FIRST", 0.01)
    cfg = app.WorkerConfig(tmp_path / "w", BrokerUrl("127.0.0.1", 1), "w", ("sim",), "sim", None)
    await asyncio.wait_for(app.run_worker_retrying(cfg), 5)
    assert attempts == ["w", "w", "w"]
