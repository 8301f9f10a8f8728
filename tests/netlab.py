"""Pretend hosts for overlay tests: network namespaces joined by a LAN bridge, all made and removed here.

Nothing in the test machine's own namespace is touched: the LAN bridge lives in a namespace of its
own, and each host is a namespace with one veth into it (``eth0``, 192.168.<n>.<k>/24).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess

import pytest

from services.worker.kernel import namespaces

__all__ = ["Lab", "links", "namespaces", "need_network_lab", "nft_ruleset", "sh"]


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command; fail with its output when *check* and it fails."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr or done.stdout}")
    return done


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

    def remove(self) -> None:
        """Remove every namespace of the lab (their links go with them)."""
        for ns in [*self.hosts.values(), self.lan]:
            sh("ip", "netns", "del", ns, check=False)


def links(ns: str | None = None) -> set[str]:
    """The link names in namespace *ns* (None: the one the tests run in)."""
    out = sh("ip", *(["-n", ns] if ns else []), "-o", "link", "show").stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def nft_ruleset(ns: str) -> str:
    """The nftables ruleset of namespace *ns*."""
    return sh("ip", "netns", "exec", ns, "nft", "list", "ruleset").stdout
