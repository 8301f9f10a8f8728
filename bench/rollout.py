"""Benchmark of rolling updates (issue 16): the time to roll 10 replicas to a new revision with
max_parallel 2, against the time to deploy the same 10 from scratch, in one run.

Root, cluster and two workers (process runtime, no overlay) as separate processes; the service is a
``sleep`` with an exec health check, so both times run until every instance is healthy. The rollout's
own pacing is the policy's ``min_healthy_time`` (a new instance must stay healthy that long before the
next batch): measured at 0 s (the mechanism alone) and 1 s.

Run: ``.venv/bin/python -m bench.rollout [--rounds N] [--replicas N]``
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import record, summary
from bench.three_tiers import _online, client_for
from services.cli.client import OakClient
from tests.stack import Stack, eventually

CHECK = {"type": "exec", "cmd": ["true"], "interval": 0.5}


def sla(app: str, replicas_policy: dict[str, Any]) -> bytes:
    service = {"microserviceID": "", "microservice_name": "svc", "microservice_namespace": "bench",
               "virtualization": "process", "code": "", "cmd": ["sleep", "3600"], "memory": 10, "vcpus": 0.01,
               "environment": ["V=0"], "health": CHECK, "update": replicas_policy}
    return json.dumps({"sla_version": "v2.0", "customerID": "bench", "applications": [{
        "applicationID": "", "application_name": app, "application_namespace": "bench", "application_desc": "",
        "microservices": [service]}]}).encode()


async def all_healthy(client: OakClient, job: str, replicas: int, revision: int) -> bool:
    state = await client.request("services", "inspect", {"service": job})
    rows = state["instances"]
    rolled = state["rollout"] is None or not state["rollout"]["active"]
    return rolled and len(rows) == replicas and all(r["revision"] == revision and r["health"] == "healthy"
                                                    for r in rows)


async def measure(client: OakClient, app: str, replicas: int, min_healthy: float, rounds: int) -> dict[str, Any]:
    """Seconds to deploy *replicas* from scratch and to roll them to a new revision, *rounds* times each."""
    policy = {"max_parallel": 2, "min_healthy_time": min_healthy, "healthy_deadline": 120}
    await client.request("apps", "create", raw=sla(app, policy))
    job = f"{app}.bench.svc.bench"
    deploys, rolls = [], []
    revision = 1
    for n in range(rounds):
        t0 = time.monotonic()
        await client.request("services", "deploy", {"service": job, "replicas": replicas})
        await eventually(functools.partial(all_healthy, client, job, replicas, revision), 120, 0.05, what="deployed")
        deploys.append(time.monotonic() - t0)
        t0 = time.monotonic()
        await client.request("services", "update", {"service": job, "microservice": {"environment": [f"V={n + 1}"]}})
        revision += 1
        await eventually(functools.partial(all_healthy, client, job, replicas, revision), 300, 0.05, what="rolled")
        rolls.append(time.monotonic() - t0)
        await client.request("services", "undeploy", {"service": job})
        await eventually(lambda: _gone(client, job), 60, 0.1, what="undeployed")
    await client.request("apps", "delete", {"app": app})
    deploy, roll = summary(deploys), summary(rolls)
    return {"min_healthy_time_s": min_healthy, "deploy_s": deploy, "rollout_s": roll,
            "ratio_median": roll["median"] / deploy["median"]}


async def _gone(client: OakClient, job: str) -> bool:
    return not (await client.request("services", "inspect", {"service": job}))["instances"]


async def run(rounds: int, replicas: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp))
        try:
            stack.root()
            stack.cluster("c1")
            stack.worker("wa", "c1", "--stop-grace", "1")
            stack.worker("wb", "c1", "--stop-grace", "1")
            client = await client_for(stack)
            await eventually(lambda: _online(client, 2), 30, what="workers online")
            cells = [await measure(client, f"r{i}", replicas, min_healthy, rounds)
                     for i, min_healthy in enumerate((0.0, 1.0))]
            await client.__aexit__(None, None, None)
        finally:
            stack.stop()
    record("rollout", {
        "command": f"python -m bench.rollout --rounds {rounds} --replicas {replicas}", "unit": "s",
        "replicas": replicas, "max_parallel": 2, "cells": cells,
        "goal": "issue 16: the time to roll 10 replicas with max_parallel 2 against deploying them from scratch",
    })


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--replicas", type=int, default=10)
    args = p.parse_args()
    asyncio.run(run(args.rounds, args.replicas))


if __name__ == "__main__":
    main()
