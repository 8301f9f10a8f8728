"""Containers through the whole stack: a busybox OCI image built by the test, no registry."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from plugins.runtimes import containerd
from plugins.runtimes.cgroups import ROOT, Cgroup, group_name
from tests.conftest import dumps, eventually, sla
from tests.stack import REPO, Stack, oak
from tests.test_three_tiers import _online_nodes, state

TICKER = "echo started; i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.2; done"


def container(name: str, image: Path, cmd: list[str], **extra: Any) -> dict[str, Any]:
    return {"microservice_name": name, "virtualization": "container", "code": str(image), "cmd": cmd, **extra}


def running(pid: int) -> bool:
    """True while *pid* runs (a zombie waiting for its reaper does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def ctr_ls(home: Path, what: str) -> list[str]:
    """``ctr <what> ls -q`` in a worker's private containerd (``<data dir>/containerd``)."""
    sock = containerd.Containerd(home / "containerd").socket
    done = subprocess.run(["ctr", "-a", str(sock), "-n", containerd.NAMESPACE, what, "ls", "-q"],
                          capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.split()


async def plain_and(stack: Stack, api: Any, name: str, runtime: str) -> Any:
    """A root, cluster c1, a worker "plain" with the process runtime and a worker *name* with *runtime* too,
    both online; a client of the root."""
    stack.root()
    stack.cluster("c1")
    stack.worker("plain", "c1", "--stop-grace", "1")
    stack.worker(name, "c1", "--runtime", "process", "--runtime", runtime, "--stop-grace", "1")
    client = await api()
    await eventually(lambda: _online_nodes(client, 2), what="two workers")
    return client


@pytest.mark.timeout(180)
@pytest.mark.parametrize("engine", ["runc", "containerd"])
async def test_containers_run_log_die_and_leave_nothing(stack: Stack, api: Any, busybox_image: Path, engine: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """RUNNING only on the worker with the container runtime; logs readable and followed; an OOM kill
    reported; one_shot COMPLETED; undeploy leaves no container, bundle or cgroup. With containerd,
    also: the worker killed with -9 comes back to the same containerd and adopts its containers, and
    its graceful stop stops that containerd."""
    if engine == "containerd" and containerd.missing():
        pytest.skip(containerd.missing() or "")
    monkeypatch.setenv("OAK_CONTAINER_ENGINE", engine)
    client = await plain_and(stack, api, "ctr", "container")
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
    assert all("io_mb" in i for i in web), "disk I/O is reported with the instance"
    home = stack.base / "ctr"
    if engine == "containerd":
        assert {f"oak-{i['iid']}" for i in web} <= set(ctr_ls(home, "task"))
        daemon = json.loads((home / "containerd" / "containerd.pid").read_text())["pid"]
    # kill -9 of the worker's PID alone, a restart 2 s later: the same containers run on, adopted (issue 21)
    stack.procs["ctr"].kill9()
    await asyncio.sleep(2)
    stack.procs["ctr"].start()
    await eventually(lambda: _online_nodes(client, 2), 30, what="the worker back")
    await eventually(lambda: "adopted" in stack.procs["ctr"].log.read_text(), 30, what="adopted")
    again = await eventually(web_running, 30, what="web RUNNING again")
    assert [(i["iid"], i["restarts"]) for i in again] == [(i["iid"], i["restarts"]) for i in web], "adopted"
    if engine == "containerd":
        assert json.loads((home / "containerd" / "containerd.pid").read_text())["pid"] == daemon

    async def oom() -> dict[str, Any] | None:
        (hog,) = (await state(client, "boxes.test.hog.test"))["instances"]
        return hog if hog["reason"].startswith("out of memory") else None

    hog = await eventually(oom, 60, what="the hog OOM-killed")
    assert hog["status"] in ("DEAD", "RUNNING", "CREATING")

    async def completed() -> bool:
        return (await state(client, "boxes.test.once.test"))["status"] == "COMPLETED"

    await eventually(completed, 60, what="once COMPLETED")

    done = subprocess.run(oak("service", "logs", "boxes.test.web.test", "0", "-n", "5", "--data-dir",
                              str(stack.base / "root")),
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
        left = {
            "runc containers": listed.stdout.split(),
            "bundles": [b.name for b in (stack.base / "ctr" / "bundles").glob("*")],
            "cgroups": [i["iid"] for i in web + [hog] if Cgroup(group_name(i["iid"], i["node"])).exists()],
            "containerd": ctr_ls(home, "task") + ctr_ls(home, "container") if engine == "containerd" else [],
        }
        assert not any(left.values()), {what: names for what, names in left.items() if names}  # says what is left
        return True

    await eventually(nothing_left, 60, what="no container, task, bundle or cgroup left")
    assert ROOT.exists()
    if engine == "containerd":
        stack.procs["ctr"].stop()
        assert not (home / "containerd" / "containerd.pid").exists()
        assert not running(daemon), "the worker's containerd stopped with it"
        assert str(stack.base) not in Path("/proc/self/mounts").read_text(), "no mount left"
