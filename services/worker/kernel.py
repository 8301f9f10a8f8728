"""The overlay's kernel side, through pyroute2, ``nft`` and ``sysctl``: synchronous, one call per change.

In the *host* namespace (the worker's own, or a named one for tests that play several hosts on one
machine) it keeps a link ``oak0`` (a bridge without ports) holding the gateway address, a VXLAN device ``oakvx`` on the
worker's public address, routes to the other workers' subnets through it, and the ``ip oakling``
nftables table. Each instance gets a namespace ``oak-<iid>`` with ``eth0``, its IP and a default
route to the gateway; the other end of that veth stays in the host namespace, unbridged, with a
``/32`` route to the instance and proxy ARP (Calico style). Traffic between instances is routed,
never bridged: one hop less per side, and no bridge netfilter. Addresses of the worker's subnet that
no instance holds are unreachable rather than sent to the host's default route.

An instance's link has the underlay's MTU, but its routes into the overlay's pools carry the
underlay's MTU less the 50 bytes VXLAN adds (so wrapped packets are never fragmented), except the
routes to the subnets of workers reached directly (:meth:`Kernel.set_instance_paths`), whose packets
are not wrapped and keep the full size; traffic leaving the overlay keeps it too. Remote workers
are reached flannel-style: a route ``subnet via <its .0> dev oakvx onlink``, a permanent neighbour
entry giving that address the worker's derived MAC, and a forwarding entry sending that MAC to its
public endpoint. No learning, no flooding. With direct routing (flannel's
``DirectRouting``), a worker whose public address is on the same link as this one's is reached
without VXLAN: ``subnet via <its public address>`` on the underlay, no wrapping at all. ``on`` does
so for every such worker; ``auto`` (the default) only once a ping from this worker's VXLAN address
to the other's, sent straight over the link, has been answered: proof that the link carries overlay
addresses (clouds that check addresses drop it, and the worker stays on VXLAN). Unanswered probes
are tried again later (1 s, doubling up to 5 minutes); a direct peer is probed again every minute,
and goes back to VXLAN after three misses in a row (1 s apart). ``off`` wraps everything.

Namespaces are entered by the calling thread alone (``setns``, then back), and created with
``ip netns add``: pyroute2's own way forks the (asyncio) process, and a signal reaching such a fork
would reach the worker's event loop as if the worker itself had been asked to stop. Tools run for a
namespace (``nft``) are started from such a thread, so they are born inside it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netns import setns

from services.common import addressing
from services.common.addressing import SERVICE_POOL, WORKER_POOL
from services.common.nettable import NodeRoute
from services.worker.netcfg import DirectRouting
from services.worker.nftrules import GATEWAY, VXLAN, remove
from services.worker.ping import answering
from services.worker.socklb import netns_cookie

PROBE_FIRST, PROBE_MAX, PROBE_WAIT = 1.0, 300.0, 0.3  # direct routing probes: first retry, longest, answer wait
RECHECK, MISSES = 60.0, 3  # a direct peer is probed every minute; back to VXLAN after 3 misses in a row
VNI = 4218
VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IP 20 + UDP 8 + VXLAN 8
ONLINK = 4  # RTNH_F_ONLINK
SCOPE_LINK = 253
UNREACHABLE = 7  # RTN_UNREACHABLE
NETNS_DIR = "/run/netns"
PREFIX = "oak-"
log = logging.getLogger(__name__)


class KernelError(RuntimeError):
    """The kernel refused a change; the message says which."""


def namespace_of(iid: str) -> str:
    """The name of an instance's network namespace."""
    return f"{PREFIX}{iid}"


def overlay_unavailable() -> str:
    """Why this machine cannot run the overlay ("" when it can)."""
    if os.geteuid() != 0:
        return "the overlay needs root (network namespaces, VXLAN, nftables)"
    missing = [tool for tool in ("ip", "nft", "nsenter") if shutil.which(tool) is None]
    return f"missing {', '.join(missing)} (Debian: iproute2, nftables, util-linux)" if missing else ""


def _veth(iid: str) -> str:
    return f"ve-{iid}"[:15]


