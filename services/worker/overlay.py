"""The worker's part of the overlay: its instances' addresses, and its kernel kept in line with the net table.

The cluster sends the worker its subnet and the net table (retained ``net``); instances are attached
as they start and detached when they are removed. Instance IPs are kept in the store, so a worker
restarted after ``kill -9`` gives every adopted instance the address it had. When the cluster is
unreachable nothing is torn down: the kernel keeps routing with what it was last told.

Service IPs are translated at the socket where the kernel allows (:mod:`services.worker.socklb`, told
the same net table), which spares a connection's packets any translation or tracking; instances then
need no nftables table, and the worker's own table translates what the balancer does not see. Where
it cannot run, each instance's namespace gets the DNAT table instead. Peers due for a direct routing
probe (``auto``) are probed again on a timer, and the instances' full-size routes follow the result.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from services.common import addressing
from services.common.nettable import NetTable, NodeRoute
from services.common.store import Store
from services.worker import nftrules
from services.worker.kernel import Kernel, KernelError
from services.worker.socklb import SocketBalancer

log = logging.getLogger(__name__)
TABLE = "net"
SUBNET_WAIT = 15.0


@dataclass(frozen=True)
class Attachment:
    """An instance's place on the overlay."""

    netns: str
    ip: str
    gateway: str
    host: str = ""  # the namespace of the worker's side of the overlay, where *ip* is reached from ("": its own)


class Network(Protocol):
    """What the engine and the worker need of the overlay, in process or behind the NetManager."""

    async def endpoint(self) -> str:
        """This worker's VXLAN endpoint ``ip:port``."""

    async def update(self, subnet: str, cluster: str, table: dict[str, Any]) -> None:
        """Take the subnet and net table the cluster sent."""

    async def attach(self, iid: str, ports: str) -> Attachment:
        """Give instance *iid* its namespace and IP, publishing *ports* (the SLA's ``port``)."""

    async def detach(self, iid: str) -> None:
        """Take instance *iid* off the overlay."""


