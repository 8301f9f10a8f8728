"""A VM's network: the instance's network namespace handed to the guest through a tap device.

The overlay gives each instance a namespace whose ``eth0`` holds the instance IP. For a VM, QEMU runs
in that namespace with a tap device ``oaktap0``, and two tc ``mirred`` redirects (the way Kata
Containers does it) pass every frame from ``eth0`` to the tap and back: the namespace itself no longer
sees its traffic, the guest does. The guest gets ``eth0``'s MAC address and, on the kernel command line
(``ip=<ip>::<gateway>:<netmask>::eth0:off``), the instance's IP, so service IPs and port mappings reach
it exactly as they reach a container. ``eth0`` keeps its address, so the overlay may re-apply it (after
a worker restart) without breaking anything. Unplugging deletes the tap and the redirect.

Without a namespace the guest gets QEMU's user network (10.0.2.15, gateway 10.0.2.2), with the SLA's
``port`` mappings forwarded from the worker.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from dataclasses import dataclass

TAP = "oaktap0"
TOOL_TIMEOUT = 30
USER_IP, USER_GATEWAY, USER_NETMASK = "10.0.2.15", "10.0.2.2", "255.255.255.0"


@dataclass(frozen=True)
class GuestNet:
    """The guest's network identity."""

    ip: str
    gateway: str
    netmask: str
    mac: str = ""

    def kernel_arg(self) -> str:
        """The ``ip=`` kernel parameter (static, no autoconfiguration) that gives the guest this identity."""
        return f"ip={self.ip}::{self.gateway}:{self.netmask}::eth0:off"


def _in(netns: str, *argv: str, check: bool = True) -> str:
    """Run a tool inside the namespace at path *netns*."""
    try:
        done = subprocess.run(["nsenter", f"--net={netns}", *argv], capture_output=True, text=True,
                              timeout=TOOL_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{argv[0]} in {netns} failed: {exc}") from None
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} in {netns} failed: {done.stderr.strip()[:300]}")
    return done.stdout


def _eth0(netns: str) -> tuple[str, int, str, int]:
    """(address, prefix length, MAC, MTU) of ``eth0`` in *netns*."""
    try:
        (link,) = json.loads(_in(netns, "ip", "-j", "addr", "show", "dev", "eth0"))
        inet = [a for a in link.get("addr_info", []) if a.get("family") == "inet"]
        addr = inet[0] if inet else {}
        return addr.get("local", ""), int(addr.get("prefixlen", 0)), link["address"], int(link.get("mtu", 1500))
    except (ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f"cannot read eth0 in {netns}: {exc}") from None


def plug(netns: str, ip: str, gateway: str) -> GuestNet:
    """Create the tap in *netns* and redirect ``eth0`` to it; return the guest's identity."""
    address, prefix, mac, mtu = _eth0(netns)
    ip = ip or address
    if not ip or not prefix:
        raise RuntimeError(f"eth0 in {netns} has no IPv4 address to give the guest")
    netmask = str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).netmask)
    unplug(netns)  # a tap left by a killed worker
    _in(netns, "ip", "tuntap", "add", "dev", TAP, "mode", "tap")
    try:
        _in(netns, "ip", "link", "set", TAP, "mtu", str(mtu), "up")
        for source, target in (("eth0", TAP), (TAP, "eth0")):
            _in(netns, "tc", "qdisc", "add", "dev", source, "ingress")
            _in(netns, "tc", "filter", "add", "dev", source, "parent", "ffff:", "protocol", "all", "u32", "match",
                "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", target)
    except RuntimeError:
        unplug(netns)
        raise
    return GuestNet(ip, gateway, netmask, mac)


def unplug(netns: str) -> None:
    """Delete the tap and ``eth0``'s redirect in *netns* (nothing happens when they, or it, are gone)."""
    _in(netns, "ip", "link", "del", TAP, check=False)
    _in(netns, "tc", "qdisc", "del", "dev", "eth0", "ingress", check=False)


def user_net() -> GuestNet:
    """The guest's identity on QEMU's user network."""
    return GuestNet(USER_IP, USER_GATEWAY, USER_NETMASK)


def user_forwards(port: str) -> str:
    """The SLA's ``port`` (``"8080:80;53/udp"``) as QEMU ``hostfwd`` options."""
    out = []
    for item in filter(None, port.split(";")):
        mapping, _, proto = item.partition("/")
        host, _, guest = mapping.partition(":")
        out.append(f",hostfwd={proto or 'tcp'}::{host}-:{guest or host}")
    return "".join(out)
