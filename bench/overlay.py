"""Overlay data plane: client -> service IP -> server across two pretend hosts, against a plain veth path.

Two hosts (network namespaces on a LAN bridge) get Oakling's overlay exactly as a worker programs it
(routed instance veths, VXLAN or direct routing as ``--direct-routing`` says, routes, nftables, the
socket balancer); a client instance on host 1 talks to a server instance on host 2 through the
service IP, as each kind of worker would have it: ``overlay_socket_lb`` with the socket balancer (the
client in the instances' cgroup, so the service IP is translated at ``connect``, and no table in the
instances' namespaces), ``overlay_nftables`` without it (the DNAT table in each instance's namespace,
the client outside the cgroup). The instances' tables are swapped before each measurement. The
baseline, measured in the same run, is the same traffic between two more hosts on the LAN that route
it over plain veths (no VXLAN, no NAT, no nftables, full MTU), as a host-gateway network would.

Measured: TCP throughput (iperf3, 5 s per round; Python sockets when iperf3 is missing) and request
latency (a new TCP connection per request, as the translation sees each connection; 100 per round).
Rounds alternate between the paths. Ratios are medians of per-round ratios to the plain path.
Needs root. Run: ``sudo .venv/bin/python -m bench.overlay``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import record, summary
from plugins.runtimes.cgroups import cgroup2_mount
from services.worker import nftrules, socklb
from services.worker.kernel import overlay_unavailable
from services.worker.socklb import SocketBalancer
from tests.netlab import Lab, in_netns, overlay_pair, sh

SERVICE_IP = "10.30.0.1"
PORT = 5201

ECHO_SERVER = f"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {PORT + 1})); s.listen(128)
while True:
    c, _ = s.accept(); c.sendall(c.recv(64)); c.close()
"""

LATENCY_CLIENT = """
import json, socket, sys, time
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(n):
    t = time.perf_counter(); c = socket.create_connection((ip, port)); c.sendall(b"x" * 64); c.recv(64); c.close()
    out.append((time.perf_counter() - t) * 1000)
print(json.dumps(out))
"""

SINK_SERVER = f"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {PORT})); s.listen(8)
while True:
    c, _ = s.accept()
    while c.recv(1 << 20): pass
    c.close()
"""

SOURCE_CLIENT = """
import socket, sys, time
ip, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
chunk, sent = b"x" * (1 << 18), 0
c = socket.create_connection((ip, port)); end = time.perf_counter() + seconds; start = time.perf_counter()
while time.perf_counter() < end:
    c.sendall(chunk); sent += len(chunk)
c.close(); print(sent * 8 / (time.perf_counter() - start) / 1e9)
"""


@contextmanager
def servers(ns: str) -> Iterator[None]:
    """iperf3 (or a Python sink) and a Python echo server running in namespace *ns*."""
    sink = ["iperf3", "-s", "-p", str(PORT)] if shutil.which("iperf3") else [sys.executable, "-c", SINK_SERVER]
    procs = [subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for cmd in (sink, [sys.executable, "-c", ECHO_SERVER])]
    time.sleep(0.5)
    try:
        yield
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(5)


def throughput(ns: str, ip: str, seconds: float, group: Path | None) -> float:
    """Gbit/s from namespace *ns* (and cgroup *group*) to ip."""
    if shutil.which("iperf3"):
        out = sh(*in_netns(ns, ["iperf3", "-c", ip, "-p", str(PORT), "-t", str(seconds), "-J"], group),
                 timeout=seconds + 30).stdout
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9
    out = sh(*in_netns(ns, [sys.executable, "-c", SOURCE_CLIENT, ip, str(PORT), str(seconds)], group),
             timeout=seconds + 30).stdout
    return float(out)


def latencies(ns: str, ip: str, count: int, group: Path | None) -> list[float]:
    """Milliseconds per request (new connection each) from namespace *ns* (and cgroup *group*) to ip."""
    out = sh(*in_netns(ns, [sys.executable, "-c", LATENCY_CLIENT, ip, str(PORT + 1), str(count)], group),
             timeout=120).stdout
    return [float(x) for x in json.loads(out)]


def build_plain(lab: Lab) -> tuple[str, str]:
    """The same shape without the overlay: two more hosts on the LAN routing between a client namespace behind
    one and a server namespace behind the other over plain veths (no VXLAN, no NAT); (client ns, server ns)."""
    ends = {}
    for index, host in ((1, "h3"), (2, "h4")):
        ns, inner = lab.host(host), f"{lab.tag}-p{index}"
        sh("ip", "netns", "add", inner)
        lab.hosts[inner] = inner  # removed with the lab
        sh("ip", "-n", ns, "link", "add", "veth0", "type", "veth", "peer", "name", "eth0", "netns", inner)
        sh("ip", "-n", ns, "addr", "add", f"10.99.{index}.1/24", "dev", "veth0")
        sh("ip", "-n", ns, "link", "set", "veth0", "up")
        sh("ip", "-n", inner, "addr", "add", f"10.99.{index}.2/24", "dev", "eth0")
        sh("ip", "-n", inner, "link", "set", "eth0", "up")
        sh("ip", "-n", inner, "link", "set", "lo", "up")
        sh("ip", "-n", inner, "route", "add", "default", "via", f"10.99.{index}.1")
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        ends[host] = inner
    sh("ip", "-n", lab.hosts["h3"], "route", "add", "10.99.2.0/24", "via", lab.addresses["h4"])
    sh("ip", "-n", lab.hosts["h4"], "route", "add", "10.99.1.0/24", "via", lab.addresses["h3"])
    return ends["h3"], ends["h4"]


@dataclass(frozen=True)
class Trip:
    """One way to the server: from namespace *client* (in cgroup *group*, if any) to *address*, with the
    instances' namespaces holding *tables* (None: leave them as they are)."""

    client: str
    server: str
    address: str
    group: Path | None = None
    tables: dict[str, str] | None = None


