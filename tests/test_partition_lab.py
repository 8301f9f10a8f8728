"""Network partitions, not only process faults: every tier runs in a pretend host (a network namespace
on the lab's LAN, tests/netlab.py), and a host's link is cut by dropping its packets with nftables in
its own namespace (no reset, nothing closed), then restored.

h0: the root and cluster c1; h1: worker w1; h2: worker w2 (both of c1); h3: cluster c2 and its worker w3.
A web service (one replica per worker, ``stop_after: 1, lost_after: 4``) and a database pinned to w1
(``replace: false``).

* w1 cut off: it is found gone within seconds; it stops its web replica by itself; the replica runs
  on another worker and the service IP answers from every replica that runs; the database is LOST
  and never runs twice. Healed: one copy of everything.
* c2 (with w3) cut off from the root: the root finds it gone, c2 takes its web replica out of w3's
  map, the root runs it in c1; healed, one copy of everything.

Copies are counted in the process table.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import Stack, dumps, eventually, sla, sleeper
from tests.netlab import Lab, in_netns, need_network_lab, sh
from tests.stack import Proc, free_port, oak
from tests.test_overlay_e2e import ASK, SERVER, SPREAD
from tests.test_three_tiers import sleeps

WEB, DB = "cut.test.web.test", "cut.test.db.test"


@pytest.fixture
def lab(stack: Stack) -> Iterator[Lab]:
    """Four pretend hosts on one LAN, removed at the end after every process of the stack stopped."""
    need_network_lab()
    lab = Lab()
    try:
        for name in ("h0", "h1", "h2", "h3"):
            lab.host(name)
        yield lab
    finally:
        for host in lab.hosts:
            heal(lab, host)  # a cut host's processes could not say goodbye
        stack.stop()
        lab.remove()


def start(stack: Stack, lab: Lab, name: str, host: str, *args: str) -> None:
    """Run ``oak ARGS`` as process *name* in *host*'s network namespace (entered with nsenter, which, unlike
    ``ip netns exec``, leaves the cgroup mounts in sight)."""
    argv = ["nsenter", f"--net=/run/netns/{lab.hosts[host]}", *oak(*args)]
    stack.procs[name] = Proc(name, argv, stack.base, stack.env).start()


def cut(lab: Lab, host: str) -> None:
    """Drop every packet in and out of *host*'s LAN link, silently."""
    sh("ip", "netns", "exec", lab.hosts[host], "nft", "-f", "-", stdin="""table inet oakcut {
  chain in { type filter hook input priority -300; policy accept; iifname "eth0" drop; }
  chain out { type filter hook output priority -300; policy accept; oifname "eth0" drop; }
}
""")


def heal(lab: Lab, host: str) -> None:
    """Let *host*'s packets through again."""
    sh("ip", "netns", "exec", lab.hosts[host], "nft", "delete", "table", "inet", "oakcut", check=False)


def cli(stack: Stack, lab: Lab, *args: str) -> Any:
    """``oak ARGS --json`` as the admin, from h0 (where the root listens)."""
    done = sh(*in_netns(lab.hosts["h0"], oak(*args, "--json", "--data-dir", str(stack.base / "root"))), timeout=60)
    return json.loads(done.stdout)


