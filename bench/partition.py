"""Benchmark of silent failures (issue 17): from a worker going silent (SIGSTOP: nothing closed) to its
instances RUNNING elsewhere, and from it coming back to one copy of each left, for each ``disconnect``
policy; against the last-will path (kill -9, its connection closed) measured in the same run.

Each round is a fresh root, cluster and two workers (process runtime) as separate processes. Every
service (one instance each) starts on worker ``wa`` before ``wb`` joins. Then ``wa`` is frozen; once its
instances run on ``wb`` (those that are to be replaced), it is thawed; then ``wb`` is killed with -9 (the
last-will path: its instances move back to ``wa``) and started again. Copies are counted in the process
table. Times are polled every 50 ms, so they are that coarse.

Run: ``.venv/bin/python -m bench.partition [--rounds N]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import record, summary
from bench.three_tiers import _online, client_for
from services.cli.client import OakClient
from tests.stack import Stack, eventually
from tests.test_three_tiers import sleeps

POLICIES: dict[str, dict[str, Any]] = {
    "default": {},
    "lost_after_3": {"lost_after": 3},
    "keep_original": {"reconcile": "keep_original"},
}
TIMEOUT = 60.0


def sla() -> bytes:
    services = [{"microserviceID": "", "microservice_name": name.replace("_", ""), "microservice_namespace": "bench",
                 "virtualization": "process", "code": "", "cmd": ["sleep", str(8000 + k)], "memory": 10, "vcpus": 0.01,
                 "disconnect": policy} for k, (name, policy) in enumerate(POLICIES.items())]
    return json.dumps({"sla_version": "v2.0", "customerID": "bench", "applications": [{
        "applicationID": "", "application_name": "part", "application_namespace": "bench", "application_desc": "",
        "microservices": services}]}).encode()


def job(policy: str) -> str:
    return f"part.bench.{policy.replace('_', '')}.bench"


def token(policy: str) -> str:
    return str(8000 + list(POLICIES).index(policy))


async def placement(client: OakClient) -> dict[str, tuple[str, str]]:
    """Each policy's instance: (its node, its status)."""
    out = {}
    for policy in POLICIES:
        rows = (await client.request("services", "inspect", {"service": job(policy)}))["instances"]
        out[policy] = (rows[0]["node"], rows[0]["status"]) if rows else ("", "")
    return out


async def until_moved(client: OakClient, away_from: str, policies: list[str], t0: float) -> dict[str, float]:
    """Seconds from *t0* until each of *policies* is RUNNING on a worker other than *away_from*."""
    seen: dict[str, float] = {}
    while len(seen) < len(policies) and time.monotonic() - t0 < TIMEOUT:
        for policy, (node, status) in (await placement(client)).items():
            if policy in policies and policy not in seen and node not in ("", away_from) and status == "RUNNING":
                seen[policy] = time.monotonic() - t0
        await asyncio.sleep(0.05)
    return seen


async def until_single(base: Path, policies: list[str], t0: float) -> dict[str, float]:
    """Seconds from *t0* until each of *policies* has exactly one copy running."""
    seen: dict[str, float] = {}
    while len(seen) < len(policies) and time.monotonic() - t0 < TIMEOUT:
        for policy in policies:
            if policy not in seen and len(sleeps(token(policy), base)) == 1:
                seen[policy] = time.monotonic() - t0
        await asyncio.sleep(0.05)
    return seen


async def one_round(base: Path) -> dict[str, dict[str, float]]:
    """One fresh stack: the silent path for every policy, then the last-will path."""
    stack = Stack(base)
    try:
        stack.root()
        stack.cluster("c1")
        stack.worker("wa", "c1", "--stop-grace", "1")
        client = await client_for(stack)
        await eventually(lambda: _online(client, 1), 30, what="wa online")
        await client.request("apps", "create", raw=sla())
        for policy in POLICIES:
            await client.request("services", "deploy", {"service": job(policy)})
        await eventually(lambda: _all_on(client, "wa"), 60, 0.1, what="every service RUNNING on wa")
        stack.worker("wb", "c1", "--stop-grace", "1")
        await eventually(lambda: _online(client, 2), 30, what="wb online")
        out: dict[str, dict[str, float]] = {}
        t0 = time.monotonic()
        stack.procs["wa"].freeze()
        try:
            out["silent_replaced_s"] = await until_moved(client, "wa", list(POLICIES), t0)
        finally:
            stack.procs["wa"].thaw()
        out["silent_back_single_s"] = await until_single(base, list(POLICIES), time.monotonic())
        on_wb = [p for p, (node, _) in (await placement(client)).items() if node == "wb"]
        t0 = time.monotonic()
        stack.procs["wb"].kill9()
        out["will_replaced_s"] = await until_moved(client, "wb", on_wb, t0)
        t0 = time.monotonic()
        stack.procs["wb"].start()
        out["will_back_single_s"] = await until_single(base, on_wb, t0)
        await client.__aexit__(None, None, None)
        return out
    finally:
        stack.stop()


async def _all_on(client: OakClient, node: str) -> bool:
    return all(p == (node, "RUNNING") for p in (await placement(client)).values())


async def run(rounds: int) -> None:
    cells: dict[str, dict[str, list[float]]] = {}
    for n in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            result = await one_round(Path(tmp))
        print(f"round {n + 1}: {json.dumps(result)}", flush=True)
        for phase, times in result.items():
            for policy, seconds in times.items():
                cells.setdefault(phase, {}).setdefault(policy, []).append(seconds)
    table = {phase: {policy: summary(values) for policy, values in by.items()} for phase, by in cells.items()}
    silent, will = table["silent_replaced_s"].get("default"), table["will_replaced_s"].get("default")
    record("partition", {
        "command": f"python -m bench.partition --rounds {rounds}", "unit": "s", "rounds": rounds,
        "policies": POLICIES, "phases": table,
        "ratio_silent_to_will_median": silent["median"] / will["median"] if silent and will else None,
        "goal": "issue 17: a silent worker's instances RUNNING elsewhere in under 5 s by default (Oakestra "
                "30-45 s, Kubernetes ~5 min); baseline: the last-will path (kill -9) in the same run",
    })


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    asyncio.run(run(args.rounds))


if __name__ == "__main__":
    main()
