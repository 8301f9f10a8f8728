"""Revocation: ``oak node revoke`` and ``oak cluster revoke`` disconnect the identity at once, refuse it from
then on, and move its instances; ``oak node list``/``oak cluster list`` show when certificates end.
On the embedded broker and on mosquitto (which refuses the certificate by its revocation list)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Stack,
    dumps,
    either_broker,
    eventually,
    fleet,
    machine_login,
    messages,
    sla,
    sleeper,
    subscribed,
    untimed,
)
from tests.test_cli_and_scripts import run_oak
from tests.test_three_tiers import _online_nodes, running, state

MOSQUITTO = ("--broker", "mosquitto")


@pytest.fixture(params=["embedded", "mosquitto"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """A stack on either broker."""
    yield from either_broker(request.param, tmp_path)


def _logs_in(stack: Stack, machine: str, port: int) -> bool:
    """Whether *machine*'s own certificate still logs it in at *port* (mosquitto_sub, as anyone could)."""
    done = subprocess.run(["mosquitto_sub", *machine_login(stack, machine, port), "-t", "oak/x", "-W", "1"],
                          capture_output=True, timeout=10)
    return done.returncode in (0, 27)  # 27: -W ran out, so it was connected


@pytest.mark.timeout(150)
async def test_a_revoked_worker_is_cut_off_and_its_instances_move(stack: Stack, api: Any) -> None:
    """w1 revoked: offline at once, its instance runs on w2, and its certificate is refused from then on."""
    admin = await fleet(stack, api, {"c1": ("w1", "w2")})
    home = stack.base / "root"
    listed = json.loads(run_oak(home, "node", "list", "--json").stdout)
    assert all(n["cert_expires"] > time.time() + 80 * 86400 for n in listed), "certificates last 90 days"
    assert "CERT EXPIRES" in run_oak(home, "node", "list").stdout
    await admin.request("apps", "create", raw=dumps(sla(sleeper("job", 6071), app="rv")))
    await admin.request("services", "deploy", {"service": "rv.test.job.test", "replicas": 2})
    await running(admin, "rv.test.job.test", 2)
    assert _logs_in(stack, "w1", stack.cluster_ports["c1"])

    assert "revoked node w1" in run_oak(home, "node", "revoke", "w1").stdout
    await eventually(lambda: _online_nodes(admin, 1), timeout=15, what="w1 offline")
    moved = await running(admin, "rv.test.job.test", 2, timeout=30)
    assert {i["node"] for i in moved["instances"]} == {"w2"}
    assert not _logs_in(stack, "w1", stack.cluster_ports["c1"]), "w1's certificate still logs it in"
    await eventually(lambda: "lost the broker" in (stack.base / "w1.log").read_text(), timeout=10, what="w1 cut off")
    missing = run_oak(home, "node", "revoke", "nobody", check=False)
    assert missing.returncode == 1
    assert "no worker 'nobody'" in missing.stderr


@pytest.mark.timeout(150)
async def test_a_revoked_cluster_is_cut_off_and_its_instances_move(stack: Stack, api: Any) -> None:
    """c1 revoked at the root: its instance runs on c2, and c1's certificate is refused from then on."""
    admin = await fleet(stack, api, {"c1": ("w1",), "c2": ("w2",)})
    home = stack.base / "root"
    clusters = json.loads(run_oak(home, "cluster", "list", "--json").stdout)
    assert all(c["cert_expires"] > time.time() + 80 * 86400 for c in clusters)
    await admin.request("apps", "create", raw=dumps(sla(sleeper("job", 6072), app="rc")))
    await admin.request("services", "deploy", {"service": "rc.test.job.test", "replicas": 1})
    victim = (await running(admin, "rc.test.job.test", 1))["instances"][0]["cluster"]
    other = "c2" if victim == "c1" else "c1"
    assert _logs_in(stack, victim, stack.root_port)

    assert f"revoked cluster {victim}" in run_oak(home, "cluster", "revoke", victim).stdout
    await eventually(lambda: _offline(admin, victim), timeout=15, what=f"{victim} offline")
    async def moved() -> bool:
        instances = (await state(admin, "rc.test.job.test"))["instances"]
        return [(i["cluster"], i["status"]) for i in instances] == [(other, "RUNNING")]

    await eventually(moved, timeout=30, what=f"the instance RUNNING on {other}")
    assert not _logs_in(stack, victim, stack.root_port), f"{victim}'s certificate still logs it in"


async def _offline(admin: Any, name: str) -> bool:
    return any(c["name"] == name and not c["online"] for c in await admin.request("clusters", "list"))



def _serial(path: Path) -> int:
    from broker.ca import load_certs

    return load_certs(path.read_bytes())[0].serial_number


RENEWAL_SETUPS = {"embedded": ((), ()), "mosquitto": (MOSQUITTO, MOSQUITTO),
                  "native-bridge": (MOSQUITTO, (*MOSQUITTO, "--mosquitto-bridge"))}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("setup", list(RENEWAL_SETUPS))
