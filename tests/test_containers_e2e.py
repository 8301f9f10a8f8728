"""Containers through the whole stack: a busybox OCI image built by the test, no registry."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from plugins.runtimes.cgroups import ROOT, Cgroup
from tests.conftest import dumps, eventually, sla
from tests.stack import REPO, Stack, oak
from tests.test_three_tiers import _online_nodes, state

TICKER = "echo started; i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.2; done"


def container(name: str, image: Path, cmd: list[str], **extra: Any) -> dict[str, Any]:
    return {"microservice_name": name, "virtualization": "container", "code": str(image), "cmd": cmd, **extra}


@pytest.mark.timeout(150)
async def test_containers_run_log_die_and_leave_nothing(stack: Stack, api: Any, busybox_image: Path) -> None:
    """RUNNING only on the worker with the container runtime; logs readable and followed; an OOM kill
    reported; one_shot COMPLETED; undeploy leaves no container, bundle or cgroup."""
    stack.root()
    stack.cluster("c1")
    stack.worker("plain", "c1", "--stop-grace", "1")
    stack.worker("ctr", "c1", "--runtime", "process", "--runtime", "container", "--stop-grace", "1")
    client = await api()
    await eventually(lambda: _online_nodes(client, 2), what="two workers")
    doc = sla(
        container("web", busybox_image, ["sh", "-c", TICKER]),
        container("hog", busybox_image, ["dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1"], memory=40),
        container("once", busybox_image, ["true"], one_shot=True),
        app="boxes",
    )
    await client.request("apps", "create", raw=dumps(doc))
    await client.request("services", "deploy", {"service": "boxes.test.web.test", "replicas": 2})
    await client.request("services", "deploy", {"service": "boxes.test.hog.test"})
    await client.request("services", "deploy", {"service": "boxes.test.once.test"})

    async def web_running() -> list[dict[str, Any]] | None:
        instances = (await state(client, "boxes.test.web.test"))["instances"]
        return instances if all(i["status"] == "RUNNING" for i in instances) else None

    web = await eventually(web_running, 60, what="web RUNNING")
    assert {i["node"] for i in web} == {"ctr"}, "never placed on a worker without the container runtime"

    async def oom() -> dict[str, Any] | None:
        (hog,) = (await state(client, "boxes.test.hog.test"))["instances"]
        return hog if hog["reason"].startswith("out of memory") else None

    hog = await eventually(oom, 60, what="the hog OOM-killed")
    assert hog["status"] in ("DEAD", "RUNNING", "CREATING")

    async def completed() -> bool:
        return (await state(client, "boxes.test.once.test"))["status"] == "COMPLETED"

    await eventually(completed, 60, what="once COMPLETED")

    home = stack.base / "root"
    done = subprocess.run(oak("service", "logs", "boxes.test.web.test", "0", "-n", "5", "--data-dir", str(home)),
                          capture_output=True, text=True, cwd=REPO, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert 1 <= len(lines) <= 5
    assert all(line.startswith(("tick", "started")) for line in lines)

    first, answers = await client.stream("services", "logs", {"service": "boxes.test.web.test", "tail": 0,
                                                              "follow": 1.5})
    assert first["instances"] == [0, 1]
    seen: dict[int, list[str]] = {0: [], 1: []}
    finished: set[int] = set()
    deadline = time.monotonic() + 20
    async for answer in answers:
        data = answer["data"]
        seen[data["number"]] += data["lines"]
        if data["done"]:
            finished.add(data["number"])
        if finished == {0, 1} or time.monotonic() > deadline:
            break
    assert finished == {0, 1}
    assert all(any(line.startswith("tick") for line in lines) for lines in seen.values()), seen

    await client.request("apps", "delete", {"app": "boxes"})
    state_dir = stack.base / "ctr" / "runc"

    def nothing_left() -> bool:
        listed = subprocess.run(["runc", "--root", str(state_dir), "list", "-q"], capture_output=True, text=True)
        bundles = list((stack.base / "ctr" / "bundles").glob("*"))
        groups = [i["iid"] for i in web + [hog] if Cgroup(i["iid"]).exists()]
        return listed.stdout.strip() == "" and not bundles and not groups

    await eventually(nothing_left, 30, what="no container, bundle or cgroup left")
    assert ROOT.exists()
