"""Health checks: the verdict over tries, and the worker checking real processes over tcp, http and exec
(liveness restarts the instance, readiness is in its status)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from plugins.runtimes.process import ProcessRuntime
from services.common import models
from services.common.models import HEALTHY, STARTING, UNHEALTHY, InstanceSpec, InstanceStatus
from services.common.sla import HealthCheck, ServiceSpec
from services.common.store import Store
from services.worker import engine as engine_module
from services.worker.engine import Engine
from services.worker.health import Health
from tests.conftest import Stack, dumps, eventually, online_nodes, sla, sleeper

pytestmark = pytest.mark.timeout(60)

WEB = """
import http.server, os, sys
class Web(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/healthz" and os.path.exists(sys.argv[2]) else 503)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Web).serve_forever()
"""


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Restart after 0.1 s instead of 1 s."""
    monkeypatch.setattr(engine_module, "BACKOFF_FIRST", 0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def checked(cmd: list[str], check: HealthCheck) -> InstanceSpec:
    service = ServiceSpec(app_name="a", app_namespace="n", name="s", namespace="n", virtualization="process",
                          code="", cmd=tuple(cmd), health=check)
    return InstanceSpec("i1", "admin", service.job_name, 0, service)


def make(tmp_path: Path) -> Engine:
    return Engine("w1", {"process": ProcessRuntime(data_dir=str(tmp_path))}, Store(tmp_path / "w.json"), tmp_path,
                  stop_grace=1)


def status(engine: Engine) -> InstanceStatus:
    return engine.statuses()["i1"]


def test_verdict_over_tries() -> None:
    """Starting until a pass; failures in the start period do not count; ``failures`` in a row make it
    unhealthy, and a pass in between starts the count again."""
    check = HealthCheck("tcp", port=80, failures=2, start_period=10)
    first = Health().after(check, "refused", running_for=1)
    assert (first.state, first.failed) == (STARTING, 0)
    assert Health().after(check, "", running_for=1).state == HEALTHY
    late = Health().after(check, "refused", running_for=11)
    assert (late.state, late.failed) == (STARTING, 1)
    assert late.after(check, "refused", 12).state == UNHEALTHY
    assert first.describe(check) == "health check failed (in its start period, not counted): refused"
    healthy = Health(HEALTHY)
    once = healthy.after(check, "refused", 20)
    assert (once.state, once.describe(check)) == (HEALTHY, "health check failed (1 of 2): refused")
    assert once.after(check, "", 21) == Health(HEALTHY)
    twice = once.after(check, "refused", 21)
    assert (twice.state, twice.describe(check)) == (UNHEALTHY, "unhealthy: refused (2 failed checks in a row)")


async def test_http_check_readiness_then_liveness(tmp_path: Path) -> None:
    """An http check: starting while the server answers 503 (in its start period), healthy once it answers
    200, and restarted when it fails ``failures`` times in a row."""
    port, ready = free_port(), tmp_path / "ready"
    check = HealthCheck("http", port=port, path="/healthz", interval=0.2, failures=2, start_period=60)
    eng = make(tmp_path)
    await eng.apply({"i1": checked([sys.executable, "-c", WEB, str(port), str(ready)], check)})
    await eventually(lambda: "answered 503" in status(eng).reason, what="a failed check shown")
    assert (status(eng).status, status(eng).health) == (models.RUNNING, STARTING)
    assert not status(eng).serves
    ready.touch()
    await eventually(lambda: status(eng).health == HEALTHY, what="healthy")
    assert status(eng).reason == ""
    ready.unlink()
    await eventually(lambda: status(eng).restarts == 1, what="restarted once unhealthy")
    ended = [s for s in (status(eng),) if s.status == models.DEAD]
    assert not ended or "unhealthy: GET /healthz answered 503" in ended[0].reason
    await eventually(lambda: status(eng).status == models.RUNNING and status(eng).health == STARTING,
                     what="running again, starting")
    await eng.apply({})
    await eng.close()


async def test_tcp_check_nobody_listening_restarts(tmp_path: Path) -> None:
    """A tcp check on a port nobody listens on: unhealthy after two tries, stopped and started again, with
    the reason saying why."""
    port = free_port()
    eng = make(tmp_path)
    await eng.apply({"i1": checked(["sleep", "600"], HealthCheck("tcp", port=port, interval=0.2, failures=2))})
    seen: list[InstanceStatus] = []

    def dead() -> bool:
        seen.append(status(eng))
        return status(eng).status == models.DEAD

    await eventually(dead, interval=0.02, what="stopped as unhealthy")
    reason = status(eng).reason
    assert reason.startswith(f"unhealthy: 127.0.0.1:{port}: Connection refused (2 failed checks in a row)"), reason
    assert reason.endswith("stopped to start again")
    assert any(s.health == UNHEALTHY for s in seen) or status(eng).restarts == 0
    await eventually(lambda: status(eng).restarts >= 1 and status(eng).status == models.RUNNING, what="started again")
    await eng.apply({})
    await eng.close()


async def test_exec_check_runs_inside_the_instance(tmp_path: Path) -> None:
    """An exec check runs its command inside the instance (its PID namespace, when sandboxed): healthy once
    it exits 0; its failures say how the command ended."""
    mark = tmp_path / "mark"
    inside = f"test -f {mark} && grep -q oak-init /proc/1/cmdline" if ProcessRuntime(str(tmp_path)).sandboxed \
        else f"test -f {mark}"
    check = HealthCheck("exec", cmd=("sh", "-c", inside), interval=0.2, failures=1000)
    eng = make(tmp_path)
    await eng.apply({"i1": checked(["sleep", "600"], check)})
    await eventually(lambda: "sh exited with code 1" in status(eng).reason, what="the failing command's end shown")
    mark.touch()
    await eventually(lambda: status(eng).health == HEALTHY, what="healthy")
    await eng.apply({})
    await eng.close()


async def test_liveness_through_the_tiers(stack: Stack, api: Any) -> None:
    """Through real brokers: an instance whose tcp check keeps failing is restarted by its worker, and its
    row in the service's state says why and counts the restarts; a service without a check has no health."""
    stack.root()
    stack.cluster("c1")
    stack.worker("w1", "c1", "--stop-grace", "1")
    client = await api()
    await eventually(lambda: online_nodes(client, 1), 30, what="w1 online")
    port = free_port()
    check = {"type": "tcp", "port": port, "interval": 0.3, "failures": 2}
    await client.request("apps", "create", raw=dumps(sla(sleeper("deaf", health=check), sleeper("plain"), app="live")))
    await client.request("services", "deploy", {"service": "live.test.deaf.test", "replicas": 1})
    await client.request("services", "deploy", {"service": "live.test.plain.test", "replicas": 1})

    async def restarted() -> dict[str, Any] | None:
        (row,) = (await client.request("services", "inspect", {"service": "live.test.deaf.test"}))["instances"]
        return row if row["restarts"] >= 1 and f"127.0.0.1:{port}: Connection refused" in row["reason"] else None

    row = await eventually(restarted, 30, what="restarted, saying why")
    assert row["health"] in (STARTING, UNHEALTHY, "")  # "" while DEAD between two runs
    (plain,) = (await client.request("services", "inspect", {"service": "live.test.plain.test"}))["instances"]
    assert (plain["status"], plain["health"], plain["restarts"]) == (models.RUNNING, "", 0)
    await client.request("apps", "delete", {"app": "live"})


class _Overlay:
    """A stand-in for the overlay (unit test): every instance gets a namespace and an IP; the worker's side
    of the overlay is the namespace ``host-ns``."""

    async def attach(self, iid: str, ports: str) -> Any:
        from services.worker.overlay import Attachment

        return Attachment(f"/run/netns/oak-{iid}", "10.18.0.9", "10.18.0.1", "host-ns")

    async def detach(self, iid: str) -> None:
        return None


@pytest.mark.parametrize(("virtualization", "where"), [("process", "/run/netns/oak-i1"), ("unikernel", "host-ns")])
async def test_where_a_check_connects_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, virtualization: str,
                                           where: str) -> None:
    """A tcp or http check connects to the instance's IP from inside its namespace, but a VM's from the
    worker's side of the overlay (a VM's namespace hands every frame to the guest: a connection made in
    it never reaches the guest)."""
    from plugins.runtimes.sim import SimRuntime

    targets: list[Any] = []

    async def recorded(check: HealthCheck, target: Any) -> str:
        targets.append(target)
        return ""

    monkeypatch.setattr(engine_module, "probe", recorded)
    runtime = SimRuntime()
    runtime.virtualizations = (virtualization,)
    service = ServiceSpec(app_name="a", app_namespace="n", name="s", namespace="n", virtualization=virtualization,
                          code="k", cmd=("sleep", "600"), health=HealthCheck("tcp", port=80, interval=0.2))
    eng = Engine("w1", {virtualization: runtime}, Store(tmp_path / "w.json"), tmp_path,
                 network=_Overlay(), drain=0)  # type: ignore[arg-type]
    await eng.apply({"i1": InstanceSpec("i1", "admin", service.job_name, 0, service)})
    await eventually(lambda: status(eng).health == HEALTHY, what="checked")
    assert (targets[0].ip, targets[0].netns) == ("10.18.0.9", where)
    await eng.apply({})
    await eng.close()
