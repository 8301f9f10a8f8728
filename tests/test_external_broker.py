"""Every tier on brokers oak did not start (``--broker mqtt://HOST:PORT``), as an operator runs them.

The test plays the operator of docs/brokers.md: ``oak broker files DIR`` for each broker, a mosquitto
(Debian's) started with the printed lines on an ephemeral loopback port, then the root and the cluster
with ``--broker mqtt://... --broker-files DIR --broker-reload 'kill -HUP PID'``. The three-tier
end-to-end test of the embedded set-up runs unchanged on it; the topic rules are checked on the brokers
themselves with mosquitto_pub/mosquitto_sub.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.backend import EXTERNAL, BrokerSpec
from broker.external import conf_lines, write_initial
from services.common.mqtt import BrokerUrl
from services.common.private import write_private
from tests.conftest import Stack, eventually
from tests.stack import Proc, free_port, oak
from tests.test_mosquitto import _login, _mqtt, _need_mosquitto, _publish, _read, two_workers_running
from tests.test_three_tiers import _online_nodes, running
from tests.test_three_tiers import test_mdoc_deploy_scale_undeploy as test_mdoc_deploy_scale_undeploy  # noqa: F401

# ---- the choice and the files, without a broker ---------------------------------------------------


def test_broker_spec_needs_files_and_reload_or_a_login() -> None:
    """``mqtt://`` takes oak's files with a reload command, or a login the operator keeps; nothing else."""
    spec = BrokerSpec.parse("mqtt://h:1884", files="/x", reload="kill -HUP 1")
    assert (spec.kind, spec.url, spec.files, spec.oak_accounts) == (EXTERNAL, BrokerUrl("h", 1884), Path("/x"), True)
    assert not BrokerSpec.parse("mqtt://h:1884", "u", "p").oak_accounts
    for bad in [{"files": "/x"}, {}, {"username": "u"}]:
        with pytest.raises(ValueError, match="--broker"):
            BrokerSpec.parse("mqtt://h:1884", **bad)
    with pytest.raises(ValueError, match="a broker you run"):
        BrokerSpec.parse("mosquitto", files="/x", reload="true")


def test_files_keep_the_mode_and_group_an_operator_gave_them(tmp_path: Path) -> None:
    """New files are private; a file made readable for the broker's account stays so when rewritten."""
    write_initial(tmp_path)
    assert (tmp_path / "passwd").read_text() == ""
    assert "pattern write oak/join/request/%c" in (tmp_path / "acl").read_text()
    assert os.stat(tmp_path / "acl").st_mode & 0o777 == 0o600
    os.chmod(tmp_path / "acl", 0o640)
    write_private(tmp_path / "acl", "x\n")
    write_initial(tmp_path)  # leaves existing files alone
    assert ((tmp_path / "acl").read_text(), os.stat(tmp_path / "acl").st_mode & 0o777) == ("x\n", 0o640)
    assert conf_lines(tmp_path)[-1] == f"acl_file {tmp_path.resolve() / 'acl'}"


# ---- a live set-up ---------------------------------------------------------------------------------


class OperatorsMosquitto:
    """A mosquitto someone runs for oak: its own config naming the files ``oak broker files`` wrote."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        files = subprocess.run(oak("broker", "files", str(directory / "oak")), capture_output=True, text=True,
                               check=True, timeout=60)
        lines = [line for line in files.stdout.splitlines() if line and not line.startswith("#")]
        assert any(line.startswith("password_file") for line in lines), files.stdout
        conf = directory / "mosquitto.conf"
        conf.write_text("\n".join([f"user {pwd.getpwuid(os.geteuid()).pw_name}", *lines,
                                   f"listener {port} 127.0.0.1", "log_dest stderr", ""]))
        self.proc = Proc("mosquitto", ["mosquitto", "-c", str(conf)], directory).start()

    def args(self) -> tuple[str, ...]:
        """An oak tier's flags to run on this broker."""
        assert self.proc.popen is not None
        return ("--broker", f"mqtt://127.0.0.1:{self.port}", "--broker-files", str(self.directory / "oak"),
                "--broker-reload", f"kill -HUP {self.proc.popen.pid}")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack whose root and cluster ``c1`` run on two mosquittos started here (overrides conftest's)."""
    _need_mosquitto()
    brokers: list[OperatorsMosquitto] = []
    s: Stack | None = None
    try:
        root_port, cluster_port = free_port(), free_port()
        for name, port in (("root-broker", root_port), ("c1-broker", cluster_port)):
            (tmp_path / name).mkdir()
            brokers.append(OperatorsMosquitto(tmp_path / name, port))
        s = Stack(tmp_path / "stack", root_args=brokers[0].args(), cluster_args=brokers[1].args())
        s.scheme = "mqtt://"  # the operator's mosquitto listens without TLS here
        s.root_port, s.cluster_ports["c1"] = root_port, cluster_port
        yield s
    finally:
        if s is not None:
            s.stop()
        for broker in brokers:
            broker.proc.stop()


@pytest.mark.timeout(120)
async def test_topic_rules_hold_on_an_external_broker(stack: Stack, api: Any) -> None:
    """Wrong passwords and anonymous logins are refused; a worker neither speaks for nor reads another."""
    admin = await two_workers_running(stack, api, "ext", 6051)
    root, cluster = stack.root_port, stack.cluster_ports["c1"]

    w1 = _login(stack.base / "w1" / "identity.json")
    assert "oak/nodes/w1/down/desired" in _read(cluster, w1, "oak/nodes/w1/down/#")
    assert _read(cluster, w1, "oak/nodes/w2/down/#") == "", "w1 reads w2's desired instances"
    _publish(cluster, w1, "oak/nodes/w2/up/avail", '{"state":"offline"}', "-r")
    _publish(cluster, w1, "oak/nodes/w2/up/state", "{}", "-r")
    await eventually(lambda: _online_nodes(admin, 2), what="w2 still online")
    await running(admin, "ext.test.job.test", 2)

    admin_login = _login(stack.base / "root" / "credentials.json")
    c1 = _login(stack.base / "c1" / "identity.json")
    for port, login in [(root, (admin_login[0], "wrong")), (root, (c1[0], "wrong")), (root, ("", "")),
                        (cluster, (w1[0], "wrong")), (cluster, ("svc.cluster", "x")), (cluster, w1[:1] * 2)]:
        refused = subprocess.run(_mqtt("mosquitto_pub", port, login, "-t", "oak/x", "-m", "x"),
                                 capture_output=True, timeout=10)
        assert refused.returncode != 0, f"{login[0]!r} logged in at {port} with a wrong password"
    assert _read(root, c1, "oak/api/#") == "", "a cluster reads the users' API"