class Overlay:
    """The overlay on this worker (the :class:`Network` that does the work)."""

    def __init__(self, node: str, kernel: Kernel, store: Store, public_address: str = "auto",
                 port: int = 50103, balancer: SocketBalancer | None = None) -> None:
        self.node, self.kernel, self.store, self.port = node, kernel, store, port
        self.balancer = balancer  # translates service IPs at the socket, where the kernel allows
        self.cookies: dict[str, int] = {}  # each attached instance's netns cookie, for the balancer
        self.public_address = public_address
        self.subnet = ""
        self.cluster = ""
        self.table = NetTable()
        self.attached: dict[str, dict[str, str]] = {}
        self.instance_rules: dict[str, str] = {}  # the ruleset last put in each instance's namespace
        self.socket_match = True  # False on a kernel without nftables' socket match: all TCP is tracked
        self._subnet_known = asyncio.Event()
        self._lock = asyncio.Lock()
        self._reprobe: asyncio.TimerHandle | None = None  # peers due for a direct routing probe
        self._direct: set[str] = set()  # the subnets the instances reach at full size (no VXLAN)
        self._tasks: set[asyncio.Task[None]] = set()

    async def _call(self, fn: Any, *args: Any) -> Any:
        async with self._lock:  # one kernel change at a time, off the event loop
            return await asyncio.to_thread(fn, *args)

    async def start(self) -> None:
        """Load the instances' addresses of a previous run and settle the public address."""
        self.attached = {iid: dict(doc) for iid, doc in (await self.store.load(TABLE)).items()}
        if self.public_address == "auto":
            self.public_address = await self._call(self.kernel.public_address)

    async def endpoint(self) -> str:
        """This worker's VXLAN endpoint ``ip:port``."""
        return f"{self.public_address}:{self.port}"

    async def update(self, subnet: str, cluster: str, table: dict[str, Any]) -> None:
        """Set up for *subnet* if it is new, then program routes and rules from *table*."""
        parsed = NetTable.from_json(table)
        if subnet != self.subnet:
            if self.subnet:
                log.warning("the cluster moved this worker from %s to %s; instances get new IPs on restart",
                            self.subnet, subnet)
            await self._call(self.kernel.ensure_host, subnet, self.public_address, self.port)
            self.subnet = subnet
            log.info("overlay up: subnet %s, endpoint %s", subnet, await self.endpoint())
        self.cluster, self.table = cluster, parsed
        self._subnet_known.set()
        await self._program()

    def _peers(self) -> dict[str, NodeRoute]:
        """The other workers of the net table."""
        return {name: route for name, route in self.table.nodes.items() if name != self.node}

    async def _program(self) -> None:
        peers = self._peers()
        ports = [m for doc in self.attached.values() for m in nftrules.parse_ports(doc.get("port", ""), doc["ip"])]
        ruleset = nftrules.render(self.table, self.node, self.cluster, self.subnet, ports,
                                  (self.public_address, self.port))
        await self._set_peers(peers)
        await self._call(self.kernel.set_rules, ruleset)
        if self.balancer:
            try:
                self.balancer.set_services(nftrules.backend_ips(self.table, self.node, self.cluster))
            except OSError as exc:
                self._drop_balancer(exc)
        ruleset = self._instance_ruleset()  # rendered once for all of them
        for iid in list(self.attached):
            ruleset = await self._program_instance(iid, ruleset)

    async def _set_peers(self, peers: dict[str, NodeRoute]) -> None:
        """Route to *peers* (and the instances to those reached directly at full size), and come back when
        a peer is due to be probed for direct routing again."""
        await self._call(self.kernel.set_peers, peers)
        direct = self.kernel.direct_subnets()
        if direct != self._direct:
            self._direct = direct
            for iid in list(self.attached):
                try:
                    await self._call(self.kernel.set_instance_paths, iid, self.subnet, direct)
                except (KernelError, OSError) as exc:
                    log.warning("cannot route instance %s: %s", iid, exc)  # its namespace is gone or going
        if self._reprobe:
            self._reprobe.cancel()
        delay = self.kernel.next_probe()
        self._reprobe = None if delay is None else asyncio.get_running_loop().call_later(delay, self._probe_again)

    def _probe_again(self) -> None:
        task = asyncio.create_task(self._reprobe_peers())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reprobe_peers(self) -> None:
        try:
            await self._set_peers(self._peers())
        except (KernelError, OSError) as exc:
            log.warning("cannot probe the other workers for direct routing: %s", exc)

    def _instance_ruleset(self) -> str:
        """What every instance's namespace holds (the same for all of them): the service IPs' translation.
        With the socket balancer there is none: the namespace has no table, so no hook and no conntrack
        slows its packets, and what the balancer does not translate (UDP, processes outside the
        instance's cgroup) the worker's own table translates on the way through, as for VMs."""
        if self.balancer:
            return nftrules.remove()
        return nftrules.render_instance(self.table, self.node, self.cluster, self.socket_match)

    async def _program_instance(self, iid: str, ruleset: str) -> str:
        """Put *ruleset* (:meth:`_instance_ruleset`) in instance *iid*'s namespace, unless it is there
        already; return the ruleset for the next instance (the tracked one once this kernel refused the
        socket match)."""
        if self.instance_rules.get(iid) == ruleset:
            return ruleset
        try:
            await self._call(self.kernel.set_instance_rules, iid, ruleset)
        except KernelError as exc:
            tracked = None if self.balancer else nftrules.render_instance(self.table, self.node, self.cluster,
                                                                         untracked=False)
            if tracked is None or tracked == ruleset or not await self._try_rules(iid, tracked):
                log.warning("cannot program instance %s: %s", iid, exc)  # its namespace is gone or going
                return ruleset
            self.socket_match, ruleset = False, tracked  # a kernel without nft_socket
            log.warning("this kernel refused nftables' socket match (%s); instances track all their TCP", exc)
        self.instance_rules[iid] = ruleset
        return ruleset

    async def _try_rules(self, iid: str, ruleset: str) -> bool:
        """Put *ruleset* in instance *iid*'s namespace; False if the kernel refused it."""
        try:
            await self._call(self.kernel.set_instance_rules, iid, ruleset)
        except KernelError:
            return False
        return True

    async def attach(self, iid: str, ports: str) -> Attachment:
        """Give instance *iid* its namespace and IP (the same IP as before when it had one)."""
        try:
            await asyncio.wait_for(self._subnet_known.wait(), SUBNET_WAIT)
        except TimeoutError:
            raise RuntimeError("no overlay subnet from the cluster yet") from None
        doc = self.attached.get(iid)
        if doc is None or doc.get("subnet") != self.subnet:
            used = {d["ip"] for d in self.attached.values() if d.get("subnet") == self.subnet}
            ip = addressing.instance_ip(self.subnet, used)
            doc = {"ip": ip, "subnet": self.subnet, "port": ports}
            self.attached[iid] = doc
            await self.store.put(TABLE, iid, doc)
        try:
            path = await self._call(self.kernel.attach, iid, doc["ip"], self.subnet)
            balanced = self.balancer is not None
            if self.balancer:
                try:
                    self.cookies[iid] = await self._call(self.kernel.cookie, iid)
                    self.balancer.add_namespace(self.cookies[iid])
                except OSError as exc:
                    self._drop_balancer(exc)
            self.instance_rules.pop(iid, None)
            if ports or balanced != (self.balancer is not None):  # (every instance needs its table again)
                await self._program()
            else:
                await self._program_instance(iid, self._instance_ruleset())
        except (KernelError, OSError) as exc:
            raise RuntimeError(f"cannot attach to the overlay: {exc}") from None
        return Attachment(path, doc["ip"], addressing.gateway(self.subnet), self.kernel.host_netns or "")

    def _drop_balancer(self, exc: OSError) -> None:
        """Leave service IPs to nftables alone from now on (the balancer failed: a full map, an old kernel)."""
        log.warning("the socket balancer failed (%s); service IPs are translated by nftables only", exc)
        if self.balancer:
            self.balancer.close()
        self.balancer = None

    async def detach(self, iid: str) -> None:
        """Remove instance *iid*'s namespace and free its IP."""
        doc = self.attached.pop(iid, None)
        self.instance_rules.pop(iid, None)
        cookie = self.cookies.pop(iid, None)
        reprogram = bool(doc and doc.get("port"))  # its published ports go
        if self.balancer and cookie is not None:
            try:
                self.balancer.remove_namespace(cookie)
            except OSError as exc:
                self._drop_balancer(exc)
                reprogram = True  # every instance needs its table again
        await self._call(self.kernel.detach, iid)
        await self.store.delete(TABLE, iid)
        if reprogram and self.subnet:
            await self._program()

    async def close(self) -> None:
        """Remove everything this worker made in the kernel (after its instances have stopped)."""
        if self._reprobe:
            self._reprobe.cancel()
        for task in list(self._tasks):
            task.cancel()
        for iid in list(self.attached):
            await self.detach(iid)
        await self._call(self.kernel.teardown)
        if self.balancer:
            self.balancer.close()