def measure(trips: dict[str, Trip], rounds: int, seconds: float) -> dict[str, dict[str, Any]]:
    """Throughput and request latency over each trip, rounds interleaved (and their order turned round
    every other round) so that whatever else the machine does weighs on every trip alike."""
    gbits: dict[str, list[float]] = {name: [] for name in trips}
    ms: dict[str, list[float]] = {name: [] for name in trips}
    for index in range(rounds):
        for name, trip in (trips.items() if index % 2 == 0 else reversed(trips.items())):
            for ns, ruleset in (trip.tables or {}).items():
                sh("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=ruleset)
            with servers(trip.server):
                gbits[name].append(throughput(trip.client, trip.address, seconds, trip.group))
                ms[name] += latencies(trip.client, trip.address, 100, trip.group)
    return {name: {"throughput_gbit_s": summary(gbits[name]), "request_ms": summary(ms[name]),
                   "per_round_gbit_s": gbits[name]} for name in trips}


def instance_tables(namespaces: tuple[str, ...]) -> dict[str, str]:
    """The ``ip oakling`` table each instance namespace holds now, as input that puts it back."""
    return {ns: nftrules.remove() + sh("ip", "netns", "exec", ns, "nft", "list", "table", "ip", nftrules.TABLE).stdout
            for ns in namespaces}


def paired_ratio(over: list[float], under: list[float]) -> float:
    """The median of the per-round ratios: robust when the machine's load changes between rounds."""
    return statistics.median(a / b for a, b in zip(over, under, strict=True))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--direct-routing", choices=("auto", "on", "off"), default="auto",
                   help="as the workers' DirectRouting: auto (default: unwrapped once probed), on, off (VXLAN)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # (so that the lab is removed)
    reason = overlay_unavailable()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    lab = Lab()
    mount = cgroup2_mount()
    group = mount / f"oakbench-{lab.tag}" if mount and not socklb.unavailable() else None
    balancer = None
    try:
        if group:
            group.mkdir()
            balancer = SocketBalancer(group)
            balancer.open()
        client, server = overlay_pair(lab, SERVICE_IP, args.direct_routing, balancer)
        route = sh("ip", "-n", lab.hosts["h1"], "route", "show", "10.18.0.64/26").stdout.strip()  # to the server
        plain_client, plain_server = build_plain(lab)
        dnat = instance_tables((client, server))  # a worker without the balancer: DNAT in the instances
        trips = {"overlay_nftables": Trip(client, server, SERVICE_IP, tables=dnat),
                 "plain": Trip(plain_client, plain_server, "10.99.2.2")}
        if group:  # a worker with it: the client in the instances' cgroup, no table in the instances
            trips["overlay_socket_lb"] = Trip(client, server, SERVICE_IP, group, {ns: nftrules.remove() for ns in dnat})
        results = measure(trips, args.rounds, args.seconds)
    finally:
        if balancer:
            balancer.close()
        lab.remove()
        if group:
            group.rmdir()
    plain = results.pop("plain")
    record(f"overlay_data_plane_{args.direct_routing}", {
        "command": f"python -m bench.overlay --direct-routing {args.direct_routing}",
        "tool": "iperf3" if shutil.which("iperf3") else "python sockets",
        "client_host_route_to_server": route,
        "plain_routed_veth": plain,
        **{name: {**path, "throughput_ratio_per_round_median": paired_ratio(path["per_round_gbit_s"],
                                                                            plain["per_round_gbit_s"]),
                  "latency_ratio_median": path["request_ms"]["median"] / plain["request_ms"]["median"]}
           for name, path in results.items()},
        "goal": "throughput at least 0.9 of the plain path",
    })


if __name__ == "__main__":
    main()
