"""Rolling updates through real brokers and real processes: auto-revert, canaries and promote, a root
killed with -9 in the middle, and the CLI (`oak service update | history | rollback | promote`)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.cli.client import OakClient
from tests.conftest import Stack, dumps, eventually, online_nodes, sla, sleeper
from tests.test_cli_and_scripts import run_oak

pytestmark = pytest.mark.timeout(180)
JOB = "up.test.web.test"
HEALTHY = {"type": "exec", "cmd": ["true"], "interval": 0.3}


def web(**update: Any) -> dict[str, Any]:
    """Sleepers with an exec check that passes and a quick update policy."""
    return sleeper("web", environment=["V=1"], health=HEALTHY,
                   update={"max_parallel": 1, "min_healthy_time": 0.5, "healthy_deadline": 6, **update})


async def started(stack: Stack, api: Any, service: dict[str, Any], replicas: int = 3) -> OakClient:
    """A root, a cluster and a worker running *replicas* healthy instances of *service*."""
    stack.root()
    stack.cluster("c1")
    stack.worker("w1", "c1", "--stop-grace", "1")
    client = await api()
    await eventually(lambda: online_nodes(client, 1), 30, what="w1 online")
    await client.request("apps", "create", raw=dumps(sla(service, app="up")))
    await client.request("services", "deploy", {"service": JOB, "replicas": replicas})
    await eventually(lambda: rolled(client, 1, replicas), 30, what=f"{replicas} healthy instances of revision 1")
    return client


async def rolled(client: OakClient, revision: int, replicas: int, state: str | None = None) -> dict[str, Any] | None:
    """The service's state once exactly *replicas* instances run *revision*, healthy, and its rollout (if
    *state*) has ended in *state*."""
    data = await client.request("services", "inspect", {"service": JOB})
    rows = data["instances"]
    ready = len(rows) == replicas and all(r["revision"] == revision and r["health"] == "healthy" for r in rows)
    ended = state is None or (data["rollout"]["state"] == state and not data["rollout"]["active"])
    return data if ready and ended else None


async def test_a_revision_that_never_gets_healthy_reverts(stack: Stack, api: Any) -> None:
    """Revision 2's check never passes: after healthy_deadline the service goes back to revision 1 by itself,
    the rollout says reverted and why, and never more than max_parallel instances were down."""
    client = await started(stack, api, web())
    answer = await client.request("services", "update", {"service": JOB, "microservice": {
        "environment": ["V=2"], "health": {**HEALTHY, "cmd": ["false"]}}})
    assert (answer["revision"], answer["changed"]) == (2, ["environment", "health"])
    lowest = [3]

    async def reverted() -> dict[str, Any] | None:
        data = await client.request("services", "inspect", {"service": JOB})
        lowest[0] = min(lowest[0], sum(1 for r in data["instances"] if r["health"] == "healthy"))
        return await rolled(client, 1, 3, "reverted")

    data = await eventually(reverted, 40, interval=0.2, what="back at revision 1, reverted")
    assert "instance #0 of revision 2 was not healthy within 6 s: back to revision 1" in data["rollout"]["reason"]
    assert data["revision"] == 1
    assert lowest[0] >= 2, "3 replicas, max_parallel 1: never fewer than 2 healthy"
    history = await client.request("services", "history", {"service": JOB})
    assert [(r["revision"], r["current"], r["change"]) for r in history] == [
        (1, True, "created"), (2, False, "environment, health")]


async def test_canary_promote_history_and_rollback_from_the_cli(stack: Stack, api: Any) -> None:
    """`oak service update --env V=2 --wait` with a canary stops with it running beside the three old
    instances; `promote` replaces them; `history` lists both revisions; `rollback` goes back to 1."""
    client = await started(stack, api, web(canary=1))
    home = stack.base / "root"
    done = run_oak(home, "service", "update", JOB, "--env", "V=2", "--wait")
    assert "canaries of revision 2 run beside the old instances" in done.stderr
    data = await client.request("services", "inspect", {"service": JOB})
    assert data["rollout"]["state"] == "paused"
    assert sorted(r["revision"] for r in data["instances"]) == [1, 1, 1, 2]
    assert "rollout of revision 2: paused, 1 updated" in run_oak(home, "service", "inspect", JOB).stdout
    run_oak(home, "service", "promote", JOB)
    promoted = await eventually(lambda: rolled(client, 2, 3, "succeeded"), 40, what="promoted: 3 of revision 2")
    assert {r["number"] for r in promoted["instances"]} >= {3}, "the canary stayed"
    history = run_oak(home, "service", "history", JOB).stdout.splitlines()
    assert [line.split()[0] for line in history[1:]] == ["1", "2"]
    assert "environment" in history[2]
    spec = json.loads(run_oak(home, "service", "history", JOB, "--json").stdout)[1]["spec"]
    assert spec["environment"] == ["V=2"]
    run_oak(home, "service", "rollback", JOB)
    await eventually(lambda: rolled(client, 1, 3, "succeeded"), 40, what="rolled back to revision 1")
    refused = run_oak(home, "service", "promote", JOB, check=False)
    assert refused.returncode != 0
    assert "no rollout waiting to be promoted" in refused.stderr


@pytest.mark.parametrize("killed", ["root", "c1", "w1"])
async def test_a_tier_killed_mid_rollout_resumes_it(stack: Stack, api: Any, killed: str) -> None:
    """kill -9 of the root, the cluster or the worker after the first instance was replaced: once it is back
    the rollout goes on from the records, and the service ends with three instances of revision 2, no more."""
    client = await started(stack, api, web(min_healthy_time=2))
    await client.request("services", "update", {"service": JOB, "microservice": {"environment": ["V=2"]}})

    async def begun() -> bool:
        data = await client.request("services", "inspect", {"service": JOB})
        return bool(data["rollout"]["active"] and data["rollout"]["updated"] >= 1)

    await eventually(begun, 20, interval=0.1, what="the first replacement")
    stack.procs[killed].kill9()
    stack.procs[killed].start()
    client = await api() if killed == "root" else client
    data = await eventually(lambda: rolled(client, 2, 3, "succeeded"), 60, what="the rollout went on after the restart")
    assert sorted(r["number"] for r in data["instances"]) == [0, 1, 2]
