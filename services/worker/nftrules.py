"""The worker's nftables rulesets, rendered from the net table: pure text, no kernel needed.

Service IPs are translated where a connection starts: at the socket (:mod:`services.worker.socklb`),
or, where that cannot run, inside the client instance's own namespace (:func:`render_instance`), so
the workers in between only route. Each namespace holds one table,
``ip oakling``, replaced in a single transaction each time anything changes.

In every instance namespace:

* ``services``: each round-robin IP DNATs to its backends with ``numgen inc mod N`` (so each new
  connection goes to the next replica); each closest IP to the backends on this worker, else in
  this cluster, else anywhere;
* ``raw``: TCP that needs no translation (everything but connections to service IPs) is not tracked.

In the worker's (host) namespace (:func:`render`):

* ``services`` again, for the worker itself (output) and for what passes through untranslated (VM
  guests, whose frames bypass their namespace's stack, and, with the socket balancer, UDP and
  processes outside the instances' cgroup: prerouting);
* ``ports``: the SLA's ``port`` mappings, host port -> instance IP and port;
* ``raw``: no connection tracking for instance-to-instance traffic passing through (it needs no
  translation here) nor for the VXLAN packets that carry it; that is the overlay's fast path;
* ``postrouting``: what this worker translated for a local instance leaves with the gateway as its
  source, so the reply comes back through this worker's connection tracking; instances' traffic
  leaving the overlay is masqueraded.

Existing connections keep their translation across a rewrite (conntrack holds it).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common import addressing
from services.common.addressing import WORKER_POOL
from services.common.nettable import Backend, NetTable, ServiceRoute

TABLE = "oakling"
GATEWAY, VXLAN = "oak0", "oakvx"  # the link holding the instances' gateway address; the VXLAN device


@dataclass(frozen=True)
class PortMap:
    """One published port: ``host_port`` on the worker leads to ``ip:port`` of an instance."""

    host_port: int
    ip: str
    port: int
    proto: str = "tcp"


def parse_ports(spec: str, ip: str) -> list[PortMap]:
    """The SLA's ``port`` (``80``, ``8080:80``, ``8080:80/udp``, several joined by ``;``) for instance *ip*."""
    out = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        mapping, _, proto = item.partition("/")
        host, _, inner = mapping.partition(":")
        out.append(PortMap(int(host), ip, int(inner or host), proto or "tcp"))
    return out


def _dnat(ip: str, backends: tuple[Backend, ...]) -> str:
    if len(backends) == 1:
        return f"ip daddr {ip} dnat to {backends[0].ip}"
    choices = ", ".join(f"{i} : {b.ip}" for i, b in enumerate(backends))
    return f"ip daddr {ip} dnat to numgen inc mod {len(backends)} map {{ {choices} }}"


def _routed(table: NetTable) -> list[ServiceRoute]:
    """The services that have somewhere to go, by round-robin IP."""
    return sorted((route for route in table.services.values() if route.backends), key=lambda r: r.rr_ip)


def translations(table: NetTable, node: str, cluster: str) -> dict[str, tuple[Backend, ...]]:
    """Where each service IP that has somewhere to go leads, as seen from *node*: the round-robin IP to
    every backend, the closest IP to the closest ones."""
    out = {}
    for route in _routed(table):
        out[route.rr_ip] = route.backends
        out[route.closest_ip] = route.closest(node, cluster)
    return out


def backend_ips(table: NetTable, node: str, cluster: str) -> dict[str, tuple[str, ...]]:
    """:func:`translations` as plain addresses (what the socket balancer is told)."""
    return {ip: tuple(b.ip for b in backends) for ip, backends in translations(table, node, cluster).items()}


def service_rules(table: NetTable, node: str, cluster: str) -> list[str]:
    """The DNAT rules of every service IP that has somewhere to go."""
    return _dnat_rules(translations(table, node, cluster))


def _dnat_rules(routes: dict[str, tuple[Backend, ...]]) -> list[str]:
    return [_dnat(ip, backends) for ip, backends in routes.items()]


def _chain(rules: list[str]) -> str:
    return "\n".join(f"    {rule}" for rule in rules)


