"""The root's durable records: applications, services and their instances, per user.

Everything here is in memory and written through to TinyDB before a change is acknowledged; changes
are made one at a time (each sees what the one before it wrote), whichever user or pass asks.
Service ids and instance ids are short random hex strings, unique across users; a service's job name
(``app.appns.svc.svcns``) is unique per user only, so two users may use the same names. Each service
gets its round-robin and closest IPs when created; they are free again once it is deleted.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from services.common import addressing, models
from services.common.models import InstanceSpec
from services.common.plugin_api import Demand
from services.common.sla import AppSpec, ServiceSpec
from services.common.store import Store
from services.common.throttle import TimeSlices
from services.root.rollout import PAUSED, RUNNING, SUCCEEDED, Rollout

APPS, SERVICES, INSTANCES, CLUSTERS, REVISIONS = "apps", "services", "instances", "clusters", "revisions"
DELETED_VOLUMES = "deleted_volumes"  # owner/job/volume -> {"at"}: deleted with their application
WRITE_CHUNK = 250  # instance records handed to the store at a time when thousands change at once


class NotFound(LookupError):
    """No such application, service or instance for this user."""


class Conflict(ValueError):
    """The thing to create exists already."""


def new_id() -> str:
    """A fresh id for an application, service or instance."""
    return secrets.token_hex(5)


@dataclass(frozen=True)
class App:
    """An application: a named group of services owned by one user."""

    app_id: str
    owner: str
    name: str
    namespace: str
    desc: str
    services: tuple[str, ...]


@dataclass(frozen=True)
class Service:
    """A service: the spec of the revision its instances should run, how many, and its latest rollout."""

    sid: str
    owner: str
    app_id: str
    spec: ServiceSpec
    replicas: int = 0
    next_number: int = 0
    rr_ip: str = ""
    closest_ip: str = ""
    revision: int = 1
    rollout: Rollout | None = None

    @property
    def job_name(self) -> str:
        """Oakestra's ``app.appns.svc.svcns`` name."""
        return self.spec.job_name

    @functools.cached_property
    def demand(self) -> Demand:
        """What each instance of the service asks of the place it runs on."""
        return models.demand_of(self.spec, f"{self.owner}/{self.job_name}")

    def instance(self, instance: Instance, spec: ServiceSpec) -> InstanceSpec:
        """The desired-map entry of one of this service's instances, which runs *spec* (its revision's)."""
        return InstanceSpec(instance.iid, self.owner, self.job_name, instance.number, spec, self.sid,
                            self.rr_ip, self.closest_ip, instance.prefer)


@dataclass(frozen=True)
class Instance:
    """One instance of a service: the cluster it is assigned to ('' while unplaced), the revision it
    runs, when it was made, and the worker it should go to when it can (its predecessor's)."""

    iid: str
    sid: str
    number: int
    cluster: str = ""
    revision: int = 1
    created: float = 0.0
    prefer: str = ""


@dataclass(frozen=True)
class Revision:
    """One accepted version of a service's spec, when it was accepted and what it changed."""

    sid: str
    number: int
    spec: ServiceSpec
    at: float
    change: str


def _revision_key(sid: str, number: int) -> str:
    return f"{sid}.{number}"


def _load_table(raw: dict[str, dict[str, Any]], cls: type) -> dict[str, object]:
    return {key: models.load(cls, {**doc, "services": tuple(doc.get("services", ()))} if cls is App else doc)
            for key, doc in raw.items()}


class Catalog:
    """Applications, services and instances of every user."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.apps: dict[str, App] = {}
        self.services: dict[str, Service] = {}
        self.instances: dict[str, Instance] = {}
        self.revisions: dict[str, Revision] = {}  # by _revision_key
        self.known_clusters: set[str] = set()
        #: Volumes (``owner/job/volume``) deleted with their application, until a service of that name is
        #: created again: a worker that was away then still holds them and is asked again (orchestrator).
        self.deleted_volumes: set[str] = set()
        self._changing = asyncio.Lock()

    async def load(self) -> None:
        """Read every record from the store."""
        self.apps = _load_table(await self.store.load(APPS), App)  # type: ignore[assignment]
        self.services = _load_table(await self.store.load(SERVICES), Service)  # type: ignore[assignment]
        self.instances = _load_table(await self.store.load(INSTANCES), Instance)  # type: ignore[assignment]
        self.known_clusters = set(await self.store.load(CLUSTERS))
        self.revisions = _load_table(await self.store.load(REVISIONS), Revision)  # type: ignore[assignment]
        self.deleted_volumes = set(await self.store.load(DELETED_VOLUMES))
        for service in self.services.values():  # a store from before revisions: the spec is revision 1
            self.revisions.setdefault(_revision_key(service.sid, service.revision),
                                      Revision(service.sid, service.revision, service.spec, 0.0, "created"))

    # ---- look-ups ----------------------------------------------------------------------------

    def apps_of(self, owner: str) -> list[App]:
        """A user's applications, by name."""
        return sorted((a for a in self.apps.values() if a.owner == owner), key=lambda a: (a.name, a.namespace))

    def services_of(self, owner: str, app_id: str | None = None) -> list[Service]:
        """A user's services (of one application when *app_id* is given), by job name."""
        found = [s for s in self.services.values() if s.owner == owner and app_id in (None, s.app_id)]
        return sorted(found, key=lambda s: s.job_name)

    def instances_of(self, sid: str) -> list[Instance]:
        """A service's instances, by number."""
        return sorted((i for i in self.instances.values() if i.sid == sid), key=lambda i: i.number)

    def revisions_of(self, sid: str) -> list[Revision]:
        """A service's revisions, oldest first."""
        return sorted((r for r in self.revisions.values() if r.sid == sid), key=lambda r: r.number)

    def instance_spec(self, instance: Instance) -> InstanceSpec:
        """The desired-map entry of *instance*: its service's, with its own revision's spec."""
        service = self.services[instance.sid]
        revision = self.revisions.get(_revision_key(instance.sid, instance.revision))
        return service.instance(instance, revision.spec if revision else service.spec)

    def find_app(self, owner: str, ref: object) -> App:
        """The user's application with this id or name (``name`` or ``name.namespace``)."""
        for app in self.apps_of(owner):
            if ref in (app.app_id, app.name, f"{app.name}.{app.namespace}"):
                return app
        raise NotFound(f"no application {ref!r}")

    def find_service(self, owner: str, ref: object) -> Service:
        """The user's service with this id or job name."""
        for service in self.services_of(owner):
            if ref in (service.sid, service.job_name):
                return service
        raise NotFound(f"no service {ref!r}")

    # ---- changes -----------------------------------------------------------------------------

    async def create_app(self, owner: str, spec: AppSpec) -> App:
        """Create an application and its services (not deployed yet)."""
        async with self._changing:
            return await self._create_app(owner, spec)

    async def _create_app(self, owner: str, spec: AppSpec) -> App:
        if any(a.name == spec.name and a.namespace == spec.namespace for a in self.apps_of(owner)):
            raise Conflict(f"application {spec.name}.{spec.namespace} exists already")
        app_id = new_id()
        used = {ip for s in self.services.values() for ip in (s.rr_ip, s.closest_ip)}
        services = []
        for svc in spec.services:
            try:
                rr_ip, closest_ip = addressing.service_ips(svc.rr_ip, used)
            except addressing.Exhausted as exc:
                raise Conflict(str(exc)) from None
            used |= {rr_ip, closest_ip}
            services.append(Service(new_id(), owner, app_id, svc, rr_ip=rr_ip, closest_ip=closest_ip))
        app = App(app_id, owner, spec.name, spec.namespace, spec.desc, tuple(s.sid for s in services))
        revisions = [Revision(s.sid, 1, s.spec, time.time(), "created") for s in services]
        names = {f"{owner}/{s.job_name}/" for s in services}
        revived = tuple(key for key in self.deleted_volumes if key[:key.rindex("/") + 1] in names)
        if revived:  # a service of that name again: its volumes, where a worker still holds them, are its own
            self.store.apply(DELETED_VOLUMES, {}, revived)
        self.store.apply(REVISIONS, {_revision_key(r.sid, 1): _revision_doc(r) for r in revisions})
        self.store.apply(SERVICES, {s.sid: models.dump(s) for s in services})
        self.store.apply(APPS, {app_id: models.dump(app)})
        await self.store.sync()  # one write: the application is on disk whole or not at all
        self.deleted_volumes.difference_update(revived)
        self.apps[app_id] = app
        self.services.update({s.sid: s for s in services})
        self.revisions.update({_revision_key(r.sid, 1): r for r in revisions})
        return app

    async def delete_app(self, app: App, volumes: Sequence[str] = ()) -> list[Service]:
        """Delete an application, its services and their instances, and remember its *volumes* as deleted;
        return the services deleted."""
        async with self._changing:
            return await self._delete_app(app, volumes)

    async def _delete_app(self, app: App, volumes: Sequence[str]) -> list[Service]:
        if volumes:
            self.store.apply(DELETED_VOLUMES, {key: {"at": time.time()} for key in volumes})
        gone = [self.services[sid] for sid in app.services if sid in self.services]
        iids = tuple(i.iid for s in gone for i in self.instances_of(s.sid))
        self.store.apply(INSTANCES, {}, iids)
        self.store.apply(SERVICES, {}, tuple(s.sid for s in gone))
        revisions = tuple(key for key, r in self.revisions.items() if r.sid in app.services)
        self.store.apply(REVISIONS, {}, revisions)
        self.store.apply(APPS, {}, (app.app_id,))
        await self.store.sync()  # one write: the application is gone from disk whole or not at all
        self.deleted_volumes.update(volumes)
        for key in revisions:
            del self.revisions[key]
        for iid in iids:
            del self.instances[iid]
        for service in gone:
            del self.services[service.sid]
        del self.apps[app.app_id]
        return gone

    async def set_replicas(self, service: Service, replicas: int) -> tuple[list[Instance], list[Instance]]:
        """Add or remove (highest numbers first) instances to reach *replicas*; return (added, removed)."""
        async with self._changing:
            return await self._set_replicas(self.services.get(service.sid, service), replicas)

    async def _set_replicas(self, service: Service, replicas: int) -> tuple[list[Instance], list[Instance]]:
        current = self.instances_of(service.sid)
        now = time.time()
        added = [
            Instance(new_id(), service.sid, service.next_number + k, revision=service.revision, created=now)
            for k in range(max(0, replicas - len(current)))
        ]
        removed = current[replicas:] if replicas < len(current) else []
        await self._commit(service, replicas, added, removed)
        return added, removed

    async def remove_instance(self, service: Service, number: int) -> Instance:
        """Remove the instance *number* of *service*."""
        async with self._changing:
            service = self.services.get(service.sid, service)
            for instance in self.instances_of(service.sid):
                if instance.number == number:
                    await self._commit(service, service.replicas - 1, [], [instance])
                    return instance
        raise NotFound(f"service {service.job_name} has no instance {number}")

    async def _commit(self, service: Service, replicas: int, added: list[Instance], removed: list[Instance],
                      numbered: int | None = None) -> None:
        """Store *service* with *replicas*, *added* instances (*numbered* of them took new numbers: all, by
        default) and without *removed* ones, then take it all in."""
        numbered = len(added) if numbered is None else numbered
        updated = replace(service, replicas=replicas, next_number=service.next_number + numbered)
        self.store.apply(INSTANCES, {i.iid: models.dump(i) for i in added}, tuple(i.iid for i in removed))
        self.store.apply(SERVICES, {updated.sid: models.dump(updated)})
        await self.store.sync()  # one write for the service and its instances
        self.services[updated.sid] = updated
        for instance in removed:
            del self.instances[instance.iid]
        self.instances.update({i.iid: i for i in added})

    async def assign(self, changes: dict[str, str]) -> None:
        """Record the cluster of each instance in *changes* (``''`` = unplaced)."""
        if not changes:
            return
        async with self._changing:
            await self._assign(changes)

    async def _assign(self, changes: dict[str, str]) -> None:
        updated: dict[str, Instance] = {}
        slices = TimeSlices()  # a pass may place thousands: their records are made between turns of the loop
        for iid, cluster in changes.items():
            if iid in self.instances:
                updated[iid] = replace(self.instances[iid], cluster=cluster)
                await slices.turn()
        records = iter(updated.items())
        while chunk := dict(itertools.islice(records, WRITE_CHUNK)):
            self.store.apply(INSTANCES, {iid: models.dump(i) for iid, i in chunk.items()})
            await slices.turn()
        new_clusters = {c for c in changes.values() if c and c not in self.known_clusters}
        if new_clusters:
            self.store.apply(CLUSTERS, {c: {} for c in new_clusters})
        await self.store.sync()
        self.instances.update({iid: i for iid, i in updated.items() if iid in self.instances})
        self.known_clusters |= new_clusters

    # ---- revisions and rollouts -----------------------------------------------------------------

    async def update(self, service: Service, spec: ServiceSpec, change: str) -> Service:
        """Make *spec* the service's next revision and start rolling it out (paused for its canaries
        first, when the policy has some and instances run; at once done when none run)."""
        async with self._changing:
            service = self.services[service.sid]
            number = max((r.number for r in self.revisions_of(service.sid)), default=0) + 1
            revision = Revision(service.sid, number, spec, time.time(), change)
            running = bool(self.instances_of(service.sid))
            state = (PAUSED if spec.update_policy.canary else RUNNING) if running else SUCCEEDED
            updated = replace(service, spec=spec, revision=number,
                              rollout=Rollout(number, state, "" if running else "no instance to replace",
                                              previous=service.revision))
            key = _revision_key(service.sid, number)
            self.store.apply(REVISIONS, {key: _revision_doc(revision)})
            self.store.apply(SERVICES, {service.sid: models.dump(updated)})
            await self.store.sync()  # one write for the revision and the service that runs it
            self.revisions[key] = revision
            self.services[service.sid] = updated
            return updated

    async def set_revision(self, service: Service, number: int, rollout: Rollout) -> Service:
        """Make revision *number* the one the service's instances should run again (a rollback)."""
        async with self._changing:
            spec = self.revisions[_revision_key(service.sid, number)].spec
            return await self._store_service(replace(self.services[service.sid], spec=spec, revision=number,
                                                     rollout=rollout))

    async def set_rollout(self, service: Service, rollout: Rollout) -> Service:
        """Record the state of the service's rollout."""
        async with self._changing:
            return await self._store_service(replace(self.services[service.sid], rollout=rollout))

    async def _store_service(self, service: Service) -> Service:
        await self.store.put(SERVICES, service.sid, models.dump(service))
        self.services[service.sid] = service
        return service

    async def roll(self, service: Service, replaced: tuple[Instance, ...], removed: tuple[Instance, ...],
                   canaries: int, nodes: dict[str, str]) -> tuple[list[Instance], list[Instance]]:
        """One step of a rollout, stored at once: each of *replaced* gives way to an instance of the
        service's revision with its number, on its cluster and (*nodes*: iid -> worker) its worker when
        it fits; *removed* go; *canaries* new instances start beside. Return (added, removed)."""
        async with self._changing:
            service = self.services[service.sid]
            now = time.time()
            added = [Instance(new_id(), service.sid, old.number, old.cluster, service.revision, now,
                              nodes.get(old.iid, "")) for old in replaced]
            added += [Instance(new_id(), service.sid, service.next_number + k, revision=service.revision,
                               created=now) for k in range(canaries)]
            gone = [*replaced, *removed]
            await self._commit(service, service.replicas, added, gone, numbered=canaries)
            return added, gone


def _revision_doc(revision: Revision) -> dict[str, Any]:
    return {"sid": revision.sid, "number": revision.number, "spec": revision.spec.to_dict(), "at": revision.at,
            "change": revision.change}
