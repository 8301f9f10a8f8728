"""No session takeover: a refused CONNECT changes nothing, on the embedded broker and on mosquitto.

Tried as an attacker would, with mosquitto_sub: every client id the tiers use (the root, the cluster's
bridge at the root, the cluster orchestrator, its bridge side and a worker at the cluster broker), first
with no valid login, then with a wrong password for a real identity, then with another valid identity.
Every CONNECT is refused, and afterwards the stack serves as before: requests are answered, a new
service reaches RUNNING, no worker was declared offline and no instance moved. Then a worker displaced
by its own login (stolen credentials) is back within seconds.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack, dumps, either_broker, eventually, fleet, sla, sleeper
from tests.test_mosquitto import two_workers_running
from tests.test_three_tiers import _online_nodes, running, state

MOSQUITTO = ("--broker", "mosquitto")


@pytest.fixture(params=["embedded", "mosquitto"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """A stack on either broker."""
    yield from either_broker(request.param, tmp_path)


def _login(path: Path) -> tuple[str, str]:
    saved = json.loads(path.read_text())
    return saved["username"], saved["password"]


def _connect(port: int, client_id: str, login: tuple[str, str] | Path, ca: Path) -> int:
    """mosquitto_sub's exit code for one CONNECT over TLS with *client_id* and *login*, a username and
    password or the data dir of a machine (its certificate), verifying the server by *ca* (0: let in)."""
    if isinstance(login, Path):
        who = ["--cert", str(login / "tls" / "cert.pem"), "--key", str(login / "tls" / "key.pem")]
    else:
        who = ["-u", login[0], "-P", login[1]]
    args = ["mosquitto_sub", "-V", "mqttv311", "-h", "127.0.0.1", "-p", str(port), "--cafile", str(ca),
            "-i", client_id, *who, "-t", "oak/x", "-W", "1"]
    done = subprocess.run(args, capture_output=True, timeout=10)
    return 0 if done.returncode in (0, 27) else done.returncode  # 27: -W timed out, so it was connected


def _cert_port(stack: Stack, machine: str, port: int) -> int:
    """Where *machine* logs in with its certificate (mosquitto has a listener of its own for that)."""
    return int(json.loads((stack.base / machine / "identity.json").read_text()).get("port", port))


def _placement(service: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted((i["node"], i["status"]) for i in service["instances"])


@pytest.mark.timeout(180)
async def test_refused_connects_change_nothing(stack: Stack, api: Any) -> None:
    """Every component's client id, with no login, a wrong password and another valid identity."""
    admin = await two_workers_running(stack, api, "tk", 6051)
    before = _placement(await state(admin, "tk.test.job.test"))

    root, cluster = stack.root_port, stack.cluster_ports["c1"]
    ca = stack.base / "root" / "ca" / "ca.pem"
    admin_login = _login(stack.base / "root" / "credentials.json")
    attempts: list[tuple[int, str, tuple[str, str] | Path]] = [
        *((root, cid, login) for cid in ("root", "cluster.c1", "admin")
          for login in [("nobody", "wrong"), ("admin", "wrong"), ("cluster.c1", "wrong")]),
        *((root, cid, admin_login) for cid in ("root", "cluster.c1")),
        *((cluster, cid, login) for cid in ("cluster", "bridge", "node.w1")
          for login in [("nobody", "wrong"), ("node.w1", "wrong"), admin_login]),
    ]
    let_in = [(port, cid, str(login)) for port, cid, login in attempts if _connect(port, cid, login, ca) == 0]
    assert not let_in, f"admitted with a client id not their own: {let_in}"

    assert _placement(await state(admin, "tk.test.job.test")) == before, "an instance moved"
    assert await _online_nodes(admin, 2), "a worker was declared offline"
    await admin.request("apps", "create", raw=dumps(sla(sleeper("late", 6052), app="tk2")))
    await admin.request("services", "deploy", {"service": "tk2.test.late.test", "replicas": 2})
    await running(admin, "tk2.test.late.test", 2, timeout=30)
    # w2's own certificate, asking for w1's client id: refused (embedded), or given its own id (mosquitto's
    # certificate listener sets client id = username, so w2 displaces only itself); w1 keeps its session.
    w2 = _cert_port(stack, "w2", cluster)
    admitted = _connect(w2, "node.w1", stack.base / "w2", ca) == 0
    assert admitted is (w2 != cluster), "w2's certificate with w1's client id"
    log = (stack.base / "w1.log").read_text()
    assert "lost the broker" not in log, f"w1 was displaced:\n{stack.logs()}"


@pytest.mark.timeout(120)
async def test_worker_displaced_by_its_own_login_comes_back(stack: Stack, api: Any) -> None:
    """Stolen credentials can displace a worker (its own client id), but it reconnects, says so, and
    keeps its instances and its place."""
    admin = await fleet(stack, api, {"c1": ("w1",)})
    await admin.request("apps", "create", raw=dumps(sla(sleeper("job", 6053), app="dp")))
    await admin.request("services", "deploy", {"service": "dp.test.job.test", "replicas": 1})
    await running(admin, "dp.test.job.test", 1)

    port = _cert_port(stack, "w1", stack.cluster_ports["c1"])
    assert _connect(port, "node.w1", stack.base / "w1", stack.base / "root" / "ca" / "ca.pem") == 0
    await eventually(lambda: "reconnected" in (stack.base / "w1.log").read_text(), timeout=15,
                     what="w1 reconnected")
    await admin.request("services", "scale", {"service": "dp.test.job.test", "replicas": 2})
    after = await running(admin, "dp.test.job.test", 2, timeout=30)
    assert {i["node"] for i in after["instances"]} == {"w1"}