async def test_certificates_are_renewed_before_they_end_without_interrupting_anything(tmp_path: Path,
                                                                                     setup: str) -> None:
    """With certificates of 35 s, the cluster's and the worker's are renewed over MQTT when a third is left;
    the instance keeps running untouched, and after a restart of the cluster the worker logs in with its
    renewed certificate (the old one no longer would). With mosquitto's own bridge the cluster restarts its
    mosquitto to use the renewed certificate: its workers reconnect, and nothing moves."""
    from tests.conftest import connect

    root_args, cluster_args = RENEWAL_SETUPS[setup]
    if root_args and shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed (make test installs it when run as root)")
    short = ("--cert-days", "0.0004")
    stack = Stack(tmp_path, root_args=(*short, *root_args), cluster_args=(*short, *cluster_args))
    try:
        admin = await fleet(stack, lambda: connect(stack), {"c1": ("w1",)})
        await admin.request("apps", "create", raw=dumps(sla(sleeper("job", 6073), app="rn")))
        await admin.request("services", "deploy", {"service": "rn.test.job.test", "replicas": 1})
        before = (await running(admin, "rn.test.job.test", 1))["instances"][0]
        worker, cluster = stack.base / "w1" / "tls" / "cert.pem", stack.base / "c1" / "tls" / "cert.pem"
        first = {"w1": _serial(worker), "c1": _serial(cluster)}
        await eventually(lambda: _serial(worker) != first["w1"] and _serial(cluster) != first["c1"], timeout=45,
                         interval=0.5, what="both certificates renewed")
        if setup == "native-bridge":
            await eventually(lambda: "its bridge to the root uses the renewed" in (stack.base / "c1.log").read_text(),
                             timeout=10, what="the cluster's mosquitto restarted")
            await eventually(lambda: _online_nodes(admin, 1), timeout=30, what="w1 back after the restart")
            await asyncio.sleep(3)  # past the root's grace for a cluster that went away
        else:
            assert "lost the broker" not in (stack.base / "w1.log").read_text()
        after = (await running(admin, "rn.test.job.test", 1))["instances"][0]
        assert (after["iid"], after["restarts"], after["node"]) == (before["iid"], before["restarts"], "w1")
        assert "certificate renewed" in (stack.base / "w1.log").read_text()
        assert [c["online"] for c in await admin.request("clusters", "list")] == [True]

        stack.procs["c1"].stop()
        stack.procs["c1"].start()  # the worker reconnects, with its renewed certificate
        await eventually(lambda: "reconnected" in (stack.base / "w1.log").read_text(), timeout=30,
                         what="w1 back with its new certificate")
        await eventually(lambda: _online_nodes(admin, 1), timeout=30, what="w1 online again")
        await admin.__aexit__(None, None, None)
    finally:
        stack.stop()


@pytest.mark.timeout(120)
async def test_a_user_with_a_certificate_logs_in_without_a_password(stack: Stack, api: Any) -> None:
    """``oak user create bob --cert``: a subscription with bob's certificate and no password gets bob's
    answers, and only bob's."""
    admin = await fleet(stack, api, {})
    home = stack.base / "root"
    made = run_oak(home, "user", "create", "bob", "--password", "bob-password-1", "--cert", "--json")
    port = json.loads(made.stdout).get("port") or stack.root_port
    certs = home / "users" / "bob"
    assert (certs / "key.pem").stat().st_mode & 0o777 == 0o600
    tls = ["-V", "mqttv311", "-h", "127.0.0.1", "-p", str(port), "--cafile", str(certs / "ca.pem"), "--cert",
           str(certs / "cert.pem"), "--key", str(certs / "key.pem"), "-q", "1"]
    answer = subscribed(["mosquitto_sub", *tls, "-t", "oak/api/bob/response/apps/list", "-C", "1", "-W", "10"])
    # mosquitto's certificate listener names a client by its certificate: one session per user there, so the
    # request goes with bob's password, over TLS, beside the subscription made with bob's certificate.
    password = ["-V", "mqttv311", "-h", "127.0.0.1", "-p", str(stack.root_port), "--cafile", str(certs / "ca.pem"),
                "-u", "bob", "-P", "bob-password-1", "-q", "1"]
    subprocess.run(["mosquitto_pub", *password, "-t", "oak/api/bob/request/apps/list", "-m", "{}"], check=True,
                   timeout=10)
    assert [untimed(json.loads(line)) for line in messages(answer, 15)] == [{"ok": True, "data": []}]
    spy = subprocess.run(["mosquitto_sub", *tls, "-t", "oak/api/admin/#", "-C", "1", "-W", "2"], capture_output=True,
                         text=True, timeout=10)
    assert spy.stdout == "", "bob's certificate reads the admin's API"
    assert [u["username"] for u in await admin.request("users", "list")] == ["admin", "bob"]


@pytest.mark.timeout(120)
async def test_a_worker_away_past_its_certificate_joins_again_with_a_token(tmp_path: Path) -> None:
    """A worker stopped until its certificate (10 s here) has ended joins again at its next start, with
    its token, and is the same worker to its cluster."""
    from tests.conftest import connect

    stack = Stack(tmp_path, cluster_args=("--cert-days", "0.000115"))
    try:
        admin = await fleet(stack, lambda: connect(stack), {"c1": ("w1",)})
        first = _serial(stack.base / "w1" / "tls" / "cert.pem")
        stack.procs["w1"].stop()
        await eventually(lambda: _online_nodes(admin, 0), timeout=15, what="w1 offline")
        from broker.ca import load_certs

        end = load_certs((stack.base / "w1" / "tls" / "cert.pem").read_bytes())[0].not_valid_after_utc.timestamp()
        await asyncio.sleep(max(end - time.time() + 0.5, 0))
        stack.procs["w1"].start()
        await eventually(lambda: _online_nodes(admin, 1), timeout=30, what="w1 online again")
        assert _serial(stack.base / "w1" / "tls" / "cert.pem") != first
        assert "joining again, with a token" in (stack.base / "w1.log").read_text()
        await admin.__aexit__(None, None, None)
    finally:
        stack.stop()
