"""VMs through the whole stack: a worker on a pretend host with the overlay and ``--unikernel`` boots a Debian
kernel with the test's busybox initramfs, serves TCP on its service IP, shows its console in ``oak service
logs``, completes a one_shot power-off, and leaves no QEMU process or tap behind when undeployed."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from services.cli.client import ApiFailure
from tests import vmimages
from tests.conftest import Stack, dumps, eventually, sla, sleeper
from tests.netlab import Lab, namespaces, need_network_lab, sh
from tests.stack import REPO, oak

APP = "vms"
WEB, ONCE, CLIENT = f"{APP}.test.web.test", f"{APP}.test.once.test", f"{APP}.test.client.test"


@pytest.fixture
def lab() -> Iterator[Lab]:
    """One pretend host for the worker, removed at the end."""
    need_network_lab()
    lab = Lab()
    try:
        lab.host("h1")
        yield lab
    finally:
        lab.remove()


def vm(name: str, code: Path, cmd: list[str], **extra: Any) -> dict[str, Any]:
    """A unikernel service booting *code* with kernel command line *cmd* (the test machine has 2 vCPUs)."""
    return {"microservice_name": name, "virtualization": "unikernel", "code": str(code), "cmd": ["quiet", *cmd],
            "memory": 128, "vcpus": 1, **extra}


async def _healthy(client: Any) -> dict[str, Any] | None:
    state = await inspect(client, WEB)
    return state if state["instances"] and state["instances"][0]["health"] == "healthy" else None


def qemus(iid: str = "") -> set[int]:
    """PIDs of the QEMU processes running Oakling instances (only instance *iid*'s, when given)."""
    out = set()
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if (proc.info["name"] or "").startswith("qemu-system") and any(a.startswith(f"oak-{iid}") for a in cmdline):
            out.add(proc.pid)
    return out


async def inspect(client: Any, job: str) -> dict[str, Any]:
    return dict(await client.request("services", "inspect", {"service": job}))


@pytest.mark.timeout(240)
async def test_a_vm_service_end_to_end(stack: Stack, api: Any, lab: Lab, tmp_path: Path) -> None:
    """RUNNING on a worker advertising unikernel (and its acceleration), reachable by service IP from another
    instance (and healthy by an http check), console in the logs, one_shot power-off COMPLETED, undeploy leaves
    no QEMU, tap or namespace."""
    images = vmimages.prepare(tmp_path / "images")
    before_qemus = qemus()
    stack.root()
    stack.cluster("c1")
    stack.worker("w1", "c1", "--unikernel", "--overlay", "--host-netns", lab.hosts["h1"], "--stop-grace", "1")
    client = await api()

    async def advertised() -> dict[str, Any] | None:
        nodes = await client.request("nodes", "list")
        return nodes[0] if nodes and nodes[0]["online"] else None

    node = await eventually(advertised, 30, what="the worker online")
    assert {"process", "unikernel", "microvm"} <= set(node["runtimes"])
    assert any(label.startswith("vm.accel=") for label in node["labels"]), node

    # From the worker's side of the overlay; http, not tcp: the default route's proxy on some machines accepts
    # any TCP connection, but answers no /ready with a 200.
    check = {"type": "http", "port": 8080, "path": "/ready", "interval": 1, "start_period": 300}
    doc = sla(vm("web", images.bundle, ["oak.serve=80", "oak.http=8080", "oak.say=web-console-up"], health=check),
              vm("once", images.bundle, ["oak.say=once-done", "oak.then=poweroff"], one_shot=True, vcpus=0.5),
              sleeper("client", 3600), app=APP)
    await client.request("apps", "create", raw=dumps(doc))
    for job in (WEB, ONCE, CLIENT):
        await client.request("services", "deploy", {"service": job, "replicas": 1})

    async def running(job: str) -> dict[str, Any] | None:
        s = await inspect(client, job)
        ok = s["instances"] and all(i["status"] == "RUNNING" and i["ip"] for i in s["instances"])
        return s if ok else None

    web = await eventually(lambda: running(WEB), 60, what="the VM RUNNING with an IP")
    caller = (await eventually(lambda: running(CLIENT), 60, what="the client RUNNING"))["instances"][0]
    vm_iid = web["instances"][0]["iid"]
    assert web["instances"][0]["node"] == "w1"

    async def completed() -> bool:
        return (await inspect(client, ONCE))["status"] == "COMPLETED"

    await eventually(completed, 150, interval=0.5, what="the one_shot VM COMPLETED after powering off")

    async def serves() -> bool:
        done = sh("ip", "netns", "exec", f"oak-{caller['iid']}", "busybox", "nc", "-w", "3", web["rr_ip"], "80",
                  check=False)
        return done.stdout.strip() == "hello from the vm"

    await eventually(serves, 120, interval=1, what="the VM answering on its service IP")
    healthy = await eventually(lambda: _healthy(client), 30, what="the VM's http check passing")
    assert healthy["instances"][0]["reason"] == ""

    # kill -9 of the worker's PID alone, a restart 2 s later: the same QEMU runs on, adopted (issue 21)
    vm_qemus = qemus(vm_iid)  # its own: other tests' VMs may come and go meanwhile
    assert len(vm_qemus) == 1
    stack.procs["w1"].kill9()
    await asyncio.sleep(2)
    assert qemus(vm_iid) == vm_qemus, "the VM died with its worker"
    stack.procs["w1"].start()
    await eventually(lambda: "adopted" in stack.procs["w1"].log.read_text(), 30, what="adopted")
    again = await eventually(lambda: running(WEB), 30, what="the VM RUNNING again")
    assert [(i["iid"], i["restarts"]) for i in again["instances"]] == [(vm_iid, web["instances"][0]["restarts"])]
    assert qemus(vm_iid) == vm_qemus, "the same QEMU, not a new one"
    await eventually(serves, 30, interval=1, what="the adopted VM still answering")

    done = subprocess.run(oak("service", "logs", WEB, "0", "-n", "50", "--data-dir", str(stack.base / "root")),
                          capture_output=True, text=True, cwd=REPO, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "web-console-up" in done.stdout, done.stdout
    assert "oak-serving 80" in done.stdout, done.stdout

    ours = {f"oak-{i['iid']}" for job in (WEB, ONCE, CLIENT) for i in (await inspect(client, job))["instances"]}
    await client.request("apps", "delete", {"app": APP})

    def nothing_left() -> bool:
        left = qemus() - before_qemus
        assert not left, f"QEMU still running: {left}"
        assert f"oak-{vm_iid}" not in namespaces(), "the VM's namespace (and its tap) is gone"
        return True

    await eventually(nothing_left, 30, interval=0.5, what="no QEMU left")
    stack.procs["w1"].stop()
    assert not ours & namespaces(), "no instance namespace is left"  # only ours: other tests run alongside


@pytest.mark.timeout(240)
async def test_a_vms_secret_reaches_its_initramfs_and_nowhere_else(stack: Stack, api: Any, tmp_path: Path) -> None:
    """A secret given as a file is in the guest before its /init runs (root's, mode 0400, the bytes set); its
    value is in no QEMU command line, no file the tiers wrote outside the instance's tmpfs, and no log; the
    tmpfs goes with the instance. A secret as a variable is refused for a VM, saying why."""
    images = vmimages.prepare(tmp_path / "images")
    value = b"vm-s3cret\nsecond line \x00\xff"
    stack.root()
    stack.cluster("c1")
    stack.worker("w1", "c1", "--unikernel", "--stop-grace", "1")
    client = await api()
    await eventually(lambda: _online(client), 30, what="the worker online")
    await client.request("secrets", "set", {"name": "api-key", "value_b64": base64.b64encode(value).decode()})
    with pytest.raises(ApiFailure, match="has no environment the worker could set") as refused:
        await client.request("apps", "create", raw=dumps(sla(vm("bad", images.bundle, [], secrets=[
            {"name": "api-key", "env": "API_KEY"}]), app="vmsecbad")))
    assert ".secrets[0].env" in str(refused.value)
    key = "/run/secrets/api.key"
    await client.request("apps", "create", raw=dumps(sla(vm("keyed", images.bundle, [f"oak.show={key}"], secrets=[
        {"name": "api-key", "file": key}]), app="vmsec")))
    job = "vmsec.test.keyed.test"
    await client.request("services", "deploy", {"service": job})

    async def console() -> str:
        rows = (await inspect(client, job))["instances"]
        log = stack.base / "w1" / "logs" / f"{rows[0]['iid']}.log" if rows else None
        return log.read_text(errors="replace") if log and log.exists() else ""

    shown = await eventually(lambda: _line(console, "oak-file"), 150, interval=0.5, what="the guest showing its file")
    assert shown == f"oak-file {key} {hashlib.sha256(value).hexdigest()} 400 0"
    iid = (await inspect(client, job))["instances"][0]["iid"]
    (qemu,) = qemus(iid)
    leaks = [value.split(b"\n")[0], base64.b64encode(value)[:16]]
    assert not any(leak in " ".join(psutil.Process(qemu).cmdline()).encode() for leak in leaks)
    tmpfs = stack.base / "w1" / "secrets"
    files = [p for p in stack.base.rglob("*") if p.is_file() and not p.is_symlink() and tmpfs not in p.parents]
    assert not [str(p) for p in files if any(leak in p.read_bytes() for leak in leaks)], "a secret on disk"
    if os.geteuid() == 0:
        assert os.path.ismount(tmpfs / iid), "the instance's secrets (its initramfs too) are on a tmpfs"
    await client.request("apps", "delete", {"app": "vmsec"})
    await eventually(lambda: not qemus(iid) and not (tmpfs / iid).exists(), 30, what="the VM and its tmpfs gone")


async def _online(client: Any) -> bool:
    return any(n["online"] for n in await client.request("nodes", "list"))


async def _line(text: Any, start: str) -> str:
    """The first line of ``await text()`` that starts with *start* ("" while there is none)."""
    return next((line.strip() for line in (await text()).splitlines() if line.startswith(start)), "")


@pytest.mark.timeout(300)
async def test_a_vms_volume_keeps_its_data(stack: Stack, api: Any, tmp_path: Path) -> None:
    """A VM's volume is an ext4 disk in the volume's directory, mounted by the guest where the SLA says: what
    the guest writes there survives an update (the new revision on the same worker) and a crash of QEMU;
    `oak volume list` shows it; deleting the application deletes it."""
    images = vmimages.prepare(tmp_path / "images")
    stack.root()
    stack.cluster("c1")
    stack.worker("w1", "c1", "--unikernel", "--stop-grace", "1")
    client = await api()
    await eventually(lambda: _online(client), 30, what="the worker online")
    keep = vm("keep", images.bundle, ["oak.count=/data/boots"], volumes=[{"name": "data", "path": "/data",
                                                                         "size_mb": 64}],
              update={"max_parallel": 1, "min_healthy_time": 0})
    await client.request("apps", "create", raw=dumps(sla(keep, app="vmvol")))
    job = "vmvol.test.keep.test"
    await client.request("services", "deploy", {"service": job})

    async def boots(n: int) -> str:
        rows = [r for r in (await inspect(client, job))["instances"] if r["status"] == "RUNNING"]
        logs = [stack.base / "w1" / "logs" / f"{r['iid']}.log" for r in rows]
        return next((r["iid"] for r, log in zip(rows, logs, strict=True)
                     if log.exists() and f"oak-boots {n}\n" in log.read_text(errors="replace")), "")

    first = await eventually(lambda: boots(1), 120, interval=0.5, what="the first boot counted on the volume")
    disk = stack.base / "w1" / "volumes" / "admin" / job / "data" / "disk.img"
    assert disk.stat().st_size == 64 << 20
    await client.request("services", "update", {"service": job, "microservice": {"cmd": [
        "quiet", "oak.count=/data/boots", "oak.say=revision-2"]}})
    second = await eventually(lambda: boots(2), 120, interval=0.5, what="the new revision counting on the same disk")
    assert second != first
    (qemu,) = qemus(second)
    psutil.Process(qemu).kill()
    await eventually(lambda: boots(3), 120, interval=0.5, what="the VM started again after QEMU's crash, same disk")
    listing = subprocess.run(oak("volume", "list", "--json", "--data-dir", str(stack.base / "root")),
                             capture_output=True, text=True, cwd=REPO, timeout=30)
    assert listing.returncode == 0, listing.stderr
    rows = [(v["service"], v["volume"], v["node"], v["bytes"]) for v in json.loads(listing.stdout)]
    assert rows == [(job, "data", "w1", 64 << 20)]  # the disk's size
    await client.request("apps", "delete", {"app": "vmvol"})
    await eventually(lambda: not disk.parent.exists(), 60, what="the volume deleted with its application")
