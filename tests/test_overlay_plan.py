"""The overlay's pure parts: address plan, net table, nftables rendering, subnet hand-out. No kernel."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from services.cluster import network as cluster_network
from services.cluster.network import ClusterNetwork
from services.common import addressing, envelope
from services.common.models import InstanceSpec, InstanceStatus, NodeInfo
from services.common.nettable import Backend, NetTable, NodeRoute, ServiceRoute
from services.common.sla import ServiceSpec
from services.common.store import Store
from services.worker.kernel import KernelError
from services.worker.netcfg import NetConfig, NetConfigError
from services.worker.nftrules import PortMap, parse_ports, remove, render, render_instance, service_rules
from services.worker.overlay import Overlay
from services.worker.ping import echo_request
from services.worker.socklb import BalancerError


@pytest.mark.parametrize(("pool", "prefix", "used", "want"), [
    ("10.18.0.0/15", 20, [], "10.18.0.0/20"),
    ("10.18.0.0/15", 20, ["10.18.0.0/20"], "10.18.16.0/20"),
    ("10.18.0.0/15", 20, ["10.18.16.0/20"], "10.18.0.0/20"),  # a freed block is given again
    ("10.18.16.0/20", 26, ["10.18.16.0/26", "10.18.16.128/26"], "10.18.16.64/26"),
])
def test_free_subnet(pool: str, prefix: int, used: list[str], want: str) -> None:
    assert addressing.free_subnet(pool, prefix, used) == want


def test_pools_run_out_with_a_clear_error() -> None:
    blocks = list(addressing.WORKER_POOL.subnets(new_prefix=addressing.CLUSTER_PREFIX))
    with pytest.raises(addressing.Exhausted, match="no free /20 left in 10.18.0.0/15"):
        addressing.free_subnet(addressing.WORKER_POOL, 20, [str(b) for b in blocks])
    used = [f"10.18.0.{i}" for i in range(2, 63)]
    with pytest.raises(addressing.Exhausted, match="no free address"):
        addressing.instance_ip("10.18.0.0/26", used)


def test_worker_subnet_layout() -> None:
    subnet = "10.18.16.64/26"
    assert addressing.vtep_ip(subnet) == "10.18.16.64"
    assert addressing.gateway(subnet) == "10.18.16.65"
    assert addressing.instance_ip(subnet, []) == "10.18.16.66"
    assert addressing.instance_ip(subnet, ["10.18.16.66"]) == "10.18.16.67"
    assert addressing.vtep_mac(subnet) == "02:00:0a:12:10:40"


def test_service_ips() -> None:
    assert addressing.service_ips("", []) == ("10.30.0.1", "10.30.0.2")
    assert addressing.service_ips("10.30.5.5", ["10.30.0.1"]) == ("10.30.5.5", "10.30.0.2")
    with pytest.raises(addressing.Exhausted, match="already used"):
        addressing.service_ips("10.30.0.1", ["10.30.0.1"])


WEB = ServiceRoute("web", "10.30.0.1", "10.30.0.2", (
    Backend("10.18.0.2", "w1", "c1"), Backend("10.18.0.66", "w2", "c1"), Backend("10.18.16.2", "w3", "c2")))


@pytest.mark.parametrize(("node", "cluster", "want"), [
    ("w1", "c1", ["10.18.0.2"]),  # a replica on the worker itself
    ("w4", "c1", ["10.18.0.2", "10.18.0.66"]),  # none there: those in its cluster
    ("w9", "c9", ["10.18.0.2", "10.18.0.66", "10.18.16.2"]),  # none in its cluster either: all
])
def test_closest(node: str, cluster: str, want: list[str]) -> None:
    assert [b.ip for b in WEB.closest(node, cluster)] == want


def test_table_round_trip_and_merge() -> None:
    table = NetTable({"w1": NodeRoute("c1", "10.18.0.0/26", "192.168.1.1:50103"),
                      "w3": NodeRoute("c2", "10.18.16.0/26", "192.168.1.3:50103")}, {"s1": WEB})
    assert NetTable.from_json(json.loads(json.dumps(table.to_json()))) == table
    fresh = table.with_cluster("c1", {"w2": NodeRoute("c1", "10.18.0.64/26", "192.168.1.2:50103")},
                               {"s1": [Backend("10.18.0.67", "w2", "c1")]},
                               {"s2": ServiceRoute("db", "10.30.0.3", "10.30.0.4")})
    assert set(fresh.nodes) == {"w2", "w3"}, "c1's workers replaced, c2's kept"
    assert [b.ip for b in fresh.services["s1"].backends] == ["10.18.16.2", "10.18.0.67"]
    assert fresh.services["s2"].backends == ()
    with pytest.raises(ValueError, match="malformed"):
        NetTable.from_json({"nodes": {"w1": {"subnet": "x"}}})


def test_ports() -> None:
    assert parse_ports("80", "10.18.0.2") == [PortMap(80, "10.18.0.2", 80)]
    assert parse_ports("8080:80/udp; 9000:9000", "10.18.0.2") == [
        PortMap(8080, "10.18.0.2", 80, "udp"), PortMap(9000, "10.18.0.2", 9000)]


def test_rules() -> None:
    table = NetTable({}, {"s1": WEB, "s2": ServiceRoute("idle", "10.30.0.3", "10.30.0.4")})
    assert service_rules(table, "w1", "c1") == [
        "ip daddr 10.30.0.1 dnat to numgen inc mod 3 map { 0 : 10.18.0.2, 1 : 10.18.0.66, 2 : 10.18.16.2 }",
        "ip daddr 10.30.0.2 dnat to 10.18.0.2",
    ], "a service without running instances gets no rule"
    nodes = {"w1": NodeRoute("c1", "10.18.0.0/26", "192.168.1.1:50103"),
             "w2": NodeRoute("c1", "10.18.0.64/26", "192.168.1.2:50103"),
             "w3": NodeRoute("c2", "10.18.16.0/26", "192.168.2.1:4789")}
    text = render(NetTable(nodes, table.services), "w1", "c1", "10.18.0.0/26", [PortMap(8080, "10.18.0.2", 80)],
                  ("192.168.1.1", 50103))
    assert text.startswith("table ip oakling\ndelete table ip oakling\n"), "one transaction replaces the table"
    assert "tcp dport 8080 dnat to 10.18.0.2:80" in text
    assert "ip saddr 10.18.0.0/26 ct status dnat snat to 10.18.0.1" in text, "replies come back through this worker"
    assert "ip saddr 10.18.0.0/15 ip daddr 10.18.0.0/15 ip daddr != { 10.18.0.0, 10.18.0.1 } notrack" in text, (
        "instance traffic passing through is not tracked; what reaches the worker itself is")
    assert "ip daddr 192.168.1.1 udp dport 50103 notrack" in text, "nor the tunnel from peers"
    assert "ip daddr . udp dport { 192.168.1.2 . 50103, 192.168.2.1 . 4789 } notrack" in text, "the tunnel to peers"

    inside = render_instance(table, "w1", "c1")
    assert inside.startswith("table ip oakling\ndelete table ip oakling\n")
    assert "type nat hook output" in inside
    assert "ip daddr 10.30.0.2 dnat to 10.18.0.2" in inside
    assert "meta l4proto tcp socket wildcard 0 notrack" in inside, "TCP arriving for a (full) socket here"
    assert 'meta l4proto tcp oif != "lo" ip daddr != { 10.30.0.1, 10.30.0.2 } notrack' in inside, (
        "TCP leaving for anything but a service IP")
    assert render_instance(NetTable(), "w1", "c1") == "table ip oakling\ndelete table ip oakling\n", (
        "no service: no table, so the instance's own traffic is not tracked")


class NoSocketMatch:
    """A kernel that, like one built without nft_socket, refuses rulesets using the socket match."""

    def __init__(self) -> None:
        self.rules: dict[str, str] = {}

    def set_instance_rules(self, iid: str, ruleset: str) -> None:
        if "socket wildcard" in ruleset:
            raise KernelError("nft: Could not process rule: No such file or directory")
        self.rules[iid] = ruleset


async def test_instance_rules_without_socket_match(tmp_path: Path) -> None:
    """Where the kernel lacks the socket match, the service DNAT still goes in, with all TCP tracked."""
    kernel = NoSocketMatch()
    overlay = Overlay("w1", kernel, Store(tmp_path / "w.json"))  # type: ignore[arg-type]
    overlay.table, overlay.cluster = NetTable({}, {"s1": WEB}), "c1"
    ruleset = await overlay._program_instance("i1", overlay._instance_ruleset())  # as _program does
    await overlay._program_instance("i2", ruleset)
    assert not overlay.socket_match
    assert kernel.rules["i1"] == kernel.rules["i2"] == render_instance(overlay.table, "w1", "c1", untracked=False)
    assert "dnat to 10.18.0.2" in kernel.rules["i1"]
    assert "notrack" not in kernel.rules["i1"]


class Recording:
    """A kernel that does what it is told (in memory) and a socket balancer that records what it is told,
    failing on demand, as a full map would."""

    def __init__(self) -> None:
        self.host_netns: str | None = None  # as Kernel: the worker's own namespace
        self.services: dict[str, tuple[str, ...]] = {}
        self.namespaces: set[int] = set()
        self.rules: dict[str, str] = {}
        self.closed = False
        self.fail = False

    def ensure_host(self, *_: Any) -> None: ...
    def set_peers(self, *_: Any) -> None: ...
    def set_rules(self, *_: Any) -> None: ...
    def set_instance_rules(self, iid: str, ruleset: str) -> None:
        self.rules[iid] = ruleset
    def detach(self, *_: Any) -> None: ...
    def teardown(self) -> None: ...
    def next_probe(self) -> None: ...
    def direct_subnets(self) -> set[str]:
        return set()

    def attach(self, iid: str, *_: Any) -> str:
        return f"/run/netns/oak-{iid}"

    def cookie(self, iid: str) -> int:
        return 1000 + int(iid[1:])

    def set_services(self, services: dict[str, tuple[str, ...]]) -> None:
        if self.fail:
            raise BalancerError(28, "No space left on device")
        self.services = services

    def add_namespace(self, cookie: int) -> None:
        self.namespaces.add(cookie)

    def remove_namespace(self, cookie: int) -> None:
        self.namespaces.discard(cookie)

    def close(self) -> None:
        self.closed = True


async def test_socket_balancer_told_what_nftables_is(tmp_path: Path) -> None:
    """The balancer gets every service IP's backends as this worker sees them and each attached
    instance's namespace; when it fails, the worker drops it and goes on with nftables alone."""
    fake = Recording()
    overlay = Overlay("w1", fake, Store(tmp_path / "w.json"), "192.0.2.1", balancer=fake)  # type: ignore[arg-type]
    table = NetTable({}, {"web": WEB})
    await overlay.update("10.18.0.0/26", "c1", table.to_json())
    assert fake.services == {"10.30.0.1": ("10.18.0.2", "10.18.0.66", "10.18.16.2"), "10.30.0.2": ("10.18.0.2",)}
    await overlay.attach("i1", "")
    await overlay.attach("i2", "")
    assert fake.namespaces == {1001, 1002}
    assert fake.rules["i2"] == remove(), "with the balancer an instance needs no table"
    await overlay.detach("i1")
    assert fake.namespaces == {1002}
    fake.fail = True
    await overlay.update("10.18.0.0/26", "c1", table.to_json())
    assert fake.closed, "a failing balancer is closed"
    assert overlay.balancer is None, "and forgotten"
    assert "dnat to" in fake.rules["i2"], "the instance translates service IPs itself again"
    await overlay.attach("i3", "")  # and attaching goes on without it
    await overlay.close()


