"""The user-facing MQTT API of the root (Zigbee2MQTT style request/response).

A request is published on ``oak/api/<user>/request/<resource>/<action>``; the answer goes to
``oak/api/<user>/response/<resource>/<action>`` as ``{"ok": true, "data": ..., "transaction": ...}`` or
``{"ok": false, "error": {"code": ..., "message": ...}}``. The broker has already checked that the
publisher is ``<user>``. A bad request changes nothing.

Each user's requests are served in the order they came, and different users' side by side: one user's
deploy of a thousand replicas (or a flood of requests) never holds up another's ``services/list``.

Every request is answered exactly once: a request that fails in an unforeseen way is answered
``internal`` (and logged), and while more than *busy_backlog* requests wait for the root (those of
the same user, and any the root has not read yet: they come on a connection of their own, apart from
the clusters' traffic, through the users' lane, services/root/lane.py, which answers ``services/list``
itself), requests are answered ``busy`` at once, with ``retry_after`` seconds (the
backlog at the recent cost per request), instead of waiting behind the backlog until their sender
gives up.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from broker.credentials import Credentials
from broker.identity import CLUSTER, Identity
from services.common import channels, topics
from services.common.channels import Channel
from services.common.inbox import Received
from services.common.scheduling import unevaluated, unevaluated_reason
from services.common.sla import SECRET_NAME_RE, ServiceSpec, SlaError, parse_sla, updated
from services.root.answers import ApiError, one_less, request_body, stamped, transaction_of
from services.root.catalog import App, Catalog, Conflict, NotFound, Service
from services.root.joining import RootJoining
from services.root.orchestrator import RootOrchestrator
from services.root.rollout import PAUSED, RUNNING, Rollout
from services.root.secrets import Secrets
from services.root.streams import LogStreams
from services.root.views import cluster_rows, node_rows

log = logging.getLogger(__name__)

MAX_REPLICAS = 1000
BUSY_BACKLOG = 2000  # messages waiting for the root beyond which requests are answered "busy"
OVERLOAD_QUIET = 5.0  # seconds without a busy answer that end an overload (for its one log line)
DEFAULT_TOKEN_TTL = 24 * 3600.0


@dataclass(frozen=True)
class Request:
    """Who asks for what: the placeholders of ``oak/api/<user>/request/<resource>/<action>``."""

    user: str
    resource: str
    action: str


Handler = Callable[[str, Any], Awaitable[Any]]


class Replies(Protocol):
    """Where the answer to a request goes (the users' connection, :mod:`services.root.lane`)."""

    @property
    def backlog(self) -> int:
        """Requests received and not yet begun: past *busy_backlog*, requests are answered busy."""

    def send(self, channel: Channel[Any], data: Mapping[str, Any] | bytes, src: str = "", **names: str) -> None:
        """Send *data* on *channel*'s topic for *names*."""


class Busy(Exception):
    """The root is too far behind to serve a request now: retry in *retry_after* seconds."""

    def __init__(self, retry_after: float, backlog: int) -> None:
        super().__init__(f"the root is busy ({backlog} messages waiting): retry in {retry_after:.1f} s")
        self.retry_after = retry_after


class Api:
    """Serves the requests of every user."""

    def __init__(self, catalog: Catalog, orchestrator: RootOrchestrator, credentials: Credentials,
                 streams: LogStreams, joining: RootJoining | None = None, busy_backlog: int = BUSY_BACKLOG,
                 secrets: Secrets | None = None) -> None:
        self.catalog = catalog
        self.secrets = secrets
        self.busy_backlog = busy_backlog
        self._cost = 0.001  # seconds per request, a moving average (for the busy answer's retry_after)
        self._last_busy = float("-inf")
        self.orchestrator = orchestrator
        self.credentials = credentials
        self.streams = streams
        self.joining = joining
        self._taken: asyncio.Queue[tuple[Replies, Received[bytes]]] = asyncio.Queue()
        self._last: dict[str, asyncio.Task[None]] = {}  # each user's latest request being served or waiting
        self._waiting: Counter[str] = Counter()  # each user's requests taken and not yet begun
        self.routes: dict[tuple[str, str], Handler] = {
            ("apps", "create"): self.apps_create,
            ("apps", "list"): self.apps_list,
            ("apps", "delete"): self.apps_delete,
            ("services", "list"): self.services_list,
            ("services", "inspect"): self.services_inspect,
            ("services", "deploy"): self.services_deploy,
            ("services", "scale"): self.services_scale,
            ("services", "undeploy"): self.services_undeploy,
            ("services", "logs"): self.services_logs,
            ("services", "update"): self.services_update,
            ("services", "history"): self.services_history,
            ("services", "rollback"): self.services_rollback,
            ("services", "promote"): self.services_promote,
            ("volumes", "list"): self.volumes_list,
            ("volumes", "delete"): self.volumes_delete,
            ("secrets", "set"): self.secrets_set,
            ("secrets", "list"): self.secrets_list,
            ("secrets", "delete"): self.secrets_delete,
            ("clusters", "list"): self.clusters_list,
            ("nodes", "list"): self.nodes_list,
            ("users", "create"): self.users_create,
            ("users", "list"): self.users_list,
            ("tokens", "create"): self.tokens_create,
            ("clusters", "revoke"): self.clusters_revoke,
            ("nodes", "revoke"): self.nodes_revoke,
        }

    async def take(self, session: Replies, request: Received[bytes]) -> None:
        """Queue a request message for :meth:`run` (the inbox's handler: it returns at once)."""
        self._waiting[request.names["user"]] += 1
        self._taken.put_nowait((session, request))

    async def run(self) -> None:
        """Serve the requests :meth:`take` queued, each user's after the one before it, until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            while True:
                session, request = await self._taken.get()
                user = request.names["user"]
                task = tasks.create_task(self._after(self._last.get(user), session, request))
                self._last[user] = task
                task.add_done_callback(functools.partial(self._served, user))

    def _served(self, user: str, task: asyncio.Task[None]) -> None:
        if self._last.get(user) is task:
            del self._last[user]

    async def _after(self, previous: asyncio.Task[None] | None, session: Replies,
                     request: Received[bytes]) -> None:
        if previous is not None:
            await asyncio.wait((previous,))
        one_less(self._waiting, request.names["user"])
        await self.handle(session, request)

    async def handle(self, session: Replies, request: Received[bytes]) -> None:
        """Answer one request message."""
        parsed = Request(**request.names)
        transaction, body = None, None
        try:
            body = request_body(request.message.payload)
            transaction = transaction_of(body)
            backlog = session.backlog + self._waiting[parsed.user]
            if backlog > self.busy_backlog:
                raise Busy(round(max(1.0, backlog * self._cost), 1), backlog)
            handler = self.routes.get((parsed.resource, parsed.action))
            if handler is None:
                known = ", ".join(f"{r}/{a}" for r, a in self.routes)
                raise ApiError("unknown_action", f"no action {parsed.resource}/{parsed.action} (known: {known})")
            started = time.perf_counter()
            answer: dict[str, Any] = {"ok": True, "data": await handler(parsed.user, body)}
            self._cost += (time.perf_counter() - started - self._cost) / 16
        except Busy as exc:
            answer = {"ok": False, "error": {"code": "busy", "message": str(exc), "retry_after": exc.retry_after}}
        except ApiError as exc:
            answer = {"ok": False, "error": {"code": exc.code, "message": str(exc)}}
        except SlaError as exc:
            answer = {"ok": False, "error": {"code": "invalid_sla", "message": str(exc), "field": exc.field}}
        except NotFound as exc:
            answer = {"ok": False, "error": {"code": "not_found", "message": str(exc)}}
        except Conflict as exc:
            answer = {"ok": False, "error": {"code": "conflict", "message": str(exc)}}
        except Exception as exc:  # a bug: the request still gets its one answer, and the root serves on
            log.exception("%s %s/%s failed", parsed.user, parsed.resource, parsed.action)
            answer = {"ok": False, "error": {"code": "internal", "message": f"the root failed: {exc!r}"}}
        answer = stamped(answer, transaction)
        busy = not answer["ok"] and answer["error"]["code"] == "busy"
        self._note_overload(busy, answer)
        if not answer["ok"] and not busy:
            log.info("%s %s/%s refused: %s", parsed.user, parsed.resource, parsed.action, answer["error"]["message"])
            if self.orchestrator.events:
                self.orchestrator.events.to(parsed.user, "refused", f"{parsed.resource}/{parsed.action} refused",
                                            reason=str(answer["error"]["message"])[:300])
        session.send(channels.API_RESPONSE, answer, user=parsed.user, resource=parsed.resource, action=parsed.action)

    def _note_overload(self, busy: bool, answer: dict[str, Any]) -> None:
        """Log an overload once, when it begins (after OVERLOAD_QUIET seconds without a busy answer)."""
        if not busy:
            return
        now = time.monotonic()
        if now - self._last_busy > OVERLOAD_QUIET:
            log.warning("%s; answering requests busy until it catches up", answer["error"]["message"])
        self._last_busy = now

    # ---- argument helpers ---------------------------------------------------------------------

    @staticmethod
    def _arg(body: Any, name: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
        if not isinstance(body, dict):
            raise ApiError("bad_request", "the request must be a JSON object")
        value = body.get(name)
        if value is None:
            if required:
                raise ApiError("bad_request", f"missing {name!r}")
            return None
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise ApiError("bad_request", f"{name!r} has the wrong type")
        return value

    def _replicas(self, body: Any, default: int | None) -> int:
        value = self._arg(body, "replicas", int, required=default is None)
        value = default if value is None else value
        if value is None or not 0 <= value <= MAX_REPLICAS:
            raise ApiError("bad_request", f"'replicas' must be between 0 and {MAX_REPLICAS}")
        return int(value)

    def _service(self, user: str, body: Any) -> Service:
        return self.catalog.find_service(user, self._arg(body, "service", str))

    # ---- apps --------------------------------------------------------------------------------

    def _app_view(self, app: App) -> dict[str, Any]:
        return {
            "app_id": app.app_id,
            "name": app.name,
            "namespace": app.namespace,
            "desc": app.desc,
            "services": [
                {"service_id": sid, "job_name": self.catalog.services[sid].job_name}
                for sid in app.services
                if sid in self.catalog.services
            ],
        }

    async def apps_create(self, user: str, body: Any) -> Any:
        """Create the applications of an SLA (nothing is deployed yet)."""
        specs = parse_sla(body)
        for spec in specs:
            if any(a.name == spec.name and a.namespace == spec.namespace for a in self.catalog.apps_of(user)):
                raise Conflict(f"application {spec.name}.{spec.namespace} exists already")
        created = [await self.catalog.create_app(user, spec) for spec in specs]
        for app in created:
            for service in self.catalog.services_of(user, app.app_id):
                self.orchestrator.mark(service)
        return [self._app_view(app) for app in created]

    async def apps_list(self, user: str, body: Any) -> Any:
        """The user's applications with their services."""
        return [self._app_view(app) for app in self.catalog.apps_of(user)]

    async def apps_delete(self, user: str, body: Any) -> Any:
        """Undeploy and delete an application and all its services."""
        app = self.catalog.find_app(user, self._arg(body, "app", str))
        removed = [i for sid in app.services for i in self.catalog.instances_of(sid)]
        volumes = self._volume_keys(user, [self.catalog.services[sid] for sid in app.services
                                           if sid in self.catalog.services])
        services = await self.catalog.delete_app(app, volumes)
        await self.orchestrator.forget(removed)
        for service in services:
            self.orchestrator.clear_state(service)
        if volumes:
            self.orchestrator.delete_volumes(volumes)
        return {"app_id": app.app_id, "deleted_services": [s.job_name for s in services], "deleted_volumes": volumes}

    # ---- services ----------------------------------------------------------------------------

    async def services_list(self, user: str, body: Any) -> Any:
        """The user's services (of one application if ``app`` is given) with their status."""
        app_ref = self._arg(body, "app", str, required=False) if body else None
        app_id = self.catalog.find_app(user, app_ref).app_id if app_ref else None
        return [self.orchestrator.service_state(s) for s in self.catalog.services_of(user, app_id)]

    async def services_inspect(self, user: str, body: Any) -> Any:
        """One service with every instance."""
        return self.orchestrator.service_state(self._service(user, body))

    async def _scale(self, service: Service, replicas: int) -> Any:
        if replicas > 0:
            self._check_constraints_evaluated(service)
            self._check_secrets(service.owner, service.spec)
        added, removed = await self.catalog.set_replicas(service, replicas)
        await self.orchestrator.forget(removed)
        service = self.catalog.services[service.sid]
        self.orchestrator.mark(service)
        self.orchestrator.kick()  # placement runs after this answer, in the orchestrator's own pass
        return {**self.orchestrator.service_state(service), "added": [i.number for i in added],
                "removed": [i.number for i in removed]}

    def _check_constraints_evaluated(self, service: Service, spec: ServiceSpec | None = None) -> None:
        """Refuse to run *service* (its new *spec*) when no scheduler plugin of the root would honour one of
        its constraints."""
        kinds = [c["type"] for c in (spec or service.spec).constraints]  # checked when the SLA was accepted
        missing = unevaluated(self.orchestrator.profile, kinds)
        if missing:
            raise ApiError("missing_plugin", unevaluated_reason(self.orchestrator.profile, missing))

    async def services_deploy(self, user: str, body: Any) -> Any:
        """Deploy a service with ``replicas`` instances (default 1); refused when the root's scheduler
        plugins would ignore one of its constraints."""
        replicas = self._replicas(body, 1)
        if replicas < 1:
            raise ApiError("bad_request", "deploy needs at least 1 replica (use undeploy to stop a service)")
        return await self._scale(self._service(user, body), replicas)

    async def services_scale(self, user: str, body: Any) -> Any:
        """Set the number of instances of a service."""
        return await self._scale(self._service(user, body), self._replicas(body, None))

    async def services_undeploy(self, user: str, body: Any) -> Any:
        """Stop every instance of a service, or only ``instance`` (its number)."""
        service = self._service(user, body)
        number = self._arg(body, "instance", int, required=False)
        if number is None:
            return await self._scale(service, 0)
        removed = await self.catalog.remove_instance(service, number)
        await self.orchestrator.forget([removed])
        self.orchestrator.mark(self.catalog.services[service.sid])
        return self.orchestrator.service_state(self.catalog.services[service.sid])

    # ---- revisions ---------------------------------------------------------------------------

    async def services_update(self, user: str, body: Any) -> Any:
        """Make a new revision of a service from ``microservice`` (a whole SLA microservice, or the fields
        to change) and roll it out as its ``update`` policy says; ``changed`` lists what changed (nothing:
        no new revision)."""
        service = self._service(user, body)
        spec, changed = updated(service.spec, self._arg(body, "microservice", dict))
        if changed:
            if service.replicas:
                self._check_constraints_evaluated(service, spec)
                self._check_secrets(user, spec)
            service = await self.catalog.update(service, spec, ", ".join(changed))
            self.orchestrator.mark(service)
        return {**self.orchestrator.service_state(service), "changed": changed}

    async def services_history(self, user: str, body: Any) -> Any:
        """A service's revisions, oldest first: when each was made and what it changed."""
        service = self._service(user, body)
        return [{"revision": r.number, "at": r.at, "change": r.change, "current": r.number == service.revision,
                 "spec": r.spec.to_sla()} for r in self.catalog.revisions_of(service.sid)]

    async def services_rollback(self, user: str, body: Any) -> Any:
        """Roll a service back to ``revision`` (default: the one before its latest rollout), replacing its
        instances as an update does."""
        service = self._service(user, body)
        current = service.revision
        default = service.rollout.previous if service.rollout and service.rollout.previous else current - 1
        number = self._arg(body, "revision", int, required=False) or default
        known = [r.number for r in self.catalog.revisions_of(service.sid)]
        if number not in known:
            raise NotFound(f"{service.job_name} has no revision {number} (it has {', '.join(map(str, known))})")
        if number == current and not (service.rollout and service.rollout.active):
            raise Conflict(f"{service.job_name} is at revision {number} already")
        rollout = Rollout(number, RUNNING, f"rollback from revision {current}")
        service = await self.catalog.set_revision(service, number, rollout)
        self.orchestrator.mark(service)
        return self.orchestrator.service_state(service)

    async def services_promote(self, user: str, body: Any) -> Any:
        """Let a rollout paused for its canaries go on: the canaries stay, the old instances are replaced."""
        service = self._service(user, body)
        if not service.rollout or service.rollout.state != PAUSED:
            state = service.rollout.state if service.rollout else "none"
            raise Conflict(f"{service.job_name} has no rollout waiting to be promoted (latest: {state})")
        service = await self.catalog.set_rollout(service, Rollout(service.rollout.revision, RUNNING, "promoted",
                                                                  previous=service.rollout.previous))
        self.orchestrator.mark(service)
        return self.orchestrator.service_state(service)

    # ---- volumes -----------------------------------------------------------------------------

    def _volume_keys(self, user: str, services: list[Service], name: str | None = None) -> list[str]:
        """The volumes (``owner/job/volume``) of *services*, or only those called *name*: those any of their
        revisions declares, and those workers report."""
        jobs = {s.job_name for s in services}
        declared = {f"{user}/{s.job_name}/{v.name}" for s in services for r in self.catalog.revisions_of(s.sid)
                    for v in r.spec.volumes if name in (None, v.name)}
        reported = {f"{user}/{r['service']}/{r['volume']}" for r in self.orchestrator.volumes_of(user)
                    if r["service"] in jobs and name in (None, r["volume"])}
        return sorted(declared | reported)

    async def volumes_list(self, user: str, body: Any) -> Any:
        """The user's volumes: service, volume, the worker holding it, its bytes."""
        return self.orchestrator.volumes_of(user)

    async def volumes_delete(self, user: str, body: Any) -> Any:
        """Delete a service's volumes (or only ``volume``) from every worker; refused while it runs."""
        service = self._service(user, body)
        name = self._arg(body, "volume", str, required=False)
        if self.catalog.instances_of(service.sid):
            raise Conflict(f"{service.job_name} runs: undeploy it before deleting its volumes")
        keys = self._volume_keys(user, [service], name)
        if not keys:
            raise NotFound(f"no volume{f' {name!r}' if name else ''} of {service.job_name} on any worker")
        self.orchestrator.delete_volumes(keys)
        return {"deleted": keys}

    # ---- secrets -----------------------------------------------------------------------------

    def _secret_store(self) -> Secrets:
        if self.secrets is None:
            raise ApiError("unavailable", "this root keeps no secrets")
        return self.secrets

    def _secret_name(self, body: Any) -> str:
        name = self._arg(body, "name", str)
        if not SECRET_NAME_RE.fullmatch(name):
            raise ApiError("bad_request", f"{name[:40]!r} is not a secret name (1-63 of a-z, 0-9, '.', '_', '-')")
        return str(name)

    def _check_secrets(self, user: str, spec: ServiceSpec) -> None:
        """Refuse to run *spec* while a secret it needs does not exist."""
        if not spec.secret_names:
            return
        missing = [n for n in spec.secret_names if not self._secret_store().exists(user, n)]
        if missing:
            raise ApiError("missing_secret", f"{spec.job_name} needs the secret(s) {', '.join(missing)}: "
                                             f"oak secret set {missing[0]} --value ... (or --from-file)")

    def _users_of(self, user: str, name: str) -> list[Service]:
        return [s for s in self.catalog.services_of(user) if name in s.spec.secret_names]

    async def secrets_set(self, user: str, body: Any) -> Any:
        """Set the user's secret ``name`` to ``value`` (text) or ``value_b64``; the running services that
        use it roll to a new revision (their instances start again with the new value). The answer never
        holds the value."""
        name = self._secret_name(body)
        text, b64 = self._arg(body, "value", str, required=False), self._arg(body, "value_b64", str, required=False)
        if (text is None) == (b64 is None):
            raise ApiError("bad_request", "give the secret's 'value' or its 'value_b64', one of them")
        try:
            value = text.encode() if text is not None else base64.b64decode(b64, validate=True)
        except ValueError:
            raise ApiError("bad_request", "'value_b64' is not base64") from None
        try:
            secret = await self._secret_store().set(user, name, value)
        except ValueError as exc:
            raise ApiError("bad_request", str(exc)) from None
        rolled = []
        for service in self._users_of(user, name) if secret.version > 1 else []:
            if service.replicas:
                service = await self.catalog.update(service, service.spec, f"secret {name}")
                self.orchestrator.mark(service)
                rolled.append(service.job_name)
        return {"name": name, "version": secret.version, "size": secret.size, "rolled": rolled}

    async def secrets_list(self, user: str, body: Any) -> Any:
        """The user's secrets: name, version, when set, size and the services using each (never values)."""
        return [{"name": s.name, "version": s.version, "at": s.at, "size": s.size,
                 "used_by": [u.job_name for u in self._users_of(user, s.name)]}
                for s in self._secret_store().of(user)]

    async def secrets_delete(self, user: str, body: Any) -> Any:
        """Delete the user's secret ``name``; refused while a service uses it."""
        name = self._secret_name(body)
        used = self._users_of(user, name)
        if used:
            raise Conflict(f"secret {name} is used by {', '.join(s.job_name for s in used)}: update or delete "
                           "those first")
        await self._secret_store().delete(user, name)
        return {"name": name, "deleted": True}

    async def services_logs(self, user: str, body: Any) -> Any:
        """Stream the logs of a service's instances (or of ``instance``): the last ``tail`` lines (default
        100), then for ``follow`` seconds new ones, as further answers; ``stop`` ends a stream early."""
        stop = self._arg(body, "stop", str, required=False)
        if stop is not None:
            if not self.streams.stop(user, stop):
                raise ApiError("not_found", f"no log stream {stop!r}")
            return {"stopped": stop}
        service = self._service(user, body)
        number = self._arg(body, "instance", int, required=False)
        tail = self._arg(body, "tail", int, required=False)
        follow = self._arg(body, "follow", (int, float), required=False) or 0
        if tail is not None and not 0 <= tail <= 10_000:
            raise ApiError("bad_request", "'tail' must be between 0 and 10000")
        if not 0 <= follow <= 3600:
            raise ApiError("bad_request", "'follow' is seconds, between 0 and 3600")
        chosen = [i for i in self.catalog.instances_of(service.sid) if number in (None, i.number)]
        if number is not None and not chosen:
            raise NotFound(f"service {service.job_name} has no instance {number}")
        placed = {i.iid: (i.number, i.cluster) for i in chosen if i.cluster}
        if not placed:
            raise ApiError("not_running", f"{service.job_name} has no instance on a cluster")
        stream = self.streams.open(user, transaction_of(body), placed, 100 if tail is None else tail, float(follow))
        return {"stream": stream, "instances": sorted(n for n, _ in placed.values())}

    # ---- infrastructure ----------------------------------------------------------------------

    async def clusters_list(self, user: str, body: Any) -> Any:
        """Every cluster: online, location, workers and their aggregate capacity."""
        rows = cluster_rows(self.orchestrator.clusters.values())
        for row in rows:
            certificate = self.credentials.certificate(Identity(CLUSTER, row["name"]).username)
            row["cert_expires"] = certificate[1] if certificate else 0.0
        return rows

    async def nodes_list(self, user: str, body: Any) -> Any:
        """Every worker of every cluster."""
        return node_rows(self.orchestrator.clusters.values(), user)

    # ---- users -------------------------------------------------------------------------------

    def _admin(self, user: str) -> None:
        if not self.credentials.is_admin(user):
            raise ApiError("forbidden", "only an administrator may manage users")

    async def users_create(self, user: str, body: Any) -> Any:
        """Create a user (administrators only); with ``csr``, also a certificate that logs it in."""
        self._admin(user)
        name = self._arg(body, "username", str)
        password = self._arg(body, "password", str)
        admin = bool(self._arg(body, "admin", bool, required=False))
        if not topics.is_valid_id(name):
            raise ApiError("bad_request", f"bad username {name!r}: use letters, digits, '-' and '_' (at most 63)")
        if len(password) < 8:
            raise ApiError("bad_request", "the password must have at least 8 characters")
        csr = self._arg(body, "csr", str, required=False)
        if self.credentials.exists(name):
            raise Conflict(f"user {name!r} exists already")
        await self.credentials.set_password(name, password, admin=admin)
        if csr is None:
            return {"username": name, "admin": admin}
        try:
            issued = await self._joining().user_certificate(self.credentials, name, csr)
        except ValueError as exc:
            await self.credentials.remove(name)
            raise ApiError("bad_request", f"csr: {exc}") from None
        return {"username": name, "admin": admin, **issued}

    async def tokens_create(self, user: str, body: Any) -> Any:
        """A join token and its join command (administrators only): ``{"cluster": bool, "ttl": seconds,
        "uses": n}``, by default for a worker, valid 24 hours, any number of times."""
        self._admin(user)
        joining = self._joining()
        for_cluster = bool(self._arg(body, "cluster", bool, required=False))
        ttl = self._arg(body, "ttl", (int, float), required=False)
        uses = self._arg(body, "uses", int, required=False)
        try:
            return await joining.create(for_cluster, DEFAULT_TOKEN_TTL if ttl is None else float(ttl), uses)
        except ValueError as exc:
            raise ApiError("bad_request", str(exc)) from None

    def _joining(self) -> RootJoining:
        if self.joining is None:
            raise ApiError("unavailable", "this root runs on a broker it does not manage: joining is its operator's")
        return self.joining

    async def clusters_revoke(self, user: str, body: Any) -> Any:
        """Refuse a cluster from now on and disconnect it; its instances move (administrators only)."""
        self._admin(user)
        name = self._arg(body, "cluster", str)
        if not topics.is_valid_id(name) or not await self._joining().revoke_cluster(name):
            raise ApiError("not_found", f"no cluster {name!r} has joined")
        return {"cluster": name, "revoked": True}

    async def nodes_revoke(self, user: str, body: Any) -> Any:
        """Have a worker's cluster refuse it from now on and disconnect it; its instances move (admins only)."""
        self._admin(user)
        name = self._arg(body, "node", str)
        holders = [view.name for view in self.orchestrator.clusters.values() if name in view.nodes]
        if not holders:
            raise ApiError("not_found", f"no worker {name!r} is known")
        self._joining().revoke_node(holders[0], name)
        return {"node": name, "cluster": holders[0], "revoked": True}

    async def users_list(self, user: str, body: Any) -> Any:
        """Every user (administrators only)."""
        self._admin(user)
        return [
            {"username": name, "admin": self.credentials.is_admin(name)}
            for name in self.credentials.users()
        ]
