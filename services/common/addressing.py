"""The overlay's address plan: pure functions, so every tier allocates the same way.

* The root gives each cluster a block (a /20) of the worker pool ``10.18.0.0/15``.
* The cluster gives each worker with an overlay a subnet (a /26) of its block.
* In a worker's subnet, ``.0`` is the worker's VXLAN address, ``.1`` its bridge (the instances'
  gateway) and ``.2`` to ``.62`` its instances.
* The root gives each service two IPs from ``10.30.0.0/16``: a round-robin one (the SLA's
  ``addresses.rr_ip`` when given) and a closest one.

Nothing is stored apart from what uses an address: a subnet or IP is free again as soon as the
worker, instance or service holding it is forgotten, so nothing leaks.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

WORKER_POOL = ipaddress.IPv4Network("10.18.0.0/15")
SERVICE_POOL = ipaddress.IPv4Network("10.30.0.0/16")
CLUSTER_PREFIX = 20
WORKER_PREFIX = 26


class Exhausted(RuntimeError):
    """Every address of a pool is in use."""


def free_subnet(pool: str | ipaddress.IPv4Network, prefix: int, used: Iterable[str]) -> str:
    """The first /*prefix* of *pool* that overlaps none of *used*."""
    net = ipaddress.ip_network(pool)
    taken = [ipaddress.ip_network(u) for u in used if u]
    for candidate in net.subnets(new_prefix=prefix):
        if not any(candidate.overlaps(t) for t in taken):
            return str(candidate)
    raise Exhausted(f"no free /{prefix} left in {net}")


def free_ip(subnet: str | ipaddress.IPv4Network, used: Iterable[str], skip: int = 0) -> str:
    """The first host address of *subnet*, after the first *skip*, that is not in *used*."""
    net = ipaddress.ip_network(subnet)
    taken = set(used)
    for index, host in enumerate(net.hosts()):
        if index >= skip and str(host) not in taken:
            return str(host)
    raise Exhausted(f"no free address left in {net}")


def vtep_ip(subnet: str) -> str:
    """A worker's VXLAN address: the network address of its subnet."""
    return str(ipaddress.ip_network(subnet).network_address)


def gateway(subnet: str) -> str:
    """A worker's bridge address, the instances' default gateway: the first host of its subnet."""
    return str(ipaddress.ip_network(subnet).network_address + 1)


def instance_ip(subnet: str, used: Iterable[str]) -> str:
    """A free instance address in a worker's subnet (after the gateway)."""
    return free_ip(subnet, used, skip=1)


def vtep_mac(subnet: str) -> str:
    """A worker's VXLAN MAC, derived from its subnet so peers need not be told it."""
    octets = ipaddress.ip_network(subnet).network_address.packed
    return "02:00:" + ":".join(f"{b:02x}" for b in octets)


def service_ips(rr_ip: str, used: Iterable[str]) -> tuple[str, str]:
    """(round-robin IP, closest IP) for a new service; *rr_ip* is the SLA's wish ("" for any)."""
    taken = set(used)
    if rr_ip and rr_ip in taken:
        raise Exhausted(f"addresses.rr_ip {rr_ip} is already used by another service")
    rr = rr_ip or free_ip(SERVICE_POOL, taken)
    return rr, free_ip(SERVICE_POOL, taken | {rr})