def render(table: NetTable, node: str, cluster: str, subnet: str, ports: list[PortMap],
           endpoint: tuple[str, int]) -> str:
    """The host namespace's ruleset, as input for ``nft -f -``; *endpoint* is this worker's VXLAN ``(ip, port)``."""
    own = f"{addressing.vtep_ip(subnet)}, {addressing.gateway(subnet)}"  # the worker's own overlay addresses
    published = [f"{p.proto} dport {p.host_port} dnat to {p.ip}:{p.port}"
                 for p in sorted(ports, key=lambda p: p.host_port)]
    return f"""table ip {TABLE}
delete table ip {TABLE}
table ip {TABLE} {{
  chain services {{
{_chain(service_rules(table, node, cluster))}
  }}
  chain ports {{
{_chain(published)}
  }}
  chain raw {{
    type filter hook prerouting priority raw; policy accept;
    ip saddr {WORKER_POOL} ip daddr {WORKER_POOL} ip daddr != {{ {own} }} notrack
    ip daddr {endpoint[0]} udp dport {endpoint[1]} notrack
  }}
  chain raw_out {{
    type filter hook output priority raw; policy accept;
{_chain(_tunnel_notrack(table, node))}
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    jump services
    fib daddr type local jump ports
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    jump services
    fib daddr type local jump ports
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {subnet} ct status dnat snat to {addressing.gateway(subnet)}
    ip saddr {subnet} ip daddr != {WORKER_POOL} masquerade
  }}
}}
"""


def _tunnel_notrack(table: NetTable, node: str) -> list[str]:
    peers = sorted({(route.address, route.port) for name, route in table.nodes.items() if name != node})
    if not peers:
        return []
    return [f"ip daddr . udp dport {{ {', '.join(f'{ip} . {port}' for ip, port in peers)} }} notrack"]


def render_instance(table: NetTable, node: str, cluster: str, untracked: bool = True) -> str:
    """An instance namespace's ruleset: its connections to service IPs are translated where they start,
    and (with *untracked*, which needs the kernel's nft_socket) its other TCP traffic is not tracked
    (see :func:`_untracked_tcp`)."""
    routes = translations(table, node, cluster)
    if not routes:
        return remove()
    return f"""table ip {TABLE}
delete table ip {TABLE}
table ip {TABLE} {{
{_untracked_tcp(sorted(routes)) if untracked else ""}
  chain output {{
    type nat hook output priority -100; policy accept;
{_chain(_dnat_rules(routes))}
  }}
}}
"""


def _untracked_tcp(service_ips: list[str]) -> str:
    """Raw chains that keep an instance's TCP out of connection tracking unless it needs translating.

    Only connections this instance opens to a service IP need conntrack (their DNAT, and its reversal
    on the replies). So TCP leaving for anything but a service IP is not tracked, except on ``lo``
    (an instance reaching itself through a service IP: the reply must be translated back); and TCP
    arriving for a full socket of this namespace (a listener, a connection, or one connecting) is not
    tracked: a reply to a translated connection finds no socket under its untranslated addresses, so
    it still meets its conntrack entry. ``socket wildcard`` is the match because it sees only full
    sockets: a TIME_WAIT socket left by an earlier direct connection to the same backend may hold the
    very addresses and ports of a translated connection's replies, which must not skip conntrack
    (``socket transparent`` matched it, and such a connection stalled until a retransmission). What
    it does not see (a handshake's last ACK, a packet for a TIME_WAIT socket) is looked up, and the
    namespace's ``nf_conntrack_tcp_loose=0`` keeps conntrack from starting an entry mid-connection.
    UDP and ICMP are tracked as before.
    """
    return f"""  chain raw {{
    type filter hook prerouting priority raw; policy accept;
    meta l4proto tcp socket wildcard 0 notrack
    meta l4proto tcp socket wildcard 1 notrack
  }}
  chain raw_out {{
    type filter hook output priority raw; policy accept;
    meta l4proto tcp oif != "lo" ip daddr != {{ {", ".join(service_ips)} }} notrack
  }}"""


def remove() -> str:
    """Input for ``nft -f -`` that removes the table (and nothing else)."""
    return f"table ip {TABLE}\ndelete table ip {TABLE}\n"