class Published:
    """Records what would go to the broker."""

    def __init__(self) -> None:
        self.sent: dict[str, Any] = {}

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.sent[topic] = envelope.decode(payload, "net").data


def worker(name: str, online: bool = True, overlay: str = "", statuses: dict[str, InstanceStatus] | None = None) -> Any:
    info = NodeInfo(name, 2, 1024, ["process"], overlay=overlay)
    return SimpleNamespace(name=name, online=online, info=info, statuses=statuses or {})


async def test_cluster_hands_out_and_frees_subnets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, session = Store(tmp_path / "c.json"), Published()
    net = ClusterNetwork("c1", store, session)  # type: ignore[arg-type]
    workers = {"w1": worker("w1", overlay="192.168.1.1:50103"), "w2": worker("w2", overlay="192.168.1.2:50103"),
               "sim": worker("sim")}
    await net.allocate(workers)
    assert net.subnets == {}, "no block from the root yet"
    assert net.state(workers) == {"w1": {"subnet": "", "endpoint": "192.168.1.1:50103"},
                                  "w2": {"subnet": "", "endpoint": "192.168.1.2:50103"}}
    await net.on_root({"block": "10.18.16.0/20", "table": {}})
    await net.allocate(workers)
    assert net.subnets == {"w1": "10.18.16.0/26", "w2": "10.18.16.64/26"}, "only overlay workers get one"

    spec = InstanceSpec("i1", "u", "web", 0, ServiceSpec("a", "t", "web", "t", "process", ""), "s1", "10.30.0.1",
                        "10.30.0.2")
    workers["w2"].statuses = {"i1": InstanceStatus("RUNNING", ip="10.18.16.66")}
    net.publish(workers, {"i1": spec}, {"i1": "w2"})
    sent = session.sent["oak/nodes/w1/down/net"]
    assert sent["subnet"] == "10.18.16.0/26"
    assert sent["table"]["services"]["s1"]["backends"] == [["10.18.16.66", "w2", "c1"]]

    again = ClusterNetwork("c1", store, Published())  # type: ignore[arg-type]
    await again.load()
    assert (again.block, again.subnets) == ("10.18.16.0/20", net.subnets), "kept across restarts"

    workers["w1"].online = False
    await net.allocate(workers)
    monkeypatch.setattr(cluster_network, "HOLD", 0.0)
    await net.allocate(workers)
    assert "w1" not in net.subnets, "a worker gone for longer than HOLD frees its subnet"
    store.close()


