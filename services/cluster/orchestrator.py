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
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from services.cluster.network import ClusterNetwork
from services.cluster.peers import rings
from services.cluster.placement import NodeView, plan, summaries, volume_note
from services.cluster.reporting import StateReport, status_of
from services.common import channels, models, scheduling
from services.common.delta import Change, DeltaPublisher, DeltaReceiver
from services.common.fencing import Fencing
from services.common.inbox import Inbox, Received
from services.common.liveness import CLUSTER_BEAT_EVERY, CLUSTER_SILENT_AFTER, Liveness, epoch, worker_silent_after
from services.common.metrics import TierMetrics
from services.common.models import InstanceSpec, InstanceStatus, NodeInfo, NodeState, NodeSummary
from services.common.mqtt import MqttSession
from services.common.plugin_api import Candidate
from services.common.retained import LastSent
from services.common.scheduling import Profile
from services.common.store import Store
from services.common.throttle import IDLE_BURST, ReportThrottle, Trigger, behind

log = logging.getLogger(__name__)

DESIRED, ASSIGNED = "desired", "assigned"
RECEIVED = "received"  # "desired" -> the epoch and seq of the root's desired map the stored one is (as of)
STATE_INTERVAL = 2.0
RETRY_INTERVAL = 1.0
# A placement pass runs at once while the cluster keeps up with its messages (what arrives during a pass, or
# during its write, shares the next one); while it is behind on them (throttle.behind: a burst of deploys,
# many workers lost) passes run PLACE_SPACING apart, each PLACE_COALESCE after it was asked for at the
# earliest, so what arrives meanwhile shares a pass.
PLACE_COALESCE = 0.002
PLACE_SPACING = 0.05
STARTUP_GRACE = 10.0
WATCH_TICK = 0.25  # seconds between two looks for silent workers and instances due to be replaced
# An instance a worker accepted and shows no progress on (no status, or CREATING with the same reason) for
# STUCK_AFTER is moved, and the worker marked suspect: it gets no new instances until it makes progress.
STUCK_AFTER = 20.0
PLAN_IN_THREAD_FROM = 100  # pending instances from which a placement pass runs in a thread
# The state report is throttled by its own cost (ReportThrottle): over time, reports wait REPORT_COST_FACTOR
# times what they take (the few of one deploy go at once), and while the cluster is behind on its messages,
# at least REPORT_MIN_INTERVAL apart.
REPORT_MIN_INTERVAL = 0.2
REPORT_COST_FACTOR = 10.0