def namespaces() -> set[str]:
    """The named network namespaces."""
    return set(os.listdir(NETNS_DIR)) if os.path.isdir(NETNS_DIR) else set()


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Move this thread alone into namespace *name* (in /run/netns, or a path; None: stay), and back
    afterwards."""
    if not name:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
        try:
            setns(target, fork=False)
        finally:
            os.close(target)
        try:
            yield
        finally:
            setns(home, fork=False)
    finally:
        os.close(home)


@contextlib.contextmanager
def _inside(name: str | None) -> Iterator[Any]:
    """A netlink socket in namespace *name* (None: the current one); only this thread moves, and back."""
    with entered(name), IPRoute() as ipr:
        yield ipr


def _run(argv: list[str], stdin: str = "", netns: str | None = None) -> None:
    """Run a tool (born inside *netns* when given); raise KernelError with its message when it fails."""
    with entered(netns):
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise KernelError(f"{' '.join(argv[:3])} failed: {done.stderr.strip()[:400]}")


@contextlib.contextmanager
def _as_kernel_error() -> Iterator[None]:
    """Netlink's refusals as KernelError."""
    try:
        yield
    except NetlinkError as exc:
        raise KernelError(str(exc)) from None


def _sysctl(key: str, value: str) -> None:
    """Set ``/proc/sys/net/<key>`` in the namespace this thread is in."""
    with open(f"/proc/sys/net/{key}", "w") as file:
        file.write(value)


