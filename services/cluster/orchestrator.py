"""The cluster orchestrator: places the root's instances on workers and reports back.

It reads, on its own broker, the root's desired map (``oak/downstream/desired``, delivered by the
bridge, and its changes on ``.../desired/delta``) and every worker's ``avail``/``info``/``state``; it
writes each worker's desired map and the cluster's ``info``/``state`` for the root (``oak/upstream/...``;
the state's changes as deltas on ``oak/upstream/state/delta``, see ``services/common/delta.py``).

This class holds the cluster's state and orders its effects (memory, then disk, then the network); the
decisions are plain logic elsewhere: where instances go (services/cluster/placement.py), the state
document (reporting.py), the workers' latency peers (peers.py) and the overlay (network.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from services.cluster.network import ClusterNetwork
from services.cluster.peers import rings
from services.cluster.placement import NodeView, plan, summaries, volume_note
from services.cluster.reporting import StateReport, status_of
from services.common import channels, models
from services.common.delta import Change, DeltaPublisher, DeltaReceiver
from services.common.inbox import Inbox, Received
from services.common.models import InstanceSpec, InstanceStatus, NodeInfo, NodeState, NodeSummary
from services.common.mqtt import MqttSession
from services.common.plugin_api import Candidate
from services.common.retained import LastSent
from services.common.scheduling import Profile
from services.common.store import Store
from services.common.throttle import ReportThrottle, Trigger

log = logging.getLogger(__name__)

DESIRED, ASSIGNED = "desired", "assigned"
STATE_INTERVAL = 2.0
RETRY_INTERVAL = 1.0
# A placement pass runs PLACE_COALESCE after it is asked for (changes arriving together share it) while the
# cluster keeps up with its messages; while messages wait for it (a burst of deploys, many workers lost)
# passes run PLACE_SPACING apart, so what arrives meanwhile shares a pass.
PLACE_COALESCE = 0.002
PLACE_SPACING = 0.05
STARTUP_GRACE = 10.0
# The state report is throttled by its own cost (ReportThrottle): the next one waits REPORT_COST_FACTOR
# times what the last one took, and while messages wait for the cluster, at least REPORT_MIN_INTERVAL.
REPORT_MIN_INTERVAL = 0.2
REPORT_COST_FACTOR = 10.0


class ClusterOrchestrator:
    """Desired instances from the root, placed on workers; observed statuses, reported upward."""

    def __init__(self, name: str, store: Store, profile: Profile, session: MqttSession, location: str = "",
                 cert_expiry: Callable[[str], float] = lambda _node: 0.0) -> None:
        self.name = name
        self.cert_expiry = cert_expiry  # when a worker's certificate ends (0: it has none)
        self.location = location
        self.store = store
        self.profile = profile
        self.session = session
        self.nodes: dict[str, NodeView] = {}
        self.desired: dict[str, InstanceSpec] = {}
        self.assigned: dict[str, str] = {}
        self.unplaced: dict[str, str] = {}
        self.notes: dict[str, str] = {}  # what the status of a placed instance adds (its volumes start empty)
        self._published = LastSent()  # each worker's desired map (its instance ids)
        self._peers_published = LastSent()  # each worker's latency peers
        self._peers_dirty = False
        self._changed = asyncio.Event()
        self._silent_after: float | None = None
        self._held_until = 0.0  # while this cluster restarts its own broker (hold_offline)
        self._documents = StateReport(name)
        pacing = ReportThrottle(PLACE_SPACING, factor=0.0, coalesce=PLACE_COALESCE, idle_coalesce=PLACE_COALESCE)
        self._placements = Trigger(lambda: self.place_pending(), pacing, "a placement pass", self._busy)
        self._maps_due: set[str] = set()  # workers whose desired maps changed in memory, published once on disk
        # Instances taken off a worker that went offline, by that worker: its retained map keeps listing
        # them until they run elsewhere, so a worker that comes back (kill -9 and restart) keeps and adopts
        # them when they could not be placed elsewhere, and stops them when they were.
        self._left_on: dict[str, str] = {}
        self._placing_lock = asyncio.Lock()
        self._desired_in = DeltaReceiver(channels.CLUSTER_DESIRED.sections)
        self.network = ClusterNetwork(name, store, session)

    # ---- start-up ----------------------------------------------------------------------------

    async def restore(self) -> None:
        """Load the desired map and assignments of a previous run and republish workers' maps."""
        for iid, doc in (await self.store.load(DESIRED)).items():
            with contextlib.suppress(ValueError):
                self.desired[iid] = models.load(InstanceSpec, doc)
        self.assigned = {
            iid: doc["node"] for iid, doc in (await self.store.load(ASSIGNED)).items() if iid in self.desired
        }
        self._desired_in.docs["instances"] = {iid: spec.doc for iid, spec in self.desired.items()}
        for node, mine in self._maps(set(self.assigned.values())).items():  # as stored
            self.nodes.setdefault(node, NodeView(node))
            self._publish_map(node, mine)
        self._silent_after = time.monotonic() + STARTUP_GRACE if self.assigned else None
        await self.network.load()

    def listen(self, inbox: Inbox) -> None:
        """Register the channels this orchestrator reads: the root's desired map and net, the workers' own."""
        inbox.on(channels.downstream(channels.CLUSTER_DESIRED), self.take_desired)
        inbox.on(channels.downstream(channels.CLUSTER_DESIRED_DELTA), self.take_desired_delta)
        inbox.on(channels.downstream(channels.CLUSTER_NET), self.take_net)
        inbox.on(channels.NODE_AVAIL, self.take_avail)
        inbox.on(channels.NODE_INFO, self.take_info)
        inbox.on(channels.NODE_STATE, self.take_state)

    # ---- messages ----------------------------------------------------------------------------

    async def take_desired(self, desired: Received[dict[str, Any]]) -> None:
        """The root's whole desired map (retained; empty payload = nothing wanted)."""
        data = desired.body if desired.body is not None else {"instances": {}}
        models.load_desired(data)  # all valid, or nothing changes
        await self._take_desired(self._desired_in.whole(data))

    async def take_desired_delta(self, delta: Received[dict[str, Any]]) -> None:
        """A change of the root's desired map."""
        if delta.body is not None:
            await self._take_desired(self._desired_in.delta(delta.body))

    async def take_net(self, net: Received[dict[str, Any]]) -> None:
        """The root's overlay block and net table."""
        if net.body is not None:
            await self.network.on_root(net.body)
            self._changed.set()

    async def take_avail(self, avail: Received[bool]) -> None:
        """A worker came online or went offline (its last will)."""
        await self._on_avail(self._node(avail.sender), bool(avail.body))

    async def take_info(self, info: Received[NodeInfo]) -> None:
        """A worker's static facts."""
        if info.body is not None:
            self._node(info.sender).info = info.body
            self._peers_dirty = True
            self._changed.set()

    async def take_state(self, state: Received[NodeState]) -> None:
        """A worker's live facts."""
        if state.body is not None:
            self._on_state(self._node(state.sender), state.body)

    def _node(self, name: str) -> NodeView:
        return self.nodes.setdefault(name, NodeView(name))

    async def _take_desired(self, change: Change) -> None:
        """Apply what changed in the root's desired map: only the changed specs are read and stored."""
        if not change:
            return
        put = models.load_desired({"instances": change.put.get("instances", {})})
        put = {iid: spec for iid, spec in put.items() if self.desired.get(iid) != spec}  # unchanged: not stored again
        gone = [iid for iid in change.drop.get("instances", ()) if iid in self.desired]
        self.desired.update(put)
        for iid in gone:
            del self.desired[iid]
        touched = {self.assigned.pop(iid) for iid in gone if iid in self.assigned}
        touched |= {self._left_on.pop(iid) for iid in gone if iid in self._left_on}
        for iid in gone:
            self.unplaced.pop(iid, None)
            self.notes.pop(iid, None)
        # In memory now, on disk with the placement pass's one write (place_soon): the message dispatch (the
        # states of 1,000 workers among what waits behind it) never waits for the store, and deltas arriving
        # meanwhile share one pass. What others hear of it (workers' maps, the state report) waits for that write.
        self.store.apply(DESIRED, {i: spec.doc for i, spec in put.items()}, tuple(gone))
        self.store.apply(ASSIGNED, {}, tuple(gone))
        self._maps_due |= touched
        self.place_soon()

    async def _on_avail(self, node: NodeView, online: bool) -> None:
        was = node.online
        node.online = online
        if online and not was:
            log.info("worker %s is online", node.name)
            self._peers_dirty = True
        if not online and was:
            if time.monotonic() < self._held_until:
                log.info("worker %s went offline while its broker restarts: it has until then to come back",
                         node.name)
                self._silent_after = self._held_until  # then _give_up_on_silent_workers moves what is left
            else:
                await self._move_off(node, "went offline")
        self._changed.set()

    async def _move_off(self, node: NodeView, why: str) -> None:
        """Take every instance off *node* and place it elsewhere."""
        lost = [iid for iid, n in self.assigned.items() if n == node.name]
        log.warning("worker %s %s; moving its %d instance(s)", node.name, why, len(lost))
        for iid in lost:
            del self.assigned[iid]
            self._left_on[iid] = node.name
        # In memory now, on disk with the next write (the new placements' one); a restart before that
        # finds the worker silent and moves them then. Not waiting here lets the avails of many workers
        # lost at once be handled one after the other quickly, and placed together.
        self.store.apply(ASSIGNED, {}, tuple(lost))
        node.statuses = {}
        self._peers_dirty = True
        self.place_soon()
        self._changed.set()

    def _busy(self) -> bool:
        """Whether messages wait for this cluster: then reports and placements batch."""
        return self.session.backlog > 0

    def place_soon(self) -> None:
        """Have :meth:`place_pending` run shortly (once for what several callers lost at nearly the same time)."""
        self._placements.pull()

    @property
    def _placing(self) -> asyncio.Task[None] | None:
        return self._placements.task

    async def placed(self) -> None:
        """Wait until the placement :meth:`place_soon` asked for is done and on disk (tests, shutdown)."""
        await self._placements.settled()

    def hold_offline(self, seconds: float) -> None:
        """Give workers *seconds* to come back before moving their instances: this cluster restarts its
        broker (which sends every worker's last will) on purpose."""
        self._held_until = time.monotonic() + seconds

    async def _give_up_on_silent_workers(self) -> None:
        """After a restart, a worker that held instances and has not come back within STARTUP_GRACE is
        treated as gone (its last will went to the broker that died with this cluster)."""
        if self._silent_after is None or time.monotonic() < self._silent_after:
            return
        self._silent_after = None
        for node in list(self.nodes.values()):
            if not node.online and node.name in set(self.assigned.values()):
                await self._move_off(node, f"has not come back within {STARTUP_GRACE:.0f} s of this restart")

    def _on_state(self, node: NodeView, state: NodeState) -> None:
        statuses = {i: o if (o := node.statuses.get(i)) == s else s for i, s in state.instances.items()}
        changed = {i: (s.status, s.ip, s.health) for i, s in statuses.items()} != {
            i: (s.status, s.ip, s.health) for i, s in node.statuses.items()}  # readiness too: the net table
        node.statuses = statuses
        node.metrics = state.metrics
        node.volumes = state.volumes
        node.coord = state.coord
        if changed:
            self._changed.set()

    # ---- placement ---------------------------------------------------------------------------

    def summaries(self) -> dict[str, NodeSummary]:
        """Every known worker: capacity, what remains free after its instances' demands, labels, replicas."""
        return summaries(self.nodes, self.desired, self.assigned, self.location, self.cert_expiry)

    def candidates(self) -> list[Candidate]:
        """Every online worker as a scheduling candidate."""
        return [summary.candidate() for summary in self.summaries().values() if summary.online]

    async def place_pending(self) -> None:
        """Place every desired instance that has no worker; once that and every change applied before it
        are on disk (one file write for all), publish the workers' maps that changed. One pass at a time,
        so maps are published in the order they were made."""
        async with self._placing_lock:
            await self._place_pending()

    async def _place_pending(self) -> None:
        result = plan(self.desired, self.assigned, self.candidates(), self.profile)
        for iid, reason in result.unplaced.items():
            if self.unplaced.get(iid) != reason:
                log.warning("cannot place %s: %s", iid, reason)
            self.unplaced[iid] = reason
        for iid, node in result.placed.items():
            self.assigned[iid] = node
            self.unplaced.pop(iid, None)
            note = volume_note(self.desired[iid], node, self.nodes)
            if note:
                self.notes[iid] = note
            else:
                self.notes.pop(iid, None)
            left_on = self._left_on.pop(iid, None)
            if left_on is not None and left_on != node:
                self._maps_due.add(left_on)  # it runs elsewhere now: the worker it was on stops its copy
            log.info("placed %s on %s", iid, node)
        if result.placed:
            self.store.apply(ASSIGNED, {iid: {"node": node} for iid, node in result.placed.items()})
        await self._publish_when_durable(set(result.placed.values()))
        if result.placed or result.unplaced:
            self._changed.set()

    async def _publish_when_durable(self, nodes: set[str]) -> None:
        """Publish the maps of *nodes* and of every worker whose map changed in memory, as they stand now,
        once every change applied so far is on disk: a worker never runs what a restarted cluster would not
        know. (Changes applied while waiting are published by the next pass, after their own write.)"""
        due, self._maps_due = self._maps_due | nodes, set()
        if not due:
            return
        maps = self._maps(due)
        try:
            await self.store.sync()
        except BaseException:
            self._maps_due |= due
            raise
        for node, mine in maps.items():
            self._publish_map(node, mine)

    def _publish_peers(self) -> None:
        """Give every online worker a few others to measure latency to (peers.py). Retained; sent when
        changed."""
        self._peers_dirty = False
        probes = [(v.name, v.info.probe) for v in self.nodes.values() if v.online and v.info and v.info.probe]
        for name, peers in rings(probes).items():
            if self._peers_published.fresh(name, frozenset((p["name"], p["probe"]) for p in peers)):
                self.session.send(channels.NODE_PEERS, {"peers": peers}, f"cluster/{self.name}", node=name)

    def _maps(self, nodes: set[str]) -> dict[str, dict[str, Any]]:
        """The desired maps of *nodes* (one pass over the assignments for all)."""
        maps: dict[str, dict[str, Any]] = {node: {} for node in nodes}
        for iid, node in self.assigned.items():
            if node in maps:
                maps[node][iid] = self.desired[iid].doc
        return maps

    def _publish_map(self, node: str, mine: dict[str, Any]) -> None:
        if not self._published.fresh(node, frozenset(mine)):
            return
        self.session.send(channels.NODE_DESIRED, {"instances": mine}, f"cluster/{self.name}", node=node)

    # ---- reporting ---------------------------------------------------------------------------

    def statuses(self) -> dict[str, InstanceStatus]:
        """The status of every desired instance, as the root should see it."""
        out = {}
        for iid in self.desired:
            node = self.assigned.get(iid)
            seen = self.nodes[node].statuses.get(iid) if node in self.nodes else None
            out[iid] = status_of(self.name, node, seen, self.unplaced.get(iid) or self.notes.get(iid, ""))
        return out

    def state(self) -> dict[str, Any]:
        """The cluster's retained ``state`` for the root (reporting.py: only what changed is converted)."""
        return {"nodes": self._documents.nodes(self.summaries()),
                "instances": self._documents.instances(self.desired, self.assigned, self.nodes, self.unplaced,
                                                       self.notes),
                "overlay": self.network.state(self.nodes)}

    async def run(self) -> None:
        """Retry placements and publish the cluster state, until cancelled."""
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._report())
                tasks.create_task(self._retry())
        finally:
            self._placements.cancel()

    async def _retry(self) -> None:
        while True:
            await asyncio.sleep(RETRY_INTERVAL)
            await self._give_up_on_silent_workers()
            await self.place_pending()

    async def _report(self) -> None:
        """Whenever something changed (or every STATE_INTERVAL), after the throttle's delay: the peers, the
        net and the state for the root (what changed at once, the whole once settled)."""
        out = DeltaPublisher(self.session, channels.upstream(channels.CLUSTER_STATE), f"cluster/{self.name}")
        throttle = ReportThrottle(REPORT_MIN_INTERVAL, REPORT_COST_FACTOR)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), STATE_INTERVAL)
                await asyncio.sleep(throttle.delay(time.monotonic(), self._busy()))  # coalesces bursts
                self._changed.clear()
                started = time.monotonic()
                throttle.ran(started, started + await self.report(out))
        finally:
            out.close()

    async def report(self, out: DeltaPublisher) -> float:
        """Publish the peers, the net and the state for the root; return the seconds of work it took
        (not counting the waits for the store). The state is taken as it stands and sent once every
        change applied so far is on disk: the root never hears of a placement a restart would forget."""
        started = time.monotonic()
        if self._peers_dirty:
            self._publish_peers()
        cost = time.monotonic() - started
        await self.network.allocate(self.nodes)
        started = time.monotonic()
        self.network.publish(self.nodes, self.desired, self.assigned)
        state = self.state()
        cost += time.monotonic() - started
        await self.store.sync()
        started = time.monotonic()
        out.update(state)
        return cost + time.monotonic() - started
