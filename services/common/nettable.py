"""The overlay's routing table: where every worker's subnet is and which instances back each service IP.

The root builds the whole table from its clusters' reports and sends it to every cluster; a
cluster replaces its own part with what its workers said a moment ago (fresher) and sends the
result to each of its workers, which program their kernel from it. Retained all the way, so a
worker that restarts, or whose cluster is gone, still knows every route it knew.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from services.common import envelope
from services.common.mqtt import MqttSession
from services.common.retained import LastSent


@dataclass(frozen=True)
class NodeRoute:
    """A worker reachable over the overlay: its cluster, its subnet and its VXLAN endpoint ``ip:port``."""

    cluster: str
    subnet: str
    endpoint: str

    @property
    def address(self) -> str:
        """The endpoint's IP."""
        return self.endpoint.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        """The endpoint's UDP port."""
        return int(self.endpoint.rsplit(":", 1)[1])


@dataclass(frozen=True)
class Backend:
    """A running instance of a service: its IP and where it runs."""

    ip: str
    node: str
    cluster: str


@dataclass(frozen=True)
class ServiceRoute:
    """A service's two IPs and its running instances."""

    name: str
    rr_ip: str
    closest_ip: str
    backends: tuple[Backend, ...] = ()

    def closest(self, node: str, cluster: str) -> tuple[Backend, ...]:
        """The backends the closest IP leads to from *node*: those on it, else in *cluster*, else all."""
        for near in ([b for b in self.backends if b.node == node], [b for b in self.backends if b.cluster == cluster]):
            if near:
                return tuple(near)
        return self.backends


@dataclass(frozen=True)
class NetTable:
    """Every overlay worker and every service with IPs."""

    nodes: dict[str, NodeRoute] = field(default_factory=dict)
    services: dict[str, ServiceRoute] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The wire form."""
        return {
            "nodes": {n: {"cluster": r.cluster, "subnet": r.subnet, "endpoint": r.endpoint}
                      for n, r in sorted(self.nodes.items())},
            "services": {
                sid: {"name": s.name, "rr_ip": s.rr_ip, "closest_ip": s.closest_ip,
                      "backends": [[b.ip, b.node, b.cluster] for b in s.backends]}
                for sid, s in sorted(self.services.items())
            },
        }

    @classmethod
    def from_json(cls, data: Any) -> NetTable:
        """Read the wire form; raise ValueError when it is malformed."""
        if not isinstance(data, dict):
            raise ValueError("net table: expected an object")
        try:
            nodes = {str(n): NodeRoute(str(r["cluster"]), str(r["subnet"]), str(r["endpoint"]))
                     for n, r in dict(data.get("nodes", {})).items()}
            services = {
                str(sid): ServiceRoute(str(s["name"]), str(s["rr_ip"]), str(s["closest_ip"]),
                                       tuple(Backend(str(ip), str(n), str(c)) for ip, n, c in s.get("backends", [])))
                for sid, s in dict(data.get("services", {})).items()
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"net table: malformed ({exc})") from None
        return cls(nodes, services)

    def with_cluster(self, cluster: str, nodes: dict[str, NodeRoute], backends: dict[str, list[Backend]],
                     services: dict[str, ServiceRoute]) -> NetTable:
        """This table with *cluster*'s part replaced by fresher facts: its *nodes*, and for each service
        the *backends* running in it; *services* adds services this table does not know yet."""
        merged_nodes = {n: r for n, r in self.nodes.items() if r.cluster != cluster} | nodes
        merged = dict(services) | dict(self.services)
        out = {}
        for sid, route in merged.items():
            others = tuple(b for b in route.backends if b.cluster != cluster)
            out[sid] = replace(route, backends=others + tuple(sorted(backends.get(sid, []), key=lambda b: b.ip)))
        return NetTable(merged_nodes, out)


class TableSender:
    """Sends each child its own part (block or subnet) with the net table, retained, only when either
    changed; the table is encoded once per round however many children get it."""

    def __init__(self, session: MqttSession, src: str) -> None:
        self.session, self.src = session, src
        self._sent = LastSent()

    def send(self, table: NetTable, parts: dict[str, dict[str, Any]]) -> None:
        """Publish ``{**part, "table": table}`` on each topic of *parts* whose content changed."""
        wire = table.to_json()
        table_key = json.dumps(wire, sort_keys=True)
        for topic, part in parts.items():
            key = (json.dumps(part, sort_keys=True), table_key)
            if self._sent.fresh(topic, key):
                self.session.publish(topic, envelope.encode("net", {**part, "table": wire}, self.src), retain=True)
