"""The worker's nftables ruleset, rendered from the net table: pure text, no kernel needed.

One table, ``ip oakling``, replaced in a single transaction each time anything changes:

* ``services``: each round-robin IP DNATs to its backends with ``numgen inc mod N`` (so each new
  connection goes to the next replica); each closest IP to the backends on this worker, else in
  this cluster, else anywhere. Used from instances (prerouting) and from the worker itself (output).
* ``ports``: the SLA's ``port`` mappings, host port -> instance IP and port.
* ``postrouting``: masquerade an instance reaching a service whose chosen backend shares its
  bridge (else the reply would skip the DNAT), and instances' traffic leaving the overlay.

Existing connections keep their translation across a rewrite (conntrack holds it).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.addressing import WORKER_POOL
from services.common.nettable import Backend, NetTable

TABLE = "oakling"
BRIDGE, VXLAN = "oak0", "oakvx"


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


def service_rules(table: NetTable, node: str, cluster: str) -> list[str]:
    """The DNAT rules of every service IP that has somewhere to go."""
    rules = []
    for route in sorted(table.services.values(), key=lambda r: r.rr_ip):
        if route.backends:
            rules.append(_dnat(route.rr_ip, route.backends))
            rules.append(_dnat(route.closest_ip, route.closest(node, cluster)))
    return rules


def render(table: NetTable, node: str, cluster: str, subnet: str, ports: list[PortMap]) -> str:
    """The whole ruleset, as input for ``nft -f -``."""
    services = "\n".join(f"    {rule}" for rule in service_rules(table, node, cluster))
    published = "\n".join(
        f"    {p.proto} dport {p.host_port} dnat to {p.ip}:{p.port}" for p in sorted(ports, key=lambda p: p.host_port)
    )
    return f"""table ip {TABLE}
delete table ip {TABLE}
table ip {TABLE} {{
  chain services {{
{services}
  }}
  chain ports {{
{published}
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
    ip saddr {subnet} ip daddr {subnet} ct status dnat masquerade
    ip saddr {subnet} ip daddr != {WORKER_POOL} oifname != "{BRIDGE}" masquerade
  }}
}}
"""


def remove() -> str:
    """Input for ``nft -f -`` that removes the table (and nothing else)."""
    return f"table ip {TABLE}\ndelete table ip {TABLE}\n"