class ClusterOrchestrator:
    """Desired instances from the root, placed on workers; observed statuses, reported upward."""

    def __init__(self, name: str, store: Store, profile: Profile, session: MqttSession, location: str = "",
                 cert_expiry: Callable[[str], float] = lambda _node: 0.0, stuck_after: float = STUCK_AFTER) -> None:
        self.name = name
        self.stuck_after = stuck_after
        # Placed instances not yet RUNNING (or failed) on their worker: when placed or last seen changing (monotonic)
        self._progress: dict[str, float] = {}
        self._stuck_checked = float("-inf")
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
        self.metrics: TierMetrics | None = None  # what it counts as it works, when the cluster serves metrics
        self._published = LastSent()  # each worker's desired map (its instance ids)
        self._peers_published = LastSent()  # each worker's latency peers
        self._peers_dirty = False
        self._changed = asyncio.Event()
        self.liveness = Liveness()  # which workers are heard, which are gone since when
        self._held_until = 0.0  # while this cluster restarts its own broker (hold_offline)
        self._documents = StateReport(name)
        pacing = ReportThrottle(PLACE_SPACING, factor=0.0, coalesce=PLACE_COALESCE)
        self._placements = Trigger(lambda: self.place_pending(), pacing, "a placement pass", self._busy)
        self._maps_due: set[str] = set()  # workers whose desired maps changed in memory, published once on disk
        # Instances taken off a worker that went offline, by that worker: its retained map keeps listing
        # them until they run elsewhere, so a worker that comes back (kill -9 and restart) keeps and adopts
        # them when they could not be placed elsewhere, and stops them when they were.
        self._left_on: dict[str, str] = {}
        # Instances replaced elsewhere whose service may keep the original (disconnect.reconcile), by the
        # worker they were on: its map keeps listing them until it is back and one copy is chosen.
        self._held: dict[str, str] = {}
        # Instances taken out of their workers' maps while the root is silent (their stop_after), and when
        # the root was last heard (its heartbeat).
        self.fenced: frozenset[str] = frozenset()
        self._fencing = Fencing(CLUSTER_SILENT_AFTER)  # cut off from the root after the silence it waits for
        self._root_heard = time.monotonic()
        self._placing_lock = asyncio.Lock()
        self._desired_in = DeltaReceiver(channels.CLUSTER_DESIRED.sections)
        self._desired_mark: tuple[str | None, int] = (None, 0)  # the receiver's epoch and seq, as stored
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
        # A retained whole map older than the stored one (the root sends it only once changes settle) must
        # not bring back what was dropped since: it is recognised by its seq.
        mark = (await self.store.load(RECEIVED)).get(DESIRED, {})
        if isinstance(mark.get("epoch"), str) and isinstance(mark.get("seq"), int):
            self._desired_in.epoch, self._desired_in.seq = mark["epoch"], mark["seq"]
            self._desired_mark = (mark["epoch"], mark["seq"])
        until = time.monotonic() + STARTUP_GRACE
        for node, mine in self._maps(set(self.assigned.values())).items():  # as stored
            self.nodes.setdefault(node, NodeView(node))
            self._publish_map(node, mine)
            # its last will went to the broker that died with this cluster: it has until then to come back
            self.liveness.expect(node, until, self._silent_after(self.nodes[node]))
        await self.network.load()

    def listen(self, inbox: Inbox) -> None:
        """Register the channels this orchestrator reads: the root's desired map and net, the workers' own."""
        inbox.on(channels.downstream(channels.CLUSTER_DESIRED), self.take_desired)
        inbox.on(channels.downstream(channels.CLUSTER_DESIRED_DELTA), self.take_desired_delta)
        inbox.on(channels.downstream(channels.CLUSTER_NET), self.take_net)
        inbox.on(channels.downstream(channels.CLUSTER_ROOT_BEAT), self.take_root_beat)
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

    async def take_root_beat(self, beat: Received[dict[str, Any]]) -> None:
        """The root's heartbeat: the link to the root works."""
        self._root_heard = max(self._root_heard, beat.message.received or time.monotonic())

    async def take_avail(self, avail: Received[bool]) -> None:
        """A worker came online or went offline (its last will)."""
        node = self._node(avail.sender)
        if avail.message.retain:  # what a worker said before this cluster started: not news of it now
            node.online = bool(avail.body) and self.liveness.since(node.name) is None
            return
        if avail.body:
            self._hear(node, avail)
        await self._on_avail(node, bool(avail.body))

    async def take_info(self, info: Received[NodeInfo]) -> None:
        """A worker's static facts."""
        if info.body is not None:
            node = self._node(info.sender)
            node.info = info.body
            self._hear(node, info)
            self._peers_dirty = True
            self._changed.set()

    async def take_state(self, state: Received[NodeState]) -> None:
        """A worker's live facts (every few seconds: its heartbeat)."""
        if state.body is not None:
            node = self._node(state.sender)
            self._hear(node, state)
            self._on_state(node, state.body)

    def _node(self, name: str) -> NodeView:
        return self.nodes.setdefault(name, NodeView(name))

    def _silent_after(self, node: NodeView) -> float:
        """How long *node* may send nothing before it counts as gone: two of its report intervals and a second."""
        return worker_silent_after(node.info.report_every if node.info else 0.0)

    def _hear(self, node: NodeView, message: Received[Any]) -> None:
        """*node* sent a live message (a retained one, delivered at subscription, says nothing of now)."""
        if message.message.retain:
            return
        received = message.message.received or time.monotonic()
        if self.liveness.hear(node.name, received, self._silent_after(node), message.message.lag):
            log.warning("worker %s is back, after %.1f s gone", node.name, time.time() - node.lost_since)
            node.online, node.lost_since = True, 0.0
            self._peers_dirty = True
            self._changed.set()

    async def _take_desired(self, change: Change) -> None:
        """Apply what changed in the root's desired map: only the changed specs are read and stored (with
        the map's epoch and seq, in the same write)."""
        if not change:
            self._mark_received()
            return
        put = models.load_desired({"instances": change.put.get("instances", {})})
        put = {iid: spec for iid, spec in put.items() if self.desired.get(iid) != spec}  # unchanged: not stored again
        gone = [iid for iid in change.drop.get("instances", ()) if iid in self.desired]
        self.desired.update(put)
        for iid in gone:
            del self.desired[iid]
        touched = {self.assigned.pop(iid) for iid in gone if iid in self.assigned}
        touched |= {self._left_on.pop(iid) for iid in gone if iid in self._left_on}
        touched |= {self._held.pop(iid) for iid in gone if iid in self._held}
        for iid in gone:
            self.unplaced.pop(iid, None)
            self.notes.pop(iid, None)
            self._progress.pop(iid, None)
        # In memory now, on disk with the placement pass's one write (place_soon): the message dispatch (the
        # states of 1,000 workers among what waits behind it) never waits for the store, and deltas arriving
        # meanwhile share one pass. What others hear of it (workers' maps, the state report) waits for that write.
        self.store.apply(DESIRED, {i: spec.doc for i, spec in put.items()}, tuple(gone))
        self.store.apply(ASSIGNED, {}, tuple(gone))
        self._mark_received()
        self._maps_due |= touched
        self.place_soon()

    def _mark_received(self) -> None:
        """Store which version of the root's desired map this cluster's copy is, when that changed."""
        mark = (self._desired_in.epoch, self._desired_in.seq)
        if mark != self._desired_mark:
            self._desired_mark = mark
            self.store.apply(RECEIVED, {DESIRED: {"epoch": mark[0], "seq": mark[1]}})

    async def _on_avail(self, node: NodeView, online: bool) -> None:
        was = node.online
        node.online = online
        if online and not was:
            log.info("worker %s is online", node.name)
            node.suspect = ""  # a worker that reconnects is given another chance
            self._peers_dirty = True
        if not online and was:
            now = time.monotonic()
            if now < self._held_until:
                log.info("worker %s went offline while its broker restarts: it has until then to come back",
                         node.name)
                self.liveness.expect(node.name, self._held_until, self._silent_after(node))
            elif self.liveness.closed(node.name, now):
                self._gone(node, "went offline")
        self._changed.set()

    def _gone(self, node: NodeView, why: str) -> None:
        """*node* is gone (its connection closed, or it fell silent): its instances are LOST from now on,
        and replaced as their services' ``disconnect`` policies say (:meth:`_replace_due`)."""
        node.online = False
        node.lost_since = round(epoch(self.liveness.heard.get(node.name, time.monotonic())), 3)
        held = sum(1 for n in self.assigned.values() if n == node.name)
        log.warning("worker %s %s; %d instance(s) on it are lost", node.name, why, held)
        self._peers_dirty = True
        self._replace_due()
        self._changed.set()

    def _replace_due(self) -> None:
        """Move every instance whose worker is gone and whose policy's wait is over (looked at every
        WATCH_TICK)."""
        if not self.liveness.gone:
            return
        now = time.monotonic()
        due: dict[str, list[str]] = {}
        for iid, name in self.assigned.items():
            gone_at = self.liveness.since(name)
            at = None if gone_at is None else self.desired[iid].service.on_disconnect.replace_at(gone_at)
            if at is not None and at <= now:
                due.setdefault(name, []).append(iid)
        for name, lost in due.items():
            self._move_off(self._node(name), lost)

    def _move_off(self, node: NodeView, lost: list[str]) -> None:
        """Take the instances *lost* off *node* and place them elsewhere."""
        log.warning("replacing %d instance(s) of worker %s elsewhere", len(lost), node.name)
        for iid in lost:
            del self.assigned[iid]
            self._left_on[iid] = node.name
            self._progress.pop(iid, None)
            node.statuses.pop(iid, None)
        # In memory now, on disk with the next write (the new placements' one); a restart before that
        # finds the worker silent and moves them then. Not waiting here lets the avails of many workers
        # lost at once be handled one after the other quickly, and placed together.
        self.store.apply(ASSIGNED, {}, tuple(lost))
        self.place_soon()
        self._changed.set()

    def _busy(self) -> bool:
        """Whether this cluster is behind on its messages: then reports and placements batch."""
        return behind(self.session.waited())

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

    def watch(self) -> None:
        """Find the workers gone silent, replace what is due, and fence what the root's silence calls for
        (every WATCH_TICK)."""
        now = time.monotonic()
        held = self.liveness.held
        for name in self.liveness.check(now, self.session.horizon()):
            self._gone(self._node(name), f"has sent nothing for {self.liveness.limits[name]:.1f} s")
        if self.liveness.held and not held:
            log.warning("%d workers fell silent at once: taking it for this cluster falling behind, not for them; "
                        "waiting until they are heard", self.liveness.held)
        self._replace_due()
        if now - self._stuck_checked >= 1.0:  # a second is fine enough for a 20 s deadline
            self._stuck_checked = now
            self._move_stuck(self.liveness.upto(now, self.session.horizon()))
        fenced = self._fencing.wanted(lambda: {iid: self.desired[iid] for iid in self.assigned}, self.fenced,
                                      self.session.horizon() - self._root_heard, now)
        if fenced != self.fenced:
            for iid in sorted(fenced - self.fenced):
                log.warning("fencing %s: cut off from the root for longer than its stop_after", iid)
            self._maps_due |= {self.assigned[iid] for iid in fenced ^ self.fenced if iid in self.assigned}
            for iid in self.fenced - fenced:  # sent to its worker again: its deadline to make progress starts now
                self._progress[iid] = now
            self.fenced = fenced
            self.place_soon()

    def _move_stuck(self, now: float) -> None:
        """Move the instances online workers accepted and show no progress on for ``stuck_after`` up to *now*
        (what this cluster has heard up to); mark those workers suspect (a worker that claims room and runs
        nothing would otherwise attract every placement)."""
        stuck: dict[str, list[str]] = {}
        for iid, since in self._progress.items():
            name = self.assigned.get(iid)
            node = self.nodes.get(name) if name else None
            if name is None or node is None or not node.online or iid in self.fenced:
                continue
            if now - since > self.stuck_after:
                stuck.setdefault(name, []).append(iid)
        for name, iids in stuck.items():
            node = self.nodes[name]
            node.suspect = (f"accepted {len(iids)} instance(s) and showed no progress on them for "
                            f"{self.stuck_after:.0f} s")
            log.warning("worker %s %s: moving them, and giving it no new instances until it makes progress",
                        name, node.suspect)
            self._move_off(node, iids)

    def _on_state(self, node: NodeView, state: NodeState) -> None:
        if self._held and node.online:
            self._reconcile_held(node, state)
        now = time.monotonic()
        for iid, seen in state.instances.items():
            before = node.statuses.get(iid)
            if before is not None and (before.status, before.reason) == (seen.status, seen.reason):
                continue
            if self.assigned.get(iid) != node.name:
                continue
            if seen.status == models.CREATING:
                self._progress[iid] = now  # on its way (an image pull says how far)
            else:
                self._progress.pop(iid, None)
            if node.suspect:
                log.info("worker %s makes progress again: it may take new instances", node.name)
                node.suspect = ""
        statuses = {i: o if (o := node.statuses.get(i)) == s else s for i, s in state.instances.items()}
        changed = {i: (s.status, s.ip, s.health) for i, s in statuses.items()} != {
            i: (s.status, s.ip, s.health) for i, s in node.statuses.items()}  # readiness too: the net table
        node.statuses = statuses
        node.metrics = state.metrics
        node.volumes = state.volumes
        node.coord = state.coord
        if changed:
            self._changed.set()

    def _reconcile_held(self, node: NodeView, state: NodeState) -> None:
        """*node* is back and reports: of each instance replaced while it was away and held for it, keep
        its copy (when it still runs it and the policy prefers it) or the replacement."""
        for iid in [i for i, n in self._held.items() if n == node.name]:
            del self._held[iid]
            spec, replacement = self.desired.get(iid), self.assigned.get(iid)
            seen = state.instances.get(iid)
            if spec is None or replacement is None or seen is None or seen.status != models.RUNNING:
                self._maps_due.add(node.name)  # not running there any more: the replacement stays
                continue
            policy = spec.service.on_disconnect
            if policy.keeps_original(self._scores_higher(spec, node.name, replacement)):
                log.info("%s: keeping the original on %s, stopping its replacement on %s", iid, node.name,
                         replacement)
                self.assigned[iid] = node.name
                self.store.apply(ASSIGNED, {iid: {"node": node.name}})
                self._maps_due |= {node.name, replacement}
            else:
                log.info("%s: keeping the replacement on %s, stopping the original on %s", iid, replacement,
                         node.name)
                self._maps_due.add(node.name)
        self.place_soon()  # publishes the maps once the choice is on disk

    def _scores_higher(self, spec: InstanceSpec, original: str, replacement: str) -> bool:
        """Whether the scheduler, choosing now between the two workers for *spec*, picks *original*."""
        summaries = self.summaries()
        if original not in summaries or replacement not in summaries:
            return False
        demand = spec.demand
        there = summaries[replacement].candidate()
        freed = dataclasses.replace(there, cpu_free=there.cpu_free + demand.vcpus,
                                    memory_free_mb=there.memory_free_mb + demand.memory_mb)  # as if not placed
        decision = scheduling.place(demand, [summaries[original].candidate(), freed], self.profile, "node")
        return decision.choice is not None and decision.choice.id == original

    # ---- placement ---------------------------------------------------------------------------

    def summaries(self) -> dict[str, NodeSummary]:
        """Every known worker: capacity, what remains free after its instances' demands, labels, replicas."""
        return summaries(self.nodes, self.desired, self.assigned, self.location, self.cert_expiry)

    def candidates(self) -> list[Candidate]:
        """Every online worker that is not suspect, as a scheduling candidate."""
        return [summary.candidate() for summary in self.summaries().values() if summary.online and not summary.suspect]

    async def place_pending(self) -> None:
        """Place every desired instance that has no worker; once that and every change applied before it
        are on disk (one file write for all), publish the workers' maps that changed. One pass at a time,
        so maps are published in the order they were made."""
        async with self._placing_lock:
            await self._place_pending()

    async def _place_pending(self) -> None:
        """One placement pass. A big one (a burst of thousands) is worked out in a thread on copies, so this
        cluster keeps reading its workers and sending its heartbeat meanwhile (a pass of 10,000 instances on
        1,000 workers held the event loop for seconds, and the root took the cluster for gone); what changed
        meanwhile is checked before the result is taken. With nothing waiting for a worker it only publishes
        the maps due (the retry loop calls it every second: at 1,000 workers, building every candidate for
        nothing took a sixth of the cluster's CPU)."""
        if all(iid in self.assigned for iid in self.desired):
            await self._publish_when_durable(set())
            return
        inputs = (dict(self.desired), dict(self.assigned), self.candidates(), self.profile)
        big = len(inputs[0]) - len(inputs[1]) >= PLAN_IN_THREAD_FROM
        began = time.perf_counter()
        result = await asyncio.to_thread(plan, *inputs) if big else plan(*inputs)
        if self.metrics and (result.placed or result.unplaced):
            self.metrics.placed(len(result.placed), time.perf_counter() - began)
        for iid, reason in result.unplaced.items():
            if iid not in self.desired or iid in self.assigned:
                continue
            if self.unplaced.get(iid) != reason:
                log.warning("cannot place %s: %s", iid, reason)
                if self.metrics:
                    self.metrics.refused(reason)
            self.unplaced[iid] = reason
        now = time.monotonic()
        placed = {iid: node for iid, node in result.placed.items() if iid in self.desired and iid not in self.assigned
                  and node in self.nodes and self.nodes[node].online}
        for iid, node in placed.items():
            self.assigned[iid] = node
            self._progress[iid] = now
            self.unplaced.pop(iid, None)
            note = volume_note(self.desired[iid], node, self.nodes)
            if note:
                self.notes[iid] = note
            else:
                self.notes.pop(iid, None)
            left_on = self._left_on.pop(iid, None)
            if left_on is not None and left_on != node:
                if self.desired[iid].service.on_disconnect.holds_original:
                    self._held[iid] = left_on  # its map keeps it: the copy there may be the one kept
                else:
                    self._maps_due.add(left_on)  # it runs elsewhere now: the worker it was on stops its copy
            log.info("placed %s on %s", iid, node)
        if placed:
            self.store.apply(ASSIGNED, {iid: {"node": node} for iid, node in placed.items()})
        await self._publish_when_durable(set(placed.values()))
        if placed or result.unplaced:
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
            if node in maps and iid not in self.fenced:
                maps[node][iid] = self.desired[iid].doc
        for iid, node in self._held.items():
            if node in maps and iid in self.desired:
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
            out[iid] = status_of(self.name, node, seen, self.unplaced.get(iid) or self.notes.get(iid, ""),
                                 self.nodes[node].lost_since if node in self.nodes else 0.0)
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
                tasks.create_task(self._watch())
                tasks.create_task(self._beat())
        finally:
            self._placements.cancel()

    async def _retry(self) -> None:
        while True:
            await asyncio.sleep(RETRY_INTERVAL)
            await self.place_pending()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_TICK)
            self.watch()

    async def _beat(self) -> None:
        """Tell the root this cluster lives, every CLUSTER_BEAT_EVERY (its state is sent only on change)."""
        count = 0
        while True:
            count += 1
            self.session.send(channels.upstream(channels.CLUSTER_BEAT), {"n": count, "ts": round(time.time(), 3)})
            await asyncio.sleep(CLUSTER_BEAT_EVERY)

    async def _report(self) -> None:
        """Whenever something changed (or every STATE_INTERVAL), after the throttle's delay: the peers, the
        net and the state for the root (what changed at once, the whole once settled)."""
        out = DeltaPublisher(self.session, channels.upstream(channels.CLUSTER_STATE), f"cluster/{self.name}")
        throttle = ReportThrottle(REPORT_MIN_INTERVAL, REPORT_COST_FACTOR, burst=IDLE_BURST)
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