def servers(base: Path, script: Path) -> list[str]:
    """The worker of every running web server process (its working directory is under the worker's)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd", "status"]):
        if proc.info["cmdline"] == [sys.executable, str(script)] and proc.info["status"] != psutil.STATUS_ZOMBIE:
            cwd = str(proc.info["cwd"] or "")
            if cwd.startswith(str(base)):
                found.append(cwd[len(str(base)) + 1:].split("/")[0])
    return sorted(found)


def ask(lab: Lab, host: str, ip: str, count: int) -> list[str]:
    """Answers to *count* HTTP requests to *ip* made from *host*."""
    return sh(*in_netns(lab.hosts[host], [sys.executable, "-c", ASK, "tcp", ip, "80", str(count)]),
              timeout=60).stdout.split()


@pytest.mark.timeout(420)
async def test_partitions_keep_one_copy_and_the_overlay_routing(stack: Stack, lab: Lab, tmp_path: Path) -> None:
    profile = tmp_path / "spread.toml"
    profile.write_text(SPREAD)
    h0 = lab.addresses["h0"]
    root_port, c1_port, c2_port = free_port(), free_port(), free_port()
    start(stack, lab, "root", "h0", "root", "--data-dir", str(stack.base / "root"), "--host", "0.0.0.0",
          "--port", str(root_port), f"--join-token={stack.token}", "--scheduler-profile", str(profile))
    await eventually(lambda: (stack.base / "root" / "ca" / "ca.pem").exists(), 30, what="the root's CA")
    stack.root_port = root_port
    pin = stack.pin()
    common = [f"--join-token={stack.token}", *pin]
    start(stack, lab, "c1", "h0", "cluster", "--name", "c1", "--data-dir", str(stack.base / "c1"), "--host", "0.0.0.0",
          "--port", str(c1_port), "--root", f"mqtts://127.0.0.1:{root_port}", f"--root-join-token={stack.token}",
          "--scheduler-profile", str(profile), *common)
    start(stack, lab, "c2", "h3", "cluster", "--name", "c2", "--data-dir", str(stack.base / "c2"), "--host", "0.0.0.0",
          "--port", str(c2_port), "--root", f"mqtts://{h0}:{root_port}", f"--root-join-token={stack.token}",
          "--scheduler-profile", str(profile), *common)
    for name, host, cluster in (("w1", "h1", f"{h0}:{c1_port}"), ("w2", "h2", f"{h0}:{c1_port}"),
                                ("w3", "h3", f"127.0.0.1:{c2_port}")):
        start(stack, lab, name, host, "worker", "--name", name, "--data-dir", str(stack.base / name),
              "--cluster", f"mqtts://{cluster}", "--overlay", "--public-address", lab.addresses[host],
              "--stop-grace", "1", *common)
    await eventually(lambda: len([n for n in cli(stack, lab, "node", "list") if n["state"] == "online"]) == 3, 60,
                     interval=1, what="three workers online")

    script = tmp_path / "server.py"
    script.write_text(SERVER)
    web = {"microservice_name": "web", "cmd": [sys.executable, str(script)], "port": "8080:80",
           "disconnect": {"stop_after": 1, "lost_after": 4}}
    db = sleeper("db", 7501, disconnect={"replace": False}, constraints=[{"type": "direct", "node": "w1"}])
    app = tmp_path / "app.json"
    app.write_bytes(dumps(sla(web, db, app="cut")))
    cli(stack, lab, "app", "create", str(app))
    cli(stack, lab, "service", "deploy", WEB, "--replicas", "3")
    cli(stack, lab, "service", "deploy", DB)

    def instances(job: str) -> list[dict[str, Any]]:
        return list(cli(stack, lab, "service", "inspect", job)["instances"])

    def running(job: str, count: int) -> list[dict[str, Any]] | None:
        rows = instances(job)
        return rows if len(rows) == count and all(i["status"] == "RUNNING" for i in rows) else None

    placed = await eventually(lambda: running(WEB, 3), 90, interval=1, what="web x3 RUNNING")
    assert sorted(i["node"] for i in placed) == ["w1", "w2", "w3"], "one replica per worker"
    await eventually(lambda: running(DB, 1), 30, interval=1, what="db RUNNING")
    rr = cli(stack, lab, "service", "inspect", WEB)["rr_ip"]
    every = {f"instance-{i}" for i in range(3)}
    await eventually(lambda: set(ask(lab, "h2", rr, 9)) == every, 30, interval=1, what="the service IP reaches all")

    # ---- a worker's link drops --------------------------------------------------------------------------
    cut(lab, "h1")
    await eventually(lambda: "w1" not in servers(stack.base, script), 15, interval=0.5,
                     what="w1 fenced its web replica by itself")
    moved = await eventually(lambda: _none_on(running(WEB, 3), "w1"), 30, interval=1, what="web x3 without w1")
    assert "w1" not in {i["node"] for i in moved}
    lost = instances(DB)[0]
    assert (lost["status"], lost["node"]) == ("LOST", "w1"), lost
    w1 = {n["name"]: n for n in cli(stack, lab, "node", "list")}["w1"]
    assert w1["state"] == "LOST", w1
    await eventually(lambda: set(ask(lab, "h2", rr, 9)) == every, 30, interval=1,
                     what="the service IP answers from every replica that runs")
    assert len(servers(stack.base, script)) == 3
    heal(lab, "h1")
    await eventually(lambda: running(DB, 1), 60, interval=1, what="db RUNNING again once w1 is back")
    assert len(sleeps("7501", stack.base)) == 1, "db never ran twice"
    await eventually(lambda: len(servers(stack.base, script)) == 3, 30, interval=1, what="three web servers")

    # ---- a cluster's uplink drops ---------------------------------------------------------------------
    on_w3 = "w3" in servers(stack.base, script)
    cut(lab, "h3")
    await eventually(lambda: {c["name"]: c["state"] for c in cli(stack, lab, "cluster", "list")}["c2"] == "LOST", 20,
                     interval=1, what="c2 found gone by the root")
    if on_w3:
        await eventually(lambda: "w3" not in servers(stack.base, script), 15, interval=0.5,
                         what="c2 fenced its web replica")
    await eventually(lambda: _none_on(running(WEB, 3), "w3"), 30, interval=1, what="web x3 in c1")
    heal(lab, "h3")
    await eventually(lambda: {c["name"]: c["state"] for c in cli(stack, lab, "cluster", "list")}["c2"] == "online",
                     60, interval=1, what="c2 back")
    await eventually(lambda: len(servers(stack.base, script)) == 3, 30, interval=1, what="three web servers")
    assert running(WEB, 3)
    assert len(sleeps("7501", stack.base)) == 1


def _none_on(rows: list[dict[str, Any]] | None, node: str) -> list[dict[str, Any]] | None:
    return rows if rows and all(i["node"] != node for i in rows) else None