async def test_services_get_ips_that_are_freed_with_them(tmp_path: Path) -> None:
    from services.common.sla import parse_sla
    from services.root.catalog import Catalog, Conflict
    from tests.conftest import sla, sleeper

    store = Store(tmp_path / "root.json")
    catalog = Catalog(store)
    first = await catalog.create_app("u", parse_sla(sla(sleeper("a"), sleeper("b"), app="one"))[0])
    ips = [(catalog.services[s].rr_ip, catalog.services[s].closest_ip) for s in first.services]
    assert ips == [("10.30.0.1", "10.30.0.2"), ("10.30.0.3", "10.30.0.4")]
    with pytest.raises(Conflict, match="10.30.0.3 is already used"):
        await catalog.create_app("u", parse_sla(sla(sleeper("c", addresses={"rr_ip": "10.30.0.3"}), app="two"))[0])
    await catalog.delete_app(first)
    again = await catalog.create_app("u", parse_sla(sla(sleeper("c", addresses={"rr_ip": "10.30.0.3"}), app="two"))[0])
    assert catalog.services[again.services[0]].rr_ip == "10.30.0.3", "freed with the deleted service"
    store.close()


def test_netcfg_direct_routing() -> None:
    assert NetConfig.parse({}).direct_routing == "auto", "direct once probed, unless told otherwise"
    assert NetConfig.parse({"DirectRouting": True}).direct_routing == "on"
    assert NetConfig.parse({"DirectRouting": False}).direct_routing == "off"
    assert NetConfig.parse({"DirectRouting": "auto"}).direct_routing == "auto"
    for wrong in ("yes", 1):
        with pytest.raises(NetConfigError, match='DirectRouting: expected true, false or "auto"'):
            NetConfig.parse({"DirectRouting": wrong})


def test_direct_routing_probe_is_a_valid_ping() -> None:
    """The probe is an ICMP echo request whose checksum a receiving kernel accepts (the one's complement sum of
    the whole message is all ones)."""
    packet = echo_request(0x1234, 7)
    assert packet[:2] == b"\x08\x00", "type 8, code 0"
    assert struct.unpack("!HH", packet[4:8]) == (0x1234, 7)
    total = sum(struct.unpack(f"!{len(packet) // 2}H", packet))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF
