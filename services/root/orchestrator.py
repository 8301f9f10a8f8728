"""The root orchestrator: places instances on clusters, moves them when a cluster fails, and keeps
every user's retained service state up to date.

It publishes one retained desired map per cluster (``oak/clusters/<cid>/down/desired``; each change at
once as a delta on ``.../desired/delta``, see ``services/common/delta.py``) and reads the clusters'
``avail``/``info``/``state`` (and ``state/delta``). An instance a cluster cannot place (NO_WORKER_CAPACITY) is
moved to another cluster that can hold it; a cluster that goes offline has its instances moved after
a short grace, and one never heard from after a root restart after a longer one.

This class holds the root's view of its clusters and orders effects (memory, disk, then the network);
the decisions are plain logic elsewhere: which cluster an instance goes to (services/root/placement.py)
and what users see of their services (views.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from services.common import channels, envelope, models
from services.common.delta import Change, DeltaPublisher, DeltaReceiver
from services.common.inbox import Inbox, Received
from services.common.liveness import CLUSTER_BEAT_EVERY, Liveness, epoch
from services.common.metrics import PassTiming, TierMetrics
from services.common.models import ClusterInfo, InstanceSpec, InstanceStatus, NodeSummary
from services.common.mqtt import MqttSession
from services.common.retained import LastSent
from services.common.scheduling import Profile
from services.common.throttle import ReportThrottle, TimeSlices, Trigger
from services.root import rollout
from services.root.catalog import Catalog, Instance, Service
from services.root.clusters import FAILOVER_GRACE, SILENT_AFTER, STARTUP_GRACE, STUCK_AFTER, ClusterView
from services.root.events import Feed
from services.root.lane import StatesChange
from services.root.network import RootNetwork, overlay_routes
from services.root.placement import Placement
from services.root.views import ServiceStates, cluster_rows, node_rows

log = logging.getLogger(__name__)
Published = dict[str, bytes]  # the service states published in one pass, as JSON, by service id
TICK = 0.5
INFRASTRUCTURE_EVERY = 4  # ticks: the users' infrastructure view is refreshed at most every 2 s
BEAT_EVERY = round(CLUSTER_BEAT_EVERY / TICK)  # ticks between two of the root's heartbeats to every cluster
# The whole desired map (megabytes with 10,000 instances, decoded by the cluster) follows the deltas
# once placements pause this long, and at least this often while they go on.
DESIRED_QUIET, DESIRED_FULL_EVERY = 2.0, 30.0
ORPHAN_RETRY = 10.0  # seconds before a deleted volume a worker still reports is asked deleted again
PASS_SHARE = 3.0  # a kicked pass starts at least this many times its last one's cost after that one began


class RootOrchestrator:
    """Placement across clusters and the users' view of their services."""

    def __init__(self, catalog: Catalog, profile: Profile, session: MqttSession,
                 users: Callable[[], list[str]] = list, network: RootNetwork | None = None) -> None:
        self.catalog = catalog
        self.network = network
        self._net_dirty = True
        self.users = users
        self._infrastructure = LastSent()  # the clusters-and-workers view of each user
        self.profile = profile
        self.session = session
        self.clusters: dict[str, ClusterView] = {}
        self.liveness = Liveness()  # which clusters are heard, which are gone since when
        self._replace_due: asyncio.TimerHandle | None = None  # a pass when a lost_after ends
        self._sent_at: dict[str, float] = {}  # instances sent to a cluster that has not reported them yet: when
        self.placement = Placement(profile)
        self._desired_out: dict[str, DeltaPublisher] = {}
        self._states_in: dict[str, DeltaReceiver] = {}
        self.views = ServiceStates(self.instance_status)
        self._published_state = LastSent()  # each service's state, by service id
        self.on_states: Callable[[StatesChange], None] | None = None  # takes what each publication changed
        self._states_taken_at = float("-inf")  # when the last publication began
        self._cleared: set[str] = set()  # owners of services deleted since the last publication
        self._dirty: set[str] = set()
        self._reconciling = asyncio.Lock()
        self._ready_since: dict[str, float] = {}  # instances of services rolling out, ready since (monotonic)
        self._roll_due: asyncio.TimerHandle | None = None  # a pass when a min_healthy_time ends
        # At once on an idle root (after the request that asked is answered); in a burst, where a pass
        # costs tens of milliseconds, at most a third of the event loop, which the users' requests share.
        self._kicks = Trigger(lambda: self.reconcile(), ReportThrottle(0.0, factor=PASS_SHARE, coalesce=0.0),
                              "a reconcile pass")
        self.metrics: TierMetrics | None = None  # what it counts as it works, when the root serves metrics
        self.events: Feed | None = None  # what its users follow (services/root/events.py)
        self._born = time.time()  # instances created since then are timed to their first RUNNING
        self._orphans_asked: dict[str, float] = {}  # cluster/worker/volume still held after its deletion -> asked
        self._ran: set[str] = set()  # instances already timed

    def listen(self, inbox: Inbox) -> None:
        """Register the channels this orchestrator reads: every cluster's own."""
        inbox.on(channels.CLUSTER_AVAIL, self.take_avail)
        inbox.on(channels.CLUSTER_INFO, self.take_info)
        inbox.on(channels.CLUSTER_STATE, self.take_state)
        inbox.on(channels.CLUSTER_STATE_DELTA, self.take_state_delta)
        inbox.on(channels.CLUSTER_BEAT, self.take_beat)

    def start(self) -> None:
        """Republish every cluster's desired map and every service's state."""
        until = time.monotonic() + STARTUP_GRACE
        for name in self.catalog.known_clusters:
            self.clusters.setdefault(name, ClusterView(name))
            self.liveness.expect(name, until, SILENT_AFTER)  # its bridge has that long to reconnect
        for name in self.catalog.known_clusters:
            self.publish_desired(name)
        self._dirty |= set(self.catalog.services)

    # ---- clusters ----------------------------------------------------------------------------

    def _view(self, name: str) -> ClusterView:
        return self.clusters.setdefault(name, ClusterView(name))

    async def take_avail(self, avail: Received[bool]) -> None:
        """A cluster's bridge came online or went offline (its last will): one that is not heard again
        within FAILOVER_GRACE is gone (a bridge that reconnects is not a lost cluster)."""
        view, online = self._view(avail.sender), bool(avail.body)
        if online != view.online:
            log.info("cluster %s is %s", view.name, "online" if online else "offline")
            self._tell_everyone("cluster", f"cluster {view.name} is {'online' if online else 'offline'}",
                                cluster=view.name)
        if avail.message.retain:  # said before this root started: its startup grace applies
            view.set_online(online and not view.lost_since)
        elif online:
            self._hear(view, avail)
            if out := self._desired_out.get(view.name):
                out.publish_if_behind()  # what it subscribed to may lag behind the deltas it missed
        else:
            view.set_online(False)
            self.liveness.expect(view.name, time.monotonic() + FAILOVER_GRACE, SILENT_AFTER)
        self.kick()  # placing never holds up the messages behind this one (API requests among them)

    def _unanswered(self, upto: float) -> None:
        """Send to another cluster every instance its online cluster has not reported within STUCK_AFTER
        (up to *upto*: what this root has read), and mark that cluster suspect."""
        for iid, at in list(self._sent_at.items()):
            instance = self.catalog.instances.get(iid)
            view = self.clusters.get(instance.cluster) if instance else None
            if instance is None or view is None or iid in view.statuses:
                del self._sent_at[iid]
            elif view.online and upto - at > STUCK_AFTER:
                del self._sent_at[iid]
                view.suspect = f"accepted instances and reported none of them for {STUCK_AFTER:.0f} s"
                log.warning("cluster %s %s: %s goes to another cluster", view.name, view.suspect, iid)
                self.placement.excluded.setdefault(iid, set()).add(view.name)
                self.kick()

    async def take_beat(self, beat: Received[dict[str, Any]]) -> None:
        """A cluster's heartbeat."""
        self._hear(self._view(beat.sender), beat)

    def _hear(self, view: ClusterView, message: Received[Any]) -> None:
        """*view*'s cluster sent a live message: it is online (and back, if it was gone)."""
        if message.message.retain:
            return
        if self.liveness.hear(view.name, message.message.received or time.monotonic(), SILENT_AFTER,
                              message.message.lag):
            log.warning("cluster %s is back, after %.1f s gone", view.name, time.time() - view.lost_since)
            self._tell_everyone("cluster", f"cluster {view.name} is back after {time.time() - view.lost_since:.1f} s "
                                           "gone", cluster=view.name)
            view.lost_since = 0.0
            self._dirty |= {i.sid for i in self.catalog.instances.values() if i.cluster == view.name}
        if not view.online:
            view.set_online(True)
            self.placement.cluster_online(view.name)
            self.kick()

    def watch(self) -> None:
        """Find the clusters gone silent (every TICK; their instances are LOST from now on), and the
        instances a cluster accepted and never reported."""
        self._unanswered(min(time.monotonic(), self.session.horizon()))
        for name in self.liveness.check(time.monotonic(), self.session.horizon()):
            view = self._view(name)
            view.set_online(False)
            view.lost_since = round(epoch(self.liveness.heard[name]), 3)
            held = [i for i in self.catalog.instances.values() if i.cluster == name]
            log.warning("cluster %s has sent nothing for %.0f s: it is gone, %d instance(s) on it are lost",
                        name, SILENT_AFTER, len(held))
            self._tell_everyone("cluster", f"cluster {name} is gone: silent for {SILENT_AFTER:.0f} s, "
                                           f"{len(held)} instance(s) on it lost", cluster=name)
            self._dirty |= {i.sid for i in held}
            self.kick()

    async def take_info(self, info: Received[ClusterInfo]) -> None:
        """A cluster's static facts."""
        if info.body is not None:
            self._view(info.sender).info = info.body

    async def take_state(self, state: Received[dict[str, Any]]) -> None:
        """A cluster's whole state document."""
        if state.body is not None:
            self._hear(self._view(state.sender), state)
            await self._changed_state(state.sender, lambda receiver: receiver.whole(state.body or {}))

    async def take_state_delta(self, delta: Received[dict[str, Any]]) -> None:
        """A change of a cluster's state document."""
        if delta.body is not None:
            self._hear(self._view(delta.sender), delta)
            await self._changed_state(delta.sender, lambda receiver: receiver.delta(delta.body or {}))

    async def _changed_state(self, cluster: str, take: Callable[[DeltaReceiver], Change]) -> None:
        view = self._view(cluster)
        receiver = self._states_in.setdefault(view.name, DeltaReceiver(channels.CLUSTER_STATE.sections))
        change = take(receiver)
        if not change:
            return
        await self._take_state(view, receiver, change)
        if self.network:
            await self.network.grant([view])
        self.kick()

    async def _take_state(self, view: ClusterView, receiver: DeltaReceiver, change: Change) -> None:
        """Update *view* with what changed in its cluster's state (only the changed documents are read).
        The statuses are typed between turns of the event loop (a cluster's whole state holds thousands),
        then taken in at once."""
        nodes, statuses = change.put.get("nodes", {}), change.put.get("instances", {})
        fresh: dict[str, InstanceStatus] = {}
        slices = TimeSlices()
        for iid, status in statuses.items():
            fresh[iid] = models.load(InstanceStatus, status)
            await slices.turn()
        before = {name: view.nodes[name].online for name in nodes if name in view.nodes}
        for name in change.drop.get("nodes", ()):
            view.nodes.pop(name, None)
            self._tell_everyone("node", f"worker {name} left cluster {view.name}", cluster=view.name, node=name)
        view.nodes.update({n: models.load(NodeSummary, s) for n, s in nodes.items()})
        self._delete_orphan_volumes(view, list(nodes))
        for name in nodes:
            node = view.nodes[name]
            if before.get(name) != node.online:
                said = "online" if node.online else ("LOST" if node.silent_since else "offline")
                self._tell_everyone("node", f"worker {name} of cluster {view.name} is {said}", cluster=view.name,
                                    node=name, reason=node.suspect)
        for iid in change.drop.get("instances", ()):
            view.statuses.pop(iid, None)
        was = {iid: old.status for iid in fresh if (old := view.statuses.get(iid))} if self.events else {}
        view.statuses.update(fresh)
        if "overlay" in change.put or "overlay" in change.drop:
            view.overlay = overlay_routes(view.name, receiver.docs["overlay"])
        self._absorb(view, fresh, change.drop.get("instances", ()), was)
        self._net_dirty = True

    def _absorb(self, view: ClusterView, changed: dict[str, InstanceStatus], gone: tuple[str, ...] = (),
                was: dict[str, str] | None = None) -> None:
        """Take in a cluster's changed statuses (and the instances it no longer reports, *gone*): drop
        reservations it has accounted for, note what it cannot place, mark the services concerned; tell the
        owners of those whose status is not what it *was*."""
        if changed and view.suspect:
            log.info("cluster %s reports again: no longer suspect", view.name)
            view.suspect = ""
        for iid, status in changed.items():
            instance = self.catalog.instances.get(iid)
            if instance is None or instance.cluster != view.name:
                continue
            self.placement.absorb(view.name, iid, status)
            self._dirty.add(instance.sid)
            before = (was or {}).get(iid, "")
            if self.events and status.status != before:
                self._tell_owner(instance, "status", f"{before} -> {status.status}" if before else status.status,
                                 cluster=view.name, node=status.node, reason=status.reason)
            if status.status == models.RUNNING and instance.created >= self._born and iid not in self._ran:
                self._ran.add(iid)
                if self.metrics:
                    self.metrics.submit_to_running.observe(time.time() - instance.created)
        for iid in gone:
            instance = self.catalog.instances.get(iid)
            if instance is not None:
                self._dirty.add(instance.sid)

    # ---- placement ---------------------------------------------------------------------------

    def spec_of(self, instance: Instance) -> InstanceSpec:
        """The desired-map entry of an instance."""
        return self.catalog.instance_spec(instance)

    async def reconcile(self) -> None:
        """Move instances off failed clusters, place unplaced ones, publish what changed.

        One at a time: a second pass must see the first one's assignments, or it would place the same
        instances again."""
        async with self._reconciling:
            await self._reconcile()

    def kick(self) -> None:
        """Have a reconcile pass run soon, without waiting for it (an API request is answered first).
        Kicks made before that pass starts share it; one made during it gets another pass after it."""
        self._kicks.pull()

    async def settled(self) -> None:
        """Wait until no kicked pass is pending or running (tests, shutdown)."""
        await self._kicks.settled()

    async def _reconcile(self) -> None:
        await self._roll()
        gone = {name: at for name in self.clusters if (at := self.liveness.since(name)) is not None}
        moves, due = self.placement.moves(gone, self.catalog.instances, self.catalog.services, time.monotonic())
        if self._replace_due:
            self._replace_due.cancel()
        self._replace_due = (asyncio.get_running_loop().call_at(due, self.kick) if due is not None else None)
        moving_ids = {iid for moving in moves.values() for iid in moving}
        changes = dict.fromkeys(moving_ids, "")
        decisions = self.placement.decisions(self.catalog.instances, self.catalog.services, self.clusters,
                                             set(changes))
        slices = TimeSlices()  # the root keeps answering during a big burst
        timing = PassTiming()
        for decided in decisions:
            timing.decided()
            instance = self.catalog.instances[decided.iid]
            service = self.catalog.services[instance.sid]
            if decided.cluster and decided.cluster != changes.get(decided.iid, instance.cluster):
                changes[decided.iid] = decided.cluster
                timing.placed += 1
                self._tell_owner(instance, "placed", f"placed on cluster {decided.cluster}", cluster=decided.cluster)
                log.info("placed %s (%s #%d) on cluster %s", instance.iid, service.job_name, instance.number,
                         decided.cluster)
            elif decided.news:
                log.warning("cannot place %s (%s): %s", instance.iid, service.job_name, decided.reason)
                self._dirty.add(instance.sid)
                self._tell_owner(instance, "unplaced", "cannot be placed", reason=decided.reason)
                if self.metrics:
                    self.metrics.refused(decided.reason)
            await slices.turn()
            timing.resume()
        if self.metrics and timing.decisions:
            self.metrics.placed(timing.placed, timing.seconds)
        # one with nowhere else to go stays where it is, LOST, rather than leave its cluster's map: when the
        # cluster comes back it still runs there (and a later pass moves it once another cluster can take it)
        changes = {iid: cluster for iid, cluster in changes.items() if cluster or iid not in moving_ids}
        for cluster, moving in moves.items():
            if moved := sum(1 for iid in moving if iid in changes):
                log.warning("cluster %s is gone; %d of its instance(s) replaced elsewhere", cluster, moved)
        await self._commit(changes)
        await self.flush_states()

    # ---- rollouts ----------------------------------------------------------------------------------

    async def _roll(self) -> None:
        """Take every rollout under way one step further (services/root/rollout.py decides); when an
        instance's min_healthy_time is still running, have a pass run as it ends."""
        due: list[float] = []
        for service in [s for s in self.catalog.services.values() if s.rollout and s.rollout.active]:
            assert service.rollout is not None
            instances = self.catalog.instances_of(service.sid)
            policy = service.spec.update_policy
            decided = rollout.step(service.rollout, policy, service.replicas, instances,
                                   self._ok(policy.min_healthy_time, due), time.time())
            if decided:
                await self._take_step(service, decided)
        if self._roll_due:
            self._roll_due.cancel()
        self._roll_due = asyncio.get_running_loop().call_later(min(due), self.kick) if due else None

    def _ok(self, min_healthy_time: float, due: list[float]) -> Callable[[Instance], bool]:
        """Whether an instance has been ready (healthy, or RUNNING without a check) for *min_healthy_time*
        (the seconds left for one that has not yet go to *due*)."""
        now = time.monotonic()

        def ok(instance: Instance) -> bool:
            if not self.instance_status(instance).ready:
                self._ready_since.pop(instance.iid, None)
                return False
            left = min_healthy_time - (now - self._ready_since.setdefault(instance.iid, now))
            if left > 0:
                due.append(left)
            return left <= 0
        return ok

    async def _take_step(self, service: Service, decided: rollout.Step[Instance]) -> None:
        """Record a rollout's step, then make it: the replaced and removed instances leave their clusters'
        desired maps as their successors and canaries enter them."""
        if decided.revert_to and decided.rollout:
            log.warning("%s: %s", service.job_name, decided.rollout.reason)
            service = await self.catalog.set_revision(service, decided.revert_to, decided.rollout)
        elif decided.rollout:
            log.info("%s: rollout of revision %d %s %s", service.job_name, decided.rollout.revision,
                     decided.rollout.state, decided.rollout.reason)
            if self.events:
                self.events.to(service.owner, "rollout", f"{service.job_name}: rollout of revision "
                               f"{decided.rollout.revision} {decided.rollout.state}", service=service.job_name,
                               reason=decided.rollout.reason)
            service = await self.catalog.set_rollout(service, decided.rollout)
        if decided.replace or decided.remove or decided.canaries:
            nodes = {i.iid: self.instance_status(i).node for i in decided.replace}
            added, removed = await self.catalog.roll(service, decided.replace, decided.remove, decided.canaries,
                                                     nodes)
            log.info("%s: replacing #%s with revision %d", service.job_name,
                     ", #".join(str(i.number) for i in removed), service.revision)
            await self.forget(removed, added)
        self._dirty.add(service.sid)

    async def _commit(self, changes: dict[str, str]) -> None:
        """Record *changes* (instance -> cluster) on disk, then tell the clusters concerned."""
        changes = {iid: c for iid, c in changes.items() if iid in self.catalog.instances}
        if changes:
            before = {iid: self.catalog.instances[iid].cluster for iid in changes}
            await self.catalog.assign(changes)
            await self._tell_clusters(before, changes)

    async def _tell_clusters(self, before: dict[str, str], after: dict[str, str]) -> None:
        """Send each cluster the change of its desired map: the instances it lost and got, nothing else
        (the desired maps track their own changes: no look at the other 10,000 instances). Each spec is
        encoded as it is taken, in slices: a thousand of them held the event loop for 50 ms."""
        drops: dict[str, list[str]] = {}
        puts: dict[str, dict[str, Any]] = {}
        for iid, cluster in before.items():
            if cluster and after.get(iid, cluster) != cluster:
                drops.setdefault(cluster, []).append(iid)
        slices = TimeSlices()
        for iid, cluster in after.items():
            instance = self.catalog.instances.get(iid)
            if cluster and instance is not None and before.get(iid) != cluster:
                self._sent_at[iid] = time.monotonic()
                doc = puts.setdefault(cluster, {})[iid] = self.spec_of(instance).doc
                self._desired(cluster).encode("instances", iid, doc)
                await slices.turn()
            if instance is not None:
                self._dirty.add(instance.sid)
        for cluster in drops.keys() | puts.keys():
            self._desired(cluster).change({"instances": puts.get(cluster, {})}, {"instances": drops.get(cluster, [])})

    def publish_desired(self, cluster: str) -> None:
        """Publish the whole desired map of *cluster*, as the catalog has it (at start)."""
        mine = {i.iid: self.spec_of(i).doc for i in self.catalog.instances.values() if i.cluster == cluster}
        self._desired(cluster).update({"instances": mine})

    def _desired(self, cluster: str) -> DeltaPublisher:
        """The publisher of *cluster*'s desired map: each change at once, the whole map once settled."""
        out = self._desired_out.get(cluster)
        if out is None:
            out = self._desired_out[cluster] = DeltaPublisher(
                self.session, channels.CLUSTER_DESIRED, "root", {"cluster": cluster},
                quiet=DESIRED_QUIET, full_every=DESIRED_FULL_EVERY)
        return out

    async def forget(self, removed: list[Instance], added: list[Instance] | None = None) -> None:
        """Drop removed instances from their clusters' desired maps (and put in the *added* ones that
        already have a cluster: a rollout's successors)."""
        for instance in removed:
            self.views.forget(instance.iid)
            self.placement.forget(instance.iid)
            self._ready_since.pop(instance.iid, None)
            self._ran.discard(instance.iid)
        added = added or []
        await self._tell_clusters({**{i.iid: i.cluster for i in removed}, **{i.iid: "" for i in added}},
                                  {**{i.iid: "" for i in removed}, **{i.iid: i.cluster for i in added}})

    # ---- what users see ----------------------------------------------------------------------

    def _tell_owner(self, instance: Instance, kind: str, what: str, **fields: str) -> None:
        """An event about *instance* for its service's owner."""
        service = self.catalog.services.get(instance.sid)
        if self.events and service:
            self.events.to(service.owner, kind, f"{service.job_name} #{instance.number}: {what}",
                           service=service.job_name, instance=instance.iid, **fields)

    def _tell_everyone(self, kind: str, what: str, **fields: str) -> None:
        """An event about the infrastructure, for every user."""
        if self.events:
            self.events.to_everyone(kind, what, **fields)

    def instance_status(self, instance: Instance) -> InstanceStatus:
        """The best-known status of one instance."""
        if not instance.cluster:
            reason = self.placement.unplaced.get(instance.iid, "")
            return InstanceStatus(models.NO_CLUSTER_CAPACITY if reason else models.REQUESTED, reason)
        view = self.clusters.get(instance.cluster)
        seen = view.statuses.get(instance.iid) if view else None
        if view is not None and view.lost_since:
            return models.lost(seen, f"cluster {view.name}", view.lost_since, cluster=view.name)
        if seen is None:
            return InstanceStatus(models.CLUSTER_SCHEDULED, cluster=instance.cluster)
        if view is not None and not view.online:
            return InstanceStatus(**{**seen.__dict__, "reason": f"cluster {view.name} is offline; last: {seen.status}"})
        return seen

    def service_state(self, service: Service) -> dict[str, Any]:
        """A service as its owner sees it: spec summary, overall status, every instance."""
        return self.views.state(service, self.catalog.instances_of(service.sid))

    async def flush_states(self) -> None:
        """Republish the retained state of every service that changed (a thousand rows each, at most: the
        event loop gets a turn between services), then hand :attr:`on_states` what changed."""
        taken_at = time.monotonic()
        dirty, self._dirty = self._dirty, set()
        if self.network and (self._net_dirty or dirty):
            self._net_dirty = False
            self.network.publish(self.catalog, self.clusters.values())
        self._list_states(taken_at, dirty, await self._publish_states(dirty))

    async def _publish_states(self, dirty: set[str]) -> Published:
        """Publish the state of each service in *dirty* that changed; return those, as JSON."""
        published: Published = {}
        if not dirty:
            return published
        by_service: dict[str, list[Instance]] = {sid: [] for sid in dirty}  # one pass over the catalog for all
        for instance in self.catalog.instances.values():
            mine = by_service.get(instance.sid)
            if mine is not None:
                mine.append(instance)
        slices = TimeSlices()
        for sid in dirty:
            await slices.turn()
            service = self.catalog.services.get(sid)
            if service is None:
                continue
            state = self.views.state(service, sorted(by_service[sid], key=lambda i: i.number))
            if self._published_state.fresh(sid, state):
                data = published[sid] = self.views.json_text(state).encode()
                self.session.send(channels.API_SERVICE_STATE, envelope.encode_json("service.state", data, "root"),
                                  user=service.owner, job=service.job_name)
        return published

    def _list_states(self, taken_at: float, dirty: set[str], published: Published) -> None:
        """Hand :attr:`on_states` what this publication changed: the states published, and the services of
        the owners of *dirty* (and of services deleted since)."""
        self._states_taken_at = taken_at
        owners = self._cleared | {s.owner for sid in dirty if (s := self.catalog.services.get(sid))}
        self._cleared = set()
        if self.on_states is None:
            return
        lists = {owner: tuple(s.sid for s in self.catalog.services_of(owner)) for owner in owners}
        self.on_states(StatesChange(taken_at, MappingProxyType(published), MappingProxyType(lists)))

    def states_now(self) -> StatesChange:
        """Every service's state as last published, whole: what a users' lane that starts begins with."""
        put: dict[str, bytes] = {}
        lists: dict[str, list[str]] = {}
        for service in sorted(self.catalog.services.values(), key=lambda s: s.job_name):
            lists.setdefault(service.owner, []).append(service.sid)
            state = self._published_state.last(service.sid)
            if isinstance(state, dict):
                put[service.sid] = json.dumps(state, separators=(",", ":")).encode()
        return StatesChange(self._states_taken_at, MappingProxyType(put),
                            MappingProxyType({owner: tuple(sids) for owner, sids in lists.items()}), whole=True)

    def mark(self, service: Service) -> None:
        """Note that *service* changed, so its state is republished (by the pass this kicks, after the
        request that changed it is answered)."""
        self._dirty.add(service.sid)
        self.kick()

    def volumes_of(self, owner: str) -> list[dict[str, Any]]:
        """The volumes of *owner*'s services on every worker, with their bytes, by service and volume."""
        mine = owner + "/"
        rows = [{"service": key.split("/")[1], "volume": key.split("/")[2], "cluster": view.name, "node": node.name,
                 "bytes": size, "online": node.online and view.online}
                for view in self.clusters.values() for node in view.nodes.values()
                for key, size in node.volumes.items() if key.startswith(mine) and key.count("/") == 2]
        return sorted(rows, key=lambda r: (r["service"], r["volume"], r["cluster"], r["node"]))

    def _delete_orphan_volumes(self, view: ClusterView, names: list[str]) -> None:
        """Delete again the volumes the online workers *names* of *view* still report though they were deleted
        with their application: a worker offline then may have missed the order (asked at most every
        ORPHAN_RETRY s per worker and volume)."""
        deleted = self.catalog.deleted_volumes
        now = time.monotonic()
        orphans = {f"{view.name}/{name}/{key}": key for name in names if view.nodes[name].online
                   for key in view.nodes[name].volumes if key in deleted}
        orphans = {where: key for where, key in orphans.items()
                   if now - self._orphans_asked.get(where, -ORPHAN_RETRY) >= ORPHAN_RETRY}
        if orphans:
            log.info("deleting volumes deleted with their application: %s", ", ".join(sorted(orphans)))
            self._orphans_asked = {w: t for w, t in self._orphans_asked.items() if now - t < ORPHAN_RETRY}
            self._orphans_asked.update(dict.fromkeys(orphans, now))
            self.delete_volumes(sorted(set(orphans.values())))

    def delete_volumes(self, keys: list[str]) -> None:
        """Ask every cluster to delete the volumes *keys* (``owner/job/volume``) from its workers."""
        for cluster in self.clusters:
            self.session.send(channels.CLUSTER_COMMAND, {"delete": keys}, cluster=cluster, verb="volumes")

    def clear_state(self, service: Service) -> None:
        """Remove a deleted service's retained state."""
        self._published_state.forget(service.sid)
        self._cleared.add(service.owner)
        self.session.send(channels.API_SERVICE_STATE, b"", user=service.owner, job=service.job_name)

    async def publish_infrastructure(self) -> None:
        """Republish, for every user, the retained clusters-and-workers view when it changed."""
        clusters = cluster_rows(self.clusters.values())
        slices = TimeSlices()
        for user in self.users():
            await slices.turn()
            data = {"clusters": clusters, "nodes": node_rows(self.clusters.values(), user)}
            if self._infrastructure.fresh(user, data):
                self.session.send(channels.API_INFRASTRUCTURE, data, "root", user=user)

    async def run(self) -> None:
        """Reconcile periodically (failover deadlines, retries) until cancelled."""
        ticks = 0
        try:
            while True:
                await asyncio.sleep(TICK)
                self.watch()
                await self.reconcile()
                ticks += 1
                if ticks % BEAT_EVERY == 0:
                    for name in self.clusters:
                        self.session.send(channels.CLUSTER_ROOT_BEAT, {"n": ticks}, cluster=name)
                if ticks % INFRASTRUCTURE_EVERY == 0:
                    await self.publish_infrastructure()
        finally:
            self._kicks.cancel()
            for timer in (self._roll_due, self._replace_due):
                if timer:
                    timer.cancel()
            for out in self._desired_out.values():
                out.close()
