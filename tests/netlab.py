"""Pretend hosts for overlay tests: network namespaces joined by a LAN bridge, all made and removed here.

Nothing in the test machine's own namespace is touched: the LAN bridge lives in a namespace of its
own, and each host is a namespace with one veth into it (``eth0``, 192.168.<n>.<k>/24).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from services.common.addressing import WORKER_POOL
from services.common.nettable import Backend, NetTable, NodeRoute, ServiceRoute
from services.worker import nftrules
from services.worker.kernel import Kernel, namespace_of, namespaces
from services.worker.netcfg import DirectRouting
from services.worker.socklb import SocketBalancer

__all__ = ["Lab", "conntrack", "in_netns", "links", "namespaces", "need_network_lab", "nft_ruleset", "overlay_pair",
           "sh"]


def sh(*argv: str, check: bool = True, timeout: float = 30,
       stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command (fed *stdin*); fail with its output when *check* and it fails."""
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr or done.stdout}")
    return done


def in_netns(ns: str, argv: list[str], group: Path | None = None) -> list[str]:
    """A command line running *argv* in namespace *ns* and, given, in cgroup *group* (joined first, as
    ``ip netns exec`` hides the cgroup mounts from what it starts)."""
    join = f"echo $$ > {group}/cgroup.procs && " if group else ""
    return ["sh", "-c", f'{join}exec "$@"', "-", "ip", "netns", "exec", ns, *argv]


def need_network_lab() -> None:
    """Skip, saying why, when this machine cannot build namespaces, bridges and nftables here."""
    if os.geteuid() != 0:
        pytest.skip("overlay tests need root (network namespaces, VXLAN, nftables)")
    for tool in ("ip", "nft", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make test installs it when run as root)")


class Lab:
    """A LAN and hosts on it."""

    def __init__(self) -> None:
        self.tag = f"t{random.randrange(16**5):05x}"
        self.net = random.randrange(100, 250)
        self.lan = f"{self.tag}-lan"
        self.hosts: dict[str, str] = {}  # name -> namespace
        self.addresses: dict[str, str] = {}
        self.kernels: dict[str, Kernel] = {}  # the workers' kernels overlay_pair programmed, by host
        sh("ip", "netns", "add", self.lan)
        sh("ip", "-n", self.lan, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.lan, "link", "set", "br0", "up")

    def host(self, name: str) -> str:
        """Add a host called *name*; return its namespace."""
        ns, index = f"{self.tag}-{name}", len(self.hosts) + 1
        address = f"192.168.{self.net}.{index}"
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", self.lan, "link", "add", f"p{index}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", self.lan, "link", "set", f"p{index}", "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", f"192.168.{self.net}.254")
        if shutil.which("ethtool"):  # receive offload, as a real NIC has (veths have it off)
            sh("ip", "netns", "exec", ns, "ethtool", "-K", "eth0", "gro", "on", check=False)
            sh("ip", "netns", "exec", self.lan, "ethtool", "-K", f"p{index}", "gro", "on", check=False)
        self.hosts[name], self.addresses[name] = ns, address
        return ns

    def drop_overlay_addresses(self, drop: bool = True) -> None:
        """Make the LAN drop frames carrying overlay addresses, as clouds that check addresses do (VXLAN's
        outer addresses are the hosts' own, so it still passes); with *drop* False, stop."""
        if not drop:
            sh("ip", "netns", "exec", self.lan, "nft", "delete", "table", "bridge", "cloud")
            return
        sh("ip", "netns", "exec", self.lan, "nft", "-f", "-", check=True, stdin=f"""table bridge cloud {{
  chain forward {{
    type filter hook forward priority 0; policy accept;
    ip saddr {WORKER_POOL} drop
    ip daddr {WORKER_POOL} drop
  }}
}}
""")

    def remove(self) -> None:
        """Remove every namespace of the lab (their links go with them)."""
        for ns in [*self.hosts.values(), self.lan]:
            sh("ip", "netns", "del", ns, check=False)


def links(ns: str | None = None) -> set[str]:
    """The link names in namespace *ns* (None: the one the tests run in)."""
    out = sh("ip", *(["-n", ns] if ns else []), "-o", "link", "show").stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def conntrack(ns: str, proto: str = "") -> list[str]:
    """The connection tracking entries of namespace *ns* (for *proto* if given); none where conntrack is
    not even loaded."""
    done = sh("ip", "netns", "exec", ns, "cat", "/proc/net/nf_conntrack", check=False)
    return [line for line in done.stdout.splitlines() if f" {proto} " in line or not proto]


def nft_ruleset(ns: str) -> str:
    """The nftables ruleset of namespace *ns*."""
    return sh("ip", "netns", "exec", ns, "nft", "list", "ruleset").stdout


def overlay_pair(lab: Lab, service_ip: str, direct_routing: DirectRouting = "off",
                 balancer: SocketBalancer | None = None) -> tuple[str, str]:
    """Oakling's overlay on new hosts h1 and h2, programmed as workers do, with a client instance on h1 and
    a server instance on h2 behind the round-robin *service_ip*; (client namespace, server namespace).
    With ``auto`` direct routing, peers whose probe went unanswered (h2 is set up after h1) are probed
    again as a worker would, for up to 3 s. Given *balancer*, h1 tells it the service IPs and the
    client's namespace, as its worker would. The instances' namespaces are removed with the lab."""
    subnets = {"h1": "10.18.0.0/26", "h2": "10.18.0.64/26"}
    nodes = {}
    for host in subnets:
        lab.host(host)
        nodes[host] = NodeRoute("c1", subnets[host], f"{lab.addresses[host]}:50103")
    table = NetTable(nodes, {"s": ServiceRoute("s", service_ip, "10.30.255.254", (Backend("10.18.0.66", "h2", "c1"),))})
    kernels = lab.kernels
    for host, subnet in subnets.items():
        kernel = kernels[host] = Kernel(lab.hosts[host], direct_routing)
        kernel.ensure_host(subnet, lab.addresses[host], 50103)
        kernel.set_peers({name: route for name, route in nodes.items() if name != host})
        kernel.set_rules(nftrules.render(table, host, "c1", subnet, [], (lab.addresses[host], 50103)))
    deadline = time.monotonic() + 3
    for host, kernel in kernels.items():
        while (delay := kernel.next_probe()) is not None and time.monotonic() + delay < deadline:
            time.sleep(delay)
            kernel.set_peers({name: route for name, route in nodes.items() if name != host})
    for host, role, ip in (("h1", "client", "10.18.0.2"), ("h2", "server", "10.18.0.66")):
        iid = f"{lab.tag}-{role}"
        lab.hosts[iid] = namespace_of(iid)
        kernels[host].attach(iid, ip, subnets[host])
        kernels[host].set_instance_rules(iid, nftrules.render_instance(table, host, "c1"))
    if balancer:
        balancer.set_services(nftrules.backend_ips(table, "h1", "c1"))
        balancer.add_namespace(Kernel.cookie(f"{lab.tag}-client"))
    return namespace_of(f"{lab.tag}-client"), namespace_of(f"{lab.tag}-server")
