"""README: "Instances survive a worker that is killed (kill -9): the restarted worker adopts them." Tried as
issue 21 did, by killing only the worker's PID and starting it again 2 s later, on both brokers, with the
process runtime (containers on runc and containerd: tests/test_containers_e2e.py; VMs: tests/test_vm_e2e.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack, dumps, either_broker, eventually, fleet, sla, sleeper
from tests.test_three_tiers import _online_nodes, running, sleeps


@pytest.fixture(params=["embedded", "mosquitto"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """A stack on either broker."""
    yield from either_broker(request.param, tmp_path)


@pytest.mark.timeout(120)
async def test_a_worker_killed_alone_adopts_its_processes(stack: Stack, api: Any) -> None:
    """kill -9 of the worker's PID only, a restart 2 s later: the same process runs on, adopted, with no
    restart counted."""
    admin = await fleet(stack, api, {"c1": ("w1",)})
    await admin.request("apps", "create", raw=dumps(sla(sleeper("job", 6081), app="ad")))
    await admin.request("services", "deploy", {"service": "ad.test.job.test", "replicas": 1})
    before = (await running(admin, "ad.test.job.test", 1))["instances"][0]
    pids = [p.pid for p in sleeps("6081", stack.base)]
    assert len(pids) == 1

    stack.procs["w1"].kill9()
    await asyncio.sleep(2)
    assert [p.pid for p in sleeps("6081", stack.base)] == pids, "the instance died with its worker"
    stack.procs["w1"].start()
    await eventually(lambda: "adopted" in stack.procs["w1"].log.read_text(), timeout=30, what="adopted")
    await eventually(lambda: _online_nodes(admin, 1), timeout=30, what="w1 back")
    after = (await running(admin, "ad.test.job.test", 1))["instances"][0]
    assert (after["iid"], after["restarts"]) == (before["iid"], before["restarts"])
    assert [p.pid for p in sleeps("6081", stack.base)] == pids, "the instance was started again"