class Kernel:
    """Makes the host namespace and instance namespaces look as asked."""

    def __init__(self, host_netns: str | None = None, direct_routing: DirectRouting = "off") -> None:
        self.host_netns = host_netns
        self.direct_routing = direct_routing
        self.peers: dict[str, NodeRoute] = {}
        self.direct: set[str] = set()  # the peers routed without VXLAN
        self.probes: dict[str, tuple[float, float]] = {}  # peer -> (when to probe again, interval): auto mode
        self.checks: dict[str, tuple[float, int]] = {}  # direct peer -> (when to check again, misses in a row)
        self.recheck = RECHECK  # seconds between checks of a direct peer that answers
        self.mtu = 1500 - VXLAN_OVERHEAD
        self.vtep = ""  # this worker's VXLAN address, the source of direct routing probes

    def host(self) -> contextlib.AbstractContextManager[Any]:
        """A netlink socket in the host namespace."""
        return _inside(self.host_netns)

    def _run(self, argv: list[str], stdin: str = "") -> None:
        _run(argv, stdin, self.host_netns)

    # ---- the host ------------------------------------------------------------------------------

    def public_address(self) -> str:
        """The host's address towards the outside: the source of its default route."""
        with self.host() as ipr:
            try:
                routes = ipr.route("get", dst="1.1.1.1")
            except NetlinkError:
                routes = []
            for route in routes:
                if src := route.get_attr("RTA_PREFSRC"):
                    return str(src)
        raise KernelError("NodePublicAddress is 'auto' but this host has no default route; set it in netcfg.json")

    def ensure_host(self, subnet: str, local: str, port: int) -> None:
        """Create (or keep) the gateway link, the VXLAN device, the subnet's routes and forwarding."""
        gateway, vtep = addressing.gateway(subnet), addressing.vtep_ip(subnet)
        with self.host() as ipr:
            self.mtu = self._underlay_mtu(ipr, local) - VXLAN_OVERHEAD
            if not ipr.link_lookup(ifname=GATEWAY):  # a bridge with no ports: it only holds the address
                ipr.link("add", ifname=GATEWAY, kind="bridge")
            link = ipr.link_lookup(ifname=GATEWAY)[0]
            self._set_address(ipr, link, gateway, 32)
            ipr.link("set", index=link, state="up")
            if not ipr.link_lookup(ifname=VXLAN):
                ipr.link("add", ifname=VXLAN, kind="vxlan", vxlan_id=VNI, vxlan_port=port, vxlan_local=local,
                         vxlan_learning=0)
            vxlan = ipr.link_lookup(ifname=VXLAN)[0]
            ipr.link("set", index=vxlan, address=addressing.vtep_mac(subnet), mtu=self.mtu, state="up")
            self._set_address(ipr, vxlan, vtep, 32)
            self.vtep = vtep
            self._forget_subnets(ipr, keep=subnet)
            ipr.route("replace", dst=subnet, type=UNREACHABLE)
            ipr.route("replace", dst=str(SERVICE_POOL), oif=link)
            _sysctl("ipv4/ip_forward", "1")

    @staticmethod
    def _forget_subnets(ipr: Any, keep: str = "", everything: bool = False) -> None:
        """Remove the unreachable routes of overlay subnets other than *keep* (this worker's earlier ones);
        with *everything*, every route into the overlay's pool (the other workers' too)."""
        for route in ipr.get_routes(family=2):
            if not route.get_attr("RTA_DST") or not (everything or route["type"] == UNREACHABLE):
                continue
            dst = f"{route.get_attr('RTA_DST')}/{route['dst_len']}"
            if dst != keep and ipaddress.IPv4Network(dst).subnet_of(WORKER_POOL):
                with contextlib.suppress(NetlinkError):
                    ipr.route("del", dst=dst, type=route["type"])

    @staticmethod
    def _underlay_mtu(ipr: Any, local: str) -> int:
        """The MTU of the link holding *local*: overlay packets must fit in it once wrapped."""
        for address in ipr.get_addr(family=2):
            if address.get_attr("IFA_ADDRESS") == local:
                return int(ipr.get_links(address["index"])[0].get_attr("IFLA_MTU"))
        return 1500

    @staticmethod
    def _set_address(ipr: Any, index: int, address: str, prefix: int) -> None:
        present = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index, family=2)}
        for other, length in present - {(address, prefix)}:
            ipr.addr("del", index=index, address=other, prefixlen=length)
        if (address, prefix) not in present:
            ipr.addr("add", index=index, address=address, prefixlen=prefix)

    def set_peers(self, peers: dict[str, NodeRoute]) -> None:
        """Route to exactly these other workers' subnets: over VXLAN, or directly as ``direct_routing``
        allows (probing, in ``auto``, the new peers on this link and those due again)."""
        with self.host() as ipr:
            found = ipr.link_lookup(ifname=VXLAN)
            if not found:
                raise KernelError("the overlay is not set up yet")
            vxlan = found[0]
            for name, route in self.peers.items():
                if peers.get(name) != route:
                    self._forget_peer(ipr, vxlan, route)
                    self.direct.discard(name)
                    self.probes.pop(name, None)
                    self.checks.pop(name, None)
            changed = {name for name, route in peers.items() if self.peers.get(name) != route}
            for name in changed:
                self._wrap(ipr, vxlan, peers[name])
            now = time.monotonic()
            due = {name for name, (when, _) in {**self.probes, **self.checks}.items() if when <= now and name in peers}
            links = {} if self.direct_routing == "off" else {
                name: link for name in changed | due if (link := self._on_link(ipr, peers[name].address)) is not None}
            for name in due - set(links):  # no longer on this link: VXLAN, and nothing to probe
                self.probes.pop(name, None)
                self.checks.pop(name, None)
                if name in self.direct:
                    self._wrap(ipr, vxlan, peers[name])
                    self.direct.discard(name)
            if self.direct_routing == "on":
                direct = set(links)
            else:
                answered = self._probe(ipr, peers, links)
                direct = self._schedule(ipr, vxlan, peers, set(links), answered, now)
            for name in direct:
                ipr.route("replace", dst=peers[name].subnet, gateway=peers[name].address, oif=links[name])
            self.direct |= direct
        self.peers = dict(peers)

    def _schedule(self, ipr: Any, vxlan: int, peers: dict[str, NodeRoute], probed: set[str], answered: set[str],
                  now: float) -> set[str]:
        """Act on a round of probes (``auto``): the newly answering peers, to be routed directly. A direct
        peer that stops answering goes back to VXLAN after MISSES probes in a row; the others are
        probed again, sooner or later."""
        newly = set()
        for name in probed:
            if name in self.direct:  # a check of a direct peer
                misses = 0 if name in answered else self.checks.get(name, (0.0, 0))[1] + 1
                if misses < MISSES:
                    self.checks[name] = (now + (self.recheck if misses == 0 else PROBE_FIRST), misses)
                    continue
                log.warning("worker %s no longer answers over the link: back to VXLAN", name)
                self._wrap(ipr, vxlan, peers[name])
                self.direct.discard(name)
                self.checks.pop(name, None)
                self.probes[name] = (now + PROBE_FIRST, PROBE_FIRST)
            elif name in answered:
                newly.add(name)
                self.probes.pop(name, None)
                self.checks[name] = (now + self.recheck, 0)
            else:
                interval = min(self.probes.get(name, (0.0, PROBE_FIRST / 2))[1] * 2, PROBE_MAX)
                self.probes[name] = (now + interval, interval)
        return newly

    @staticmethod
    def _wrap(ipr: Any, vxlan: int, route: NodeRoute) -> None:
        """Reach *route*'s subnet over VXLAN: a route via its VXLAN address, its MAC, its endpoint."""
        vtep, mac = addressing.vtep_ip(route.subnet), addressing.vtep_mac(route.subnet)
        ipr.neigh("replace", dst=vtep, lladdr=mac, ifindex=vxlan, state="permanent")
        with contextlib.suppress(NetlinkError):
            ipr.fdb("del", ifindex=vxlan, lladdr=mac)
        ipr.fdb("append", ifindex=vxlan, lladdr=mac, dst=route.address, port=route.port)
        ipr.route("replace", dst=route.subnet, gateway=vtep, oif=vxlan, flags=ONLINK)

    def _probe(self, ipr: Any, peers: dict[str, NodeRoute], links: dict[str, int]) -> set[str]:
        """The peers among *links* whose VXLAN address answers a ping sent to it straight over the link (a
        ``/32`` route for the probe alone)."""
        targets = {addressing.vtep_ip(peers[name].subnet): name for name in links}
        if not targets or not self.vtep:
            return set()
        for target, name in targets.items():
            ipr.route("replace", dst=f"{target}/32", gateway=peers[name].address, oif=links[name])
        try:
            answered = {targets[ip] for ip in answering(set(targets), self.vtep, PROBE_WAIT)}
        except OSError:
            answered = set()
        finally:
            for target, name in targets.items():
                with contextlib.suppress(NetlinkError):
                    ipr.route("del", dst=f"{target}/32", gateway=peers[name].address, oif=links[name])
        return answered

    def next_probe(self) -> float | None:
        """Seconds until a peer is due to be probed again (None: no probe pending)."""
        pending = [*self.probes.values(), *self.checks.values()]  # (copied: set_peers runs in a thread)
        soonest = min((when for when, _ in pending), default=None)
        return None if soonest is None else max(0.0, soonest - time.monotonic())

    @staticmethod
    def _on_link(ipr: Any, address: str) -> int | None:
        """The underlay link reaching *address* with no router in between (None: it is further away)."""
        try:
            found = ipr.route("get", dst=address)
        except NetlinkError:
            return None
        for route in found:
            if route["type"] == 1 and not route.get_attr("RTA_GATEWAY"):  # RTN_UNICAST, directly connected
                return int(route.get_attr("RTA_OIF"))
        return None

    @staticmethod
    def _forget_peer(ipr: Any, vxlan: int, route: NodeRoute) -> None:
        vtep, mac = addressing.vtep_ip(route.subnet), addressing.vtep_mac(route.subnet)
        for call in (lambda: ipr.route("del", dst=route.subnet),
                     lambda: ipr.neigh("del", dst=vtep, lladdr=mac, ifindex=vxlan),
                     lambda: ipr.fdb("del", ifindex=vxlan, lladdr=mac, dst=route.address)):
            with contextlib.suppress(NetlinkError):
                call()

    def set_rules(self, ruleset: str) -> None:
        """Replace the host's nftables table with *ruleset* in one transaction."""
        self._run(["nft", "-f", "-"], ruleset)

    @staticmethod
    def set_instance_rules(iid: str, ruleset: str) -> None:
        """Replace the nftables table inside instance *iid*'s namespace with *ruleset*; conntrack there
        starts TCP entries only from a SYN (see :func:`nftrules._untracked_tcp`)."""
        _run(["nft", "-f", "-"], ruleset, namespace_of(iid))
        with entered(namespace_of(iid)), contextlib.suppress(FileNotFoundError):  # no conntrack loaded yet
            _sysctl("netfilter/nf_conntrack_tcp_loose", "0")

    def teardown(self) -> None:
        """Remove the gateway link, the VXLAN device, the subnet's routes and the nftables table."""
        with self.host() as ipr:
            for name in (VXLAN, GATEWAY):
                for index in ipr.link_lookup(ifname=name):
                    ipr.link("del", index=index)
            self._forget_subnets(ipr, everything=True)  # directly routed peers are not on a link removed above
        with contextlib.suppress(KernelError):
            self._run(["nft", "-f", "-"], remove())
        self.peers, self.direct, self.probes, self.checks = {}, set(), {}, {}

    # ---- instances -----------------------------------------------------------------------------

    def attach(self, iid: str, ip: str, subnet: str) -> str:
        """Give instance *iid* a namespace with *ip*, routed from the host; return the namespace's path."""
        name, veth = namespace_of(iid), _veth(iid)
        prefix = ipaddress.ip_network(subnet).prefixlen
        if name not in namespaces():
            _run(["ip", "netns", "add", name])
        with self.host() as ipr:
            if not ipr.link_lookup(ifname=GATEWAY):
                raise KernelError("the overlay is not set up yet")
            if not ipr.link_lookup(ifname=veth):
                ipr.link("add", ifname=veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": name})
            index = ipr.link_lookup(ifname=veth)[0]
            ipr.link("set", index=index, master=0, mtu=self.mtu + VXLAN_OVERHEAD, state="up")  # (once bridged)
            _sysctl(f"ipv4/conf/{veth}/proxy_arp", "1")  # answers for the gateway and the other instances
            _sysctl(f"ipv4/neigh/{veth}/proxy_delay", "0")
            ipr.route("replace", dst=f"{ip}/32", oif=index, scope=SCOPE_LINK)
        with _inside(name) as inner:
            inner.link("set", index=inner.link_lookup(ifname="lo")[0], state="up")
            eth0 = inner.link_lookup(ifname="eth0")[0]
            self._set_address(inner, eth0, ip, prefix)
            inner.link("set", index=eth0, mtu=self.mtu + VXLAN_OVERHEAD, state="up")
            gateway = addressing.gateway(subnet)
            inner.route("replace", dst="0.0.0.0/0", gateway=gateway)
            for pool in (WORKER_POOL, SERVICE_POOL):  # what may be wrapped: room for VXLAN's header
                inner.route("replace", dst=str(pool), gateway=gateway, metrics={"mtu": self.mtu})
        self.set_instance_paths(iid, subnet, self.direct_subnets())
        return os.path.join(NETNS_DIR, name)

    @staticmethod
    def cookie(iid: str) -> int:
        """The netns cookie of instance *iid*'s namespace (how the socket balancer knows it)."""
        with entered(namespace_of(iid)):
            return netns_cookie()

    def direct_subnets(self) -> set[str]:
        """The subnets of the workers reached without VXLAN."""
        return {self.peers[name].subnet for name in self.direct if name in self.peers}

    @staticmethod
    def set_instance_paths(iid: str, subnet: str, direct: set[str]) -> None:
        """Give instance *iid* (of *subnet*) a full-size route to each subnet in *direct* (workers reached
        unwrapped), and none to others: those fall under the overlay pool's route, sized for VXLAN."""
        gateway = addressing.gateway(subnet)
        with _inside(namespace_of(iid)) as inner, _as_kernel_error():
            present = set()
            for route in inner.get_routes(family=2):
                dst = route.get_attr("RTA_DST")
                if dst and route["dst_len"] == addressing.WORKER_PREFIX and route.get_attr("RTA_GATEWAY"):
                    present.add(f"{dst}/{route['dst_len']}")
            for gone in present - direct:
                with contextlib.suppress(NetlinkError):
                    inner.route("del", dst=gone, gateway=gateway)
            for new in direct - present:
                inner.route("replace", dst=new, gateway=gateway)

    def detach(self, iid: str) -> None:
        """Remove instance *iid*'s namespace (its veth goes with it)."""
        name = namespace_of(iid)
        if name in namespaces():
            _run(["ip", "netns", "del", name])
        with self.host() as ipr:
            for index in ipr.link_lookup(ifname=_veth(iid)):
                with contextlib.suppress(NetlinkError):
                    ipr.link("del", index=index)
