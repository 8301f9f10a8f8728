"""Every tier on mosquitto (Debian's, run by the root and clusters on ephemeral loopback ports).

The end-to-end tests of the embedded set-up run here unchanged against two mosquitto set-ups: with
Oakling's own root<->cluster bridge, and with mosquitto's native bridge. Then the topic rules are
checked on mosquitto itself with mosquitto_pub/mosquitto_sub, as a script would meet them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.mosquitto_files import acl_block, password_line, render_acl
from services.cli.client import OakClient
from tests.conftest import Stack, connect, dumps, eventually, sla, sleeper
from tests.test_privacy import test_tenants_see_only_their_own_and_files_are_private  # noqa: F401 - again here
from tests.test_three_tiers import (  # noqa: F401 - collected here again, on mosquitto
    _online_nodes,
    running,
    test_mdnc_cluster_killed_moves_instances_to_other_cluster,
    test_mdoc_deploy_scale_undeploy,
    test_root_killed_and_restarted_loses_nothing,
    test_users_cannot_see_or_touch_each_others_services,
    test_worker_killed_moves_its_instances,
)

MOSQUITTO = ("--broker", "mosquitto")
SETUPS = {"oak-bridge": (MOSQUITTO, MOSQUITTO), "native-bridge": (MOSQUITTO, (*MOSQUITTO, "--mosquitto-bridge"))}


def _need_mosquitto() -> None:
    for binary in ("mosquitto", "mosquitto_pub", "mosquitto_sub"):
        if shutil.which(binary) is None:
            print(f"SKIPPED: {binary} is not installed (apt-get install mosquitto mosquitto-clients)")
            pytest.skip(f"{binary} is not installed (Debian: apt-get install mosquitto mosquitto-clients; "
                        "make test installs them when run as root)")


@pytest.fixture(params=list(SETUPS))
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """A stack whose root and clusters run mosquitto (overrides conftest's embedded one)."""
    _need_mosquitto()
    root_args, cluster_args = SETUPS[request.param]
    s = Stack(tmp_path, root_args=root_args, cluster_args=cluster_args)
    try:
        yield s
    finally:
        s.stop()


# ---- the files, without a broker ------------------------------------------------------------------


def test_password_lines_are_mosquittos_pbkdf2_sha512() -> None:
    """``user:$7$iterations$salt$hash`` with a 12-byte salt (mosquitto refuses others); no ':' names."""
    user, rest = password_line("node.w1", "pw", 101).split(":")
    _, seven, iterations, salt, digest = rest.split("$")
    assert (user, seven, iterations, len(salt), len(digest)) == ("node.w1", "7", "101", 16, 88)
    with pytest.raises(ValueError, match="cannot hold"):
        password_line("node:w1", "pw", 101)


def test_acl_file_says_what_broker_acl_says() -> None:
    """Each identity publishes its own channels and reads its own subtree; newcomers only the join topics
    of their client id."""
    assert acl_block("alice") == ["user alice", "topic deny oak/join/#", "topic write oak/api/alice/request/+/+",
                                  "topic read oak/api/alice/#", "topic read oak/root/avail"]
    assert acl_block("node.w1")[2:] == [*(f"topic write oak/nodes/w1/up/{c}" for c in
                                          ("avail", "info", "state", "res/+", "csr", "secrets")),
                                        "topic read oak/nodes/w1/down/#", "topic read oak/cluster/avail"]
    assert acl_block("svc.root") == ["user svc.root", "topic readwrite #"]
    assert acl_block("node:w1") == acl_block("bad name") == []
    text = render_acl(["alice", "join.newcomer"])
    assert "pattern write oak/join/request/%c\npattern read oak/join/response/%c\n" in text
    assert "user join.newcomer" not in text


# ---- topic rules on a live mosquitto ---------------------------------------------------------------


def _login(path: Path) -> tuple[str, str]:
    saved = json.loads(path.read_text())
    return saved["username"], saved["password"]


Login = tuple[str, str] | Path  # a username and password, or a machine's data dir (its certificate)


def _mqtt(tool: str, port: int, login: Login, *args: str, ca: Path | None = None) -> list[str]:
    """A mosquitto client's command line; over TLS verifying the server by *ca* when given."""
    if isinstance(login, Path):
        who = ["--cert", str(login / "tls" / "cert.pem"), "--key", str(login / "tls" / "key.pem")]
    else:
        who = ["-u", login[0], "-P", login[1]]
    tls = ["--cafile", str(ca)] if ca else []
    return [tool, "-V", "mqttv311", "-h", "127.0.0.1", "-p", str(port), *tls, *who, *args]


def _read(port: int, login: Login, topic: str, seconds: int = 2, *extra: str, ca: Path | None = None) -> str:
    """What *login* receives on *topic* within *seconds* (retained messages included)."""
    done = subprocess.run(_mqtt("mosquitto_sub", port, login, "-t", topic, "-v", "-W", str(seconds), *extra, ca=ca),
                          capture_output=True, text=True, timeout=seconds + 10)
    return done.stdout


def _publish(port: int, login: Login, topic: str, payload: str, *extra: str, ca: Path | None = None) -> None:
    subprocess.run(_mqtt("mosquitto_pub", port, login, "-q", "1", "-t", topic, "-m", payload, *extra, ca=ca),
                   check=True, timeout=10)


async def two_workers_running(stack: Stack, api: Any, app: str, port: int) -> OakClient:
    """Root, cluster c1, workers w1 and w2, and app *app*'s service ``job`` with one instance on each."""
    stack.root()
    stack.cluster("c1")
    stack.worker("w1", "c1")
    stack.worker("w2", "c1")
    admin: OakClient = await api()
    await eventually(lambda: _online_nodes(admin, 2), timeout=30, what="two workers online")
    await admin.request("apps", "create", raw=dumps(sla(sleeper("job", port), app=app)))
    await admin.request("services", "deploy", {"service": f"{app}.test.job.test", "replicas": 2})
    await running(admin, f"{app}.test.job.test", 2)
    return admin


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stack", ["oak-bridge"], indirect=True)
async def test_topic_rules_hold_on_mosquitto(stack: Stack, api: Any) -> None:
    """A user reads and writes only its own API; a worker neither speaks for nor reads another worker;
    anonymous and wrong passwords are refused."""
    admin = await two_workers_running(stack, api, "acl", 6041)
    await admin.request("users", "create", {"username": "bob", "password": "bob-password-1"})
    root, cluster = stack.root_port, stack.cluster_ports["c1"]
    ca = stack.base / "root" / "ca" / "ca.pem"
    bob, admin_login = ("bob", "bob-password-1"), _login(stack.base / "root" / "credentials.json")

    assert "oak/api/admin/state/services/acl.test.job.test" in _read(root, admin_login, "oak/api/admin/state/#",
                                                                     ca=ca)
    assert _read(root, bob, "oak/api/admin/#", ca=ca) == "", "bob reads the admin's retained state"
    assert _read(root, bob, "oak/clusters/#", ca=ca) == ""
    _publish(root, bob, "oak/api/admin/request/apps/delete", '{"app": "acl"}', ca=ca)
    _publish(root, bob, "oak/clusters/c1/up/avail", '{"state":"offline"}', "-r", ca=ca)
    assert [a["name"] for a in await admin.request("apps", "list")] == ["acl"]
    assert [c["online"] for c in await admin.request("clusters", "list")] == [True]

    # w1's certificate logs in on mosquitto's certificate listener, the real w1 stopped meanwhile: the client
    # id is the certificate's name, so the two would displace each other (and mosquitto_sub, reconnecting
    # each time, would restart its -W timer and never end).
    w1, w1_port = stack.base / "w1", json.loads((stack.base / "w1" / "identity.json").read_text())["port"]
    stack.procs["w1"].stop()
    assert "oak/nodes/w1/down/desired" in _read(w1_port, w1, "oak/nodes/w1/down/#", ca=ca)
    assert _read(w1_port, w1, "oak/nodes/w2/down/#", ca=ca) == "", "w1 reads w2's desired instances"
    _publish(w1_port, w1, "oak/nodes/w2/up/avail", '{"state":"offline"}', "-r", ca=ca)
    _publish(w1_port, w1, "oak/join/request/x", '{"kind": "node", "name": "w9"}', ca=ca)
    stack.procs["w1"].start()
    await eventually(lambda: _online_nodes(admin, 2), what="w2 still online")
    assert sorted(n["name"] for n in await admin.request("nodes", "list")) == ["w1", "w2"]

    for port, login in [(root, ("bob", "wrong")), (root, ("", "")), (cluster, ("node.w1", "x")),
                        (w1_port, ("node.w1", "x"))]:
        refused = subprocess.run(_mqtt("mosquitto_pub", port, login, "-t", "oak/x", "-m", "x", ca=ca),
                                 capture_output=True, timeout=10)
        assert refused.returncode != 0, f"{login} at {port}"
    plain = subprocess.run(_mqtt("mosquitto_pub", root, admin_login, "-t", "oak/x", "-m", "x"),
                           capture_output=True, timeout=10)
    assert plain.returncode != 0, "plain TCP to the TLS listener"


# ---- the users' lane beside a root on mosquitto --------------------------------------------------------


def _lane_of(root_pid: int) -> int | None:
    """The pid of the root's users' lane process (services/root/lane_process.py), if it runs."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _alive(int(entry.name)) and _parent(int(entry.name)) == root_pid:
            with contextlib.suppress(OSError):
                if b"services.root.lane_process" in (entry / "cmdline").read_bytes():
                    return int(entry.name)
    return None


def _stat(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _alive(pid: int) -> bool:
    return _stat(pid)[:1] not in ([], ["Z"])


def _parent(pid: int) -> int:
    return int(_stat(pid)[1]) if _stat(pid) else 0


@pytest.mark.timeout(120)
async def test_a_root_on_mosquitto_answers_its_users_from_a_lane_process(tmp_path: Path) -> None:
    """With ``--broker mosquitto`` the users' lane is a child process of the root: a user reads their own
    writes through it; killed, another takes its place within seconds and answers the same; and when the
    root is killed -9, the lane ends too."""
    _need_mosquitto()
    stack = Stack(tmp_path, root_args=MOSQUITTO)
    try:
        root = stack.root()
        admin = await connect(stack)
        try:
            assert root.popen is not None
            lane = _lane_of(root.popen.pid)
            assert lane is not None, f"no lane process beside the root\n{stack.logs()}"
            await admin.request("apps", "create", raw=dumps(sla(sleeper("job", 6043), app="lane")))
            listed = await admin.request("services", "list")
            assert [s["job_name"] for s in listed] == ["lane.test.job.test"], "the user's own write, read back"

            os.kill(lane, signal.SIGKILL)
            pid = root.popen.pid
            await eventually(lambda: _lane_of(pid) not in (None, lane), 30, what="another lane")
            await eventually(lambda: root.tail(100).count("the users' lane serves") == 2, 30, what="it serves")
            assert [s["job_name"] for s in await admin.request("services", "list")] == ["lane.test.job.test"]
            assert "exited with code -9" in root.tail(20)

            second = _lane_of(pid)
            assert second is not None
            root.kill9()
            await eventually(lambda: not _alive(second), 15, what="the lane ended with its root")
        finally:
            await admin.__aexit__(None, None, None)
    finally:
        stack.stop()
