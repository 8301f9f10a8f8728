"""The socket balancer: a real connect4 BPF program on a real cgroup, clients in a real network namespace."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugins.runtimes.cgroups import cgroup2_mount
from services.worker import socklb
from services.worker.kernel import entered
from services.worker.socklb import SocketBalancer, netns_cookie
from tests.netlab import Lab, conntrack, in_netns, need_network_lab, sh

SERVICE_IP, BACKENDS, PORT = "10.30.9.9", ("10.18.9.1", "10.18.9.2"), 8099

SERVER = f"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", {PORT})); s.listen(64)
while True:
    c, _ = s.accept(); c.sendall(c.getsockname()[0].encode()); c.close()
"""

CLIENT = f"""
import socket, sys
for _ in range(int(sys.argv[1])):
    try:
        c = socket.create_connection(("{SERVICE_IP}", {PORT}), timeout=1); print(c.recv(64).decode()); c.close()
    except OSError:
        print("none")
"""


@pytest.fixture
def place() -> Iterator[tuple[str, Path]]:
    """A namespace holding both backends (addresses on lo, one server on all) and an empty cgroup v2 group."""
    need_network_lab()
    reason = socklb.unavailable()
    if reason:
        pytest.skip(reason)
    mount = cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup v2 hierarchy is mounted")
    lab = Lab()
    group = mount / f"oaktest-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    server = None
    try:
        ns = lab.host("x")
        sh("ip", "-n", ns, "route", "del", "default")  # a service IP left untranslated goes nowhere
        for ip in BACKENDS:
            sh("ip", "-n", ns, "addr", "add", f"{ip}/32", "dev", "lo")
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER])
        for _ in range(50):
            if sh("ip", "netns", "exec", ns, "ss", "-Htln", f"sport = :{PORT}").stdout.strip():
                break
            time.sleep(0.1)
        yield ns, group
    finally:
        if server:
            server.kill()
            server.wait()
        lab.remove()
        group.rmdir()


def ask(ns: str, count: int, group: Path | None) -> list[str]:
    """Where *count* connections to the service IP from namespace *ns* (and cgroup *group*) ended."""
    done = sh(*in_netns(ns, [sys.executable, "-c", CLIENT, str(count)], group))
    return done.stdout.split()


def cookie_of(ns: str) -> int:
    with entered(ns):
        return netns_cookie()


def test_connections_go_to_the_backends_in_turn(place: tuple[str, Path]) -> None:
    """In the group and a known namespace, each new connection goes to the next backend; nothing outside
    the group, or from an unknown namespace, or after close, is translated."""
    ns, group = place
    balancer = SocketBalancer(group)
    balancer.open()
    try:
        balancer.set_services({SERVICE_IP: BACKENDS})
        assert ask(ns, 2, group) == ["none"] * 2, "a namespace the worker did not register is left alone"
        balancer.add_namespace(cookie_of(ns))
        assert ask(ns, 4, group) == [*BACKENDS, *BACKENDS], "round robin"
        assert ask(ns, 1, None) == ["none"], "a process outside the instances' cgroup is left alone"
        assert conntrack(ns) == [], "no connection tracking anywhere on the way"

        balancer.set_services({SERVICE_IP: BACKENDS[1:]})
        assert ask(ns, 3, group) == [BACKENDS[1]] * 3, "a backend gone is no longer chosen"
        balancer.set_services({})
        assert ask(ns, 1, group) == ["none"], "a service without backends is not translated"
        balancer.set_services({SERVICE_IP: BACKENDS})
        balancer.remove_namespace(cookie_of(ns))
        assert ask(ns, 1, group) == ["none"], "a namespace removed is left alone"
        balancer.add_namespace(cookie_of(ns))
    finally:
        balancer.close()
    assert ask(ns, 1, group) == ["none"], "closing detaches the program"


def test_program_keeps_services_with_too_many_backends_out(place: tuple[str, Path]) -> None:
    """A service with more replicas than the program holds is left to nftables (not translated here)."""
    ns, group = place
    balancer = SocketBalancer(group)
    balancer.open()
    try:
        balancer.add_namespace(cookie_of(ns))
        balancer.set_services({SERVICE_IP: tuple(f"10.18.10.{i}" for i in range(socklb.MAX_BACKENDS + 1))})
        assert balancer.services == {}
        assert ask(ns, 1, group) == ["none"]
    finally:
        balancer.close()
