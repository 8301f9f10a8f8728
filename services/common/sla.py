"""Oakestra's SLA v2.0 deployment descriptor: parsed and validated with errors that name the field.

Accepted as Oakestra accepts it (extra keys pass through untouched); rejected with :class:`SlaError`
whose ``field`` is the JSON path of the culprit, e.g. ``applications[0].microservices[1].memory``.
Garbage of any shape gives an :class:`SlaError`, never a crash.

Paths: ``$`` is the document itself; a missing or mistyped top-level key is ``$.<key>``
(``$.sla_version``, ``$.customerID``); an unsupported version is ``sla_version``; everything below
starts at ``applications``.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from services.common import wire

NAME_RE = re.compile(r"[a-zA-Z0-9]{1,30}")
VIRT_RE = re.compile(r"[a-z0-9_-]{1,30}")
ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.DOTALL)
PORT_RE = re.compile(r"([0-9]{1,5})(?::([0-9]{1,5}))?(?:/(tcp|udp))?")
VM_VIRTUALIZATIONS = ("unikernel", "microvm")  # their code is a kernel (or archive) per architecture
CONSTRAINT_TYPES = ("direct", "geo", "latency", "addons", "clusters")
RR_NET = ipaddress.ip_network("10.30.0.0/16")
#: Microservice keys that become :class:`ServiceSpec` fields (``addresses`` is handled apart: only ``rr_ip`` is taken).
MICRO_KEYS = frozenset({"microserviceID", "microservice_name", "microservice_namespace", "virtualization", "code",
                        "cmd", "environment", "memory", "vcpus", "vcpu", "vgpus", "storage", "port", "one_shot",
                        "privileged", "constraints", "health", "update", "secrets", "registry_secret",
                        "disconnect"})
SECRET_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
SECRET_KEYS = ("name", "env", "file")
VOLUME_KEYS = ("name", "path", "size_mb")
MAX_VOLUME_MB = 1 << 20  # a VM volume's disk: at most 1 TB (it is sparse: only what is written takes room)
HEALTH_TYPES = ("exec", "tcp", "http")
HEALTH_KEYS = ("type", "cmd", "port", "path", "interval", "timeout", "failures", "start_period")
UPDATE_KEYS = ("max_parallel", "min_healthy_time", "healthy_deadline", "auto_revert", "canary")
DISCONNECT_KEYS = ("lost_after", "replace", "stop_after", "reconcile")
KEEP_REPLACEMENT, KEEP_ORIGINAL, BEST_SCORE = "keep_replacement", "keep_original", "best_score"
RECONCILE_CHOICES = (KEEP_REPLACEMENT, KEEP_ORIGINAL, BEST_SCORE)
MAX_DISCONNECT_WAIT = 7 * 86400.0  # a week: longer waits are a typo more often than a plan


class SlaError(ValueError):
    """An SLA is invalid; ``field`` is the JSON path of the culprit, ``message`` says what is wrong."""

    field: str
    message: str

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class HealthCheck:
    """The SLA's ``health``: how the worker tells whether an instance works (Docker's and Nomad's fields).

    ``exec`` runs ``cmd`` inside the instance (healthy when it exits 0); ``tcp`` connects to ``port``;
    ``http`` asks ``GET path`` on ``port`` (healthy on a 2xx or 3xx answer). Every ``interval`` seconds,
    each try given ``timeout`` seconds; ``failures`` failed tries in a row make the instance unhealthy,
    except during the first ``start_period`` seconds, while it may still be starting.
    """

    type: str
    cmd: tuple[str, ...] = ()
    port: int = 0
    path: str = "/"
    interval: float = 5.0
    timeout: float = 2.0
    failures: int = 3
    start_period: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the SLA's own)."""
        return {"type": self.type, "cmd": list(self.cmd), "port": self.port, "path": self.path,
                "interval": self.interval, "timeout": self.timeout, "failures": self.failures,
                "start_period": self.start_period}


@dataclass(frozen=True)
class SecretRef:
    """One of the SLA's ``secrets``: the user's secret *name*, given to the instance as the environment
    variable *env* or as the read-only file *file* (exactly one of them)."""

    name: str
    env: str = ""
    file: str = ""

    def to_dict(self) -> dict[str, str]:
        """JSON form (the SLA's own)."""
        return {"name": self.name, "env": self.env} if self.env else {"name": self.name, "file": self.file}


@dataclass(frozen=True)
class VolumeRef:
    """One of the SLA's ``volumes`` (Oakling's form): the service's named volume *name*, mounted at *path*;
    for a VM, a disk of *size_mb* (0: the vm runtime's default)."""

    name: str
    path: str
    size_mb: int = 0

    def to_dict(self) -> dict[str, str | int]:
        """JSON form (the SLA's own)."""
        return {"name": self.name, "path": self.path, **({"size_mb": self.size_mb} if self.size_mb else {})}


@dataclass(frozen=True)
class UpdatePolicy:
    """The SLA's ``update``: how a new revision replaces the running one (Nomad's ``update`` block).

    At most ``max_parallel`` instances are replaced at a time, so never fewer than ``replicas -
    max_parallel`` are healthy (or RUNNING, without a health check); a new instance counts once it has
    been so for ``min_healthy_time`` seconds; one that is not within ``healthy_deadline`` seconds stops
    the rollout, which goes back to the previous revision when ``auto_revert``. With ``canary`` N, N new
    instances start beside the old ones and wait for a promote (or a rollback).
    """

    max_parallel: int = 1
    min_healthy_time: float = 10.0
    healthy_deadline: float = 300.0
    auto_revert: bool = True
    canary: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the SLA's own)."""
        return {"max_parallel": self.max_parallel, "min_healthy_time": self.min_healthy_time,
                "healthy_deadline": self.healthy_deadline, "auto_revert": self.auto_revert, "canary": self.canary}


@dataclass(frozen=True)
class DisconnectPolicy:
    """The SLA's ``disconnect``: what becomes of an instance whose worker (or whose cluster) has gone
    silent, Nomad's ``disconnect`` block. docs/partitions.md gives the defaults' reasons.

    The instance counts as lost ``lost_after`` seconds after its worker was found gone (its connection
    closed, or its reports stopped); then it is started elsewhere when ``replace``, or waits for its
    worker when not (a singleton that keeps its identity and volume). ``stop_after`` makes a worker cut
    off from its cluster (a cluster cut off from the root) stop the instance by itself so many seconds
    after it finds itself cut off (on the same clock as ``lost_after``): with ``stop_after < lost_after``
    a replacement never runs beside the original. When the
    original comes back beside its replacement, ``reconcile`` says which one stays.
    """

    lost_after: float = 0.0
    replace: bool = True
    stop_after: float | None = None
    reconcile: str = KEEP_REPLACEMENT

    def replace_at(self, gone_at: float) -> float | None:
        """When an instance on a child gone at *gone_at* is to be replaced (None: never, it waits)."""
        return gone_at + self.lost_after if self.replace else None

    @property
    def holds_original(self) -> bool:
        """Whether an original that comes back beside its replacement may be the one kept: then its parent
        keeps it in its desired map while it is away, so it is not stopped the moment it reconnects."""
        return self.reconcile != KEEP_REPLACEMENT

    def keeps_original(self, original_scores_higher: bool) -> bool:
        """Which copy stays once the original is back and running beside its replacement."""
        return self.reconcile == KEEP_ORIGINAL or (self.reconcile == BEST_SCORE and original_scores_higher)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the SLA's own)."""
        return {"lost_after": self.lost_after, "replace": self.replace, "stop_after": self.stop_after,
                "reconcile": self.reconcile}


DEFAULT_DISCONNECT = DisconnectPolicy()


@dataclass(frozen=True)
class ServiceSpec:
    """One validated microservice of an application."""

    app_name: str
    app_namespace: str
    name: str
    namespace: str
    virtualization: str
    code: str
    cmd: tuple[str, ...] = ()
    environment: tuple[str, ...] = ()
    memory: int = 0
    vcpus: float = 0
    vgpus: int = 0
    storage: int = 0
    port: str = ""
    one_shot: bool = False
    privileged: bool = False
    rr_ip: str = ""
    clusters: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()
    constraints: tuple[dict[str, Any], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    health: HealthCheck | None = None
    update: UpdatePolicy | None = None
    secrets: tuple[SecretRef, ...] = ()
    registry_secret: str = ""  # the secret holding ``user:password`` for pulling ``code`` from its registry
    volumes: tuple[VolumeRef, ...] = ()
    disconnect: DisconnectPolicy | None = None

    @property
    def on_disconnect(self) -> DisconnectPolicy:
        """What happens to this service's instances on a silent worker: the SLA's ``disconnect``, or the defaults."""
        return self.disconnect or DEFAULT_DISCONNECT

    @functools.cached_property
    def secret_names(self) -> tuple[str, ...]:
        """Every secret the service needs (its ``secrets`` and its ``registry_secret``)."""
        return tuple(dict.fromkeys([*(s.name for s in self.secrets), *([self.registry_secret] if
                                                                        self.registry_secret else [])]))

    @property
    def update_policy(self) -> UpdatePolicy:
        """How updates of this service roll: the SLA's ``update``, or the defaults."""
        return self.update or UpdatePolicy()

    @functools.cached_property
    def needs(self) -> tuple[str, ...]:
        """Labels the service needs, from its ``addons`` constraints."""
        return tuple(dict.fromkeys(n for c in self.constraints if c.get("type") == "addons" for n in c["needs"]))

    @functools.cached_property
    def near(self) -> tuple[tuple[float, float, float], ...]:
        """(latitude, longitude, max km) of each ``geo`` constraint."""
        out = []
        for c in self.constraints:
            if c.get("type") == "geo":
                lat, lon = (float(x) for x in str(c["location"]).split(",")[:2])
                out.append((lat, lon, float(c["threshold"])))
        return tuple(out)

    @functools.cached_property
    def latency(self) -> tuple[tuple[str, float], ...]:
        """(target worker, max ms) of each ``latency`` constraint."""
        return tuple((str(c["target"]), float(c["threshold"])) for c in self.constraints if c.get("type") == "latency")

    @property
    def job_name(self) -> str:
        """Oakestra's job name ``app.appns.svc.svcns``."""
        return f"{self.app_name}.{self.app_namespace}.{self.name}.{self.namespace}"

    @functools.cached_property
    def doc(self) -> dict[str, Any]:
        """:meth:`to_dict`, made once (what desired maps carry; never changed, like the spec itself)."""
        return self.to_dict()

    def to_dict(self) -> dict[str, Any]:
        """JSON form; :meth:`from_dict` reads it back exactly (also after a trip through JSON)."""
        return {
            "app_name": self.app_name, "app_namespace": self.app_namespace, "name": self.name,
            "namespace": self.namespace, "virtualization": self.virtualization, "code": self.code,
            "cmd": list(self.cmd), "environment": list(self.environment), "memory": self.memory,
            "vcpus": self.vcpus, "vgpus": self.vgpus, "storage": self.storage, "port": self.port,
            "one_shot": self.one_shot, "privileged": self.privileged, "rr_ip": self.rr_ip,
            "clusters": list(self.clusters), "nodes": list(self.nodes),
            "constraints": copy.deepcopy(list(self.constraints)), "extra": copy.deepcopy(self.extra),
            "health": self.health.to_dict() if self.health else None,
            "update": self.update.to_dict() if self.update else None,
            "secrets": [ref.to_dict() for ref in self.secrets], "registry_secret": self.registry_secret,
            "volumes": [ref.to_dict() for ref in self.volumes],
            "disconnect": self.disconnect.to_dict() if self.disconnect else None,
        }

    def to_sla(self) -> dict[str, Any]:
        """The SLA microservice this spec was read from (its ``extra`` keys included): what an update
        changes some fields of."""
        micro = {
            **copy.deepcopy(self.extra), "microservice_name": self.name, "microservice_namespace": self.namespace,
            "virtualization": self.virtualization, "code": self.code, "cmd": list(self.cmd),
            "environment": list(self.environment), "memory": self.memory, "vcpus": self.vcpus, "vgpus": self.vgpus,
            "storage": self.storage, "port": self.port, "one_shot": self.one_shot, "privileged": self.privileged,
            "constraints": copy.deepcopy(list(self.constraints)),
        }
        if self.rr_ip:
            micro["addresses"] = {**micro.get("addresses", {}), "rr_ip": self.rr_ip}
        if self.health:
            micro["health"] = self.health.to_dict()
        if self.update:
            micro["update"] = self.update.to_dict()
        if self.secrets:
            micro["secrets"] = [ref.to_dict() for ref in self.secrets]
        if self.registry_secret:
            micro["registry_secret"] = self.registry_secret
        if self.volumes:
            micro["volumes"] = [ref.to_dict() for ref in self.volumes]
        if self.disconnect:
            micro["disconnect"] = self.disconnect.to_dict()
        return micro

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServiceSpec:
        """Inverse of :meth:`to_dict`, every field checked (ValueError naming the one that is wrong)."""
        return wire.load(cls, data)


@dataclass(frozen=True)
class AppSpec:
    """One validated application with its services."""

    name: str
    namespace: str
    desc: str
    services: tuple[ServiceSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON form; :meth:`from_dict` reads it back exactly."""
        return {"name": self.name, "namespace": self.namespace, "desc": self.desc,
                "services": [s.to_dict() for s in self.services]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AppSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(data["name"], data["namespace"], data["desc"],
                   tuple(ServiceSpec.from_dict(s) for s in data["services"]))


# ---- field checks ---------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _obj(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SlaError(path, f"expected an object, got {_kind(value)}")
    return value


def _str(obj: dict[str, Any], key: str, path: str, required: bool = False, default: str = "") -> str:
    if key not in obj:
        if required:
            raise SlaError(f"{path}.{key}", "is required")
        return default
    value = obj[key]
    if not isinstance(value, str):
        raise SlaError(f"{path}.{key}", f"expected a string, got {_kind(value)}")
    return value


def _name(obj: dict[str, Any], key: str, path: str) -> str:
    value = _str(obj, key, path, required=True)
    if not NAME_RE.fullmatch(value):
        raise SlaError(f"{path}.{key}", f"{value!r} must be 1-30 letters or digits")
    return value


def _empty_id(obj: dict[str, Any], key: str, path: str) -> None:
    if _str(obj, key, path):
        raise SlaError(f"{path}.{key}", "must be empty when creating")


def _is_number(value: Any) -> TypeGuard[int | float]:
    """A JSON number: not a bool, and finite (``NaN``/``Infinity`` are not JSON)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return not isinstance(value, float) or math.isfinite(value)


def _number(obj: dict[str, Any], key: str, path: str, integer: bool, default: float = 0) -> float:
    value = obj.get(key, default)
    if not _is_number(value):
        raise SlaError(f"{path}.{key}", f"expected a number, got {_kind(value)} {value!r}")
    if value < 0:
        raise SlaError(f"{path}.{key}", f"must not be negative (got {value})")
    if integer and value != int(value):
        raise SlaError(f"{path}.{key}", f"expected a whole number, got {value}")
    return int(value) if integer else value


def _bool(obj: dict[str, Any], key: str, path: str, default: bool = False) -> bool:
    value = obj.get(key, default)
    if not isinstance(value, bool):
        raise SlaError(f"{path}.{key}", f"expected true or false, got {_kind(value)}")
    return value


def _strings(obj: dict[str, Any], key: str, path: str) -> tuple[str, ...]:
    value = obj.get(key, [])
    if not isinstance(value, list):
        raise SlaError(f"{path}.{key}", f"expected a list of strings, got {_kind(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise SlaError(f"{path}.{key}[{i}]", f"expected a string, got {_kind(item)}")
        if "\0" in item:
            raise SlaError(f"{path}.{key}[{i}]", "must not contain a NUL character")
    return tuple(value)


def _port(value: str, path: str) -> str:
    if not value:
        return value
    for item in value.split(";"):
        match = PORT_RE.fullmatch(item)
        if not match or not all(1 <= int(p) <= 65535 for p in match.groups()[:2] if p):
            raise SlaError(path, f"{item!r} is not 'port', 'host:container' or 'host:container/tcp|udp' "
                                 "(ports 1-65535, several separated by ';')")
    return value


def _rr_ip(micro: dict[str, Any], path: str) -> tuple[str, dict[str, Any]]:
    """``addresses.rr_ip`` (checked) and whatever else ``addresses`` holds (kept for ``extra``)."""
    if "addresses" not in micro:
        return "", {}
    addresses = _obj(micro["addresses"], f"{path}.addresses")
    rr_ip = _str(addresses, "rr_ip", f"{path}.addresses")
    if rr_ip:
        try:
            inside = ipaddress.ip_address(rr_ip) in RR_NET
        except ValueError:
            inside = False
        if not inside:
            raise SlaError(f"{path}.addresses.rr_ip", f"{rr_ip!r} is not an IPv4 address in {RR_NET}")
    return rr_ip, {k: copy.deepcopy(v) for k, v in addresses.items() if k != "rr_ip"}


def _arch(micro: dict[str, Any], path: str, virtualization: str, code: str) -> None:
    """Oakestra's ``arch`` (kept in ``extra``): architecture names; a VM's are paired with ``code``'s entries."""
    arch = _strings(micro, "arch", path)
    for i, name in enumerate(arch):
        if not VIRT_RE.fullmatch(name):
            raise SlaError(f"{path}.arch[{i}]", f"{name!r} is not an architecture name such as amd64 or arm64")
    if virtualization not in VM_VIRTUALIZATIONS:
        return
    entries = [entry.strip() for entry in code.split(",")]
    if not all(entries):
        raise SlaError(f"{path}.code", "an entry of the comma-separated list of kernels is empty")
    if (arch or len(entries) > 1) and len(entries) != len(arch):
        raise SlaError(f"{path}.arch", f"expected one architecture per entry of code ({len(entries)}), got {len(arch)}")


def _names(value: Any, path: str) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(n.strip() for n in re.split(r"[;,]", value) if n.strip())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(v.strip() for v in value if v.strip())
    raise SlaError(path, "expected a name, a ';'- or ','-separated list of names, or a list of strings")


def _positive(constraint: dict[str, Any], key: str, where: str, what: str) -> None:
    value = constraint.get(key)
    if not _is_number(value) or value <= 0:
        raise SlaError(f"{where}.{key}", f"expected {what}, a positive number")


Constraints = tuple[tuple[dict[str, Any], ...], tuple[str, ...], tuple[str, ...]]


def _constraints(micro: dict[str, Any], path: str) -> Constraints:
    raw = micro.get("constraints", [])
    if not isinstance(raw, list):
        raise SlaError(f"{path}.constraints", f"expected a list, got {_kind(raw)}")
    clusters: list[str] = []
    nodes: list[str] = []
    for i, item in enumerate(raw):
        where = f"{path}.constraints[{i}]"
        constraint = _obj(item, where)
        kind = _str(constraint, "type", where, required=True)
        if kind not in CONSTRAINT_TYPES:
            raise SlaError(f"{where}.type", f"{kind!r} is not one of {', '.join(CONSTRAINT_TYPES)}")
        if kind == "geo":
            _geo(constraint, where)
        elif kind == "latency":
            target = constraint.get("target")
            if not isinstance(target, str) or not target:
                raise SlaError(f"{where}.target", "expected the name of the worker to be close to")
            _positive(constraint, "threshold", where, "the round-trip time in ms")
        elif kind == "addons":
            needs = constraint.get("needs")
            if not isinstance(needs, list) or not needs or not all(isinstance(n, str) and n for n in needs):
                raise SlaError(f"{where}.needs", "expected a non-empty list of labels")
        elif kind == "direct":
            c = _names(constraint.get("cluster"), f"{where}.cluster")
            n = _names(constraint.get("node"), f"{where}.node")
            if not c and not n:
                raise SlaError(where, "a direct constraint needs a 'cluster' or a 'node'")
            clusters += c
            nodes += n
    return tuple(copy.deepcopy(raw)), tuple(dict.fromkeys(clusters)), tuple(dict.fromkeys(nodes))


def _geo(constraint: dict[str, Any], where: str) -> None:
    location = constraint.get("location")
    parts = location.split(",") if isinstance(location, str) else []
    try:
        lat, lon = float(parts[0]), float(parts[1])
        ok = -90 <= lat <= 90 and -180 <= lon <= 180
    except (ValueError, IndexError):
        ok = False
    if not ok:
        raise SlaError(f"{where}.location", f"{location!r} is not 'latitude,longitude'")
    _positive(constraint, "threshold", where, "the distance in km")


def _fields_of(value: Any, path: str, known: tuple[str, ...]) -> dict[str, Any]:
    """An object of Oakling's own (not Oakestra's) whose every key must be *known*: a misspelt field would
    otherwise silently keep its default."""
    raw = _obj(value, path)
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise SlaError(f"{path}.{unknown[0]}", f"unknown field (expected {', '.join(known)})")
    return raw


def _health(micro: dict[str, Any], path: str, virtualization: str) -> HealthCheck | None:
    """The ``health`` object, every field checked."""
    if micro.get("health") is None:
        return None
    where = f"{path}.health"
    raw = _fields_of(micro["health"], where, HEALTH_KEYS)
    kind = _str(raw, "type", where, required=True)
    if kind not in HEALTH_TYPES:
        raise SlaError(f"{where}.type", f"{kind!r} is not one of {', '.join(HEALTH_TYPES)}")
    cmd = _strings(raw, "cmd", where)
    if kind == "exec" and not (cmd and cmd[0]):
        raise SlaError(f"{where}.cmd", "an exec check needs the command to run, e.g. [\"cat\", \"/tmp/ready\"]")
    if kind == "exec" and virtualization in (*VM_VIRTUALIZATIONS, "wasm"):
        raise SlaError(f"{where}.type", f"a {virtualization} cannot run a command for a check; use tcp or http")
    port = int(_number(raw, "port", where, integer=True))
    if kind != "exec" and not 1 <= port <= 65535:
        raise SlaError(f"{where}.port", f"a {kind} check needs the port to try, 1-65535 (got {port})")
    check_path = _str(raw, "path", where, default="/")
    if not check_path.startswith("/") or any(c.isspace() or not c.isprintable() for c in check_path):
        raise SlaError(f"{where}.path", f"{check_path!r} is not a URL path such as /healthz")
    times = {key: float(_number(raw, key, where, integer=False, default=default))
             for key, default in (("interval", 5.0), ("timeout", 2.0), ("start_period", 0.0))}
    for key in ("interval", "timeout"):
        if times[key] <= 0:
            raise SlaError(f"{where}.{key}", "must be more than 0 seconds")
    failures = int(_number(raw, "failures", where, integer=True, default=3))
    if failures < 1:
        raise SlaError(f"{where}.failures", "must be at least 1")
    return HealthCheck(kind, cmd, port, check_path, times["interval"], times["timeout"], failures,
                       times["start_period"])


def _ref_name(value: Any, path: str, what: str = "secret") -> str:
    """The name of a secret or volume: 1-63 of a-z, 0-9, '.', '_', '-'."""
    if not isinstance(value, str) or not SECRET_NAME_RE.fullmatch(value):
        raise SlaError(path, f"{value!r:.40} is not a {what} name (1-63 of a-z, 0-9, '.', '_', '-')")
    return value


def _listed(micro: dict[str, Any], key: str, path: str, known: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    """Each object of the list *key* (its path and its fields, every one *known*)."""
    raw = micro.get(key) or []
    if not isinstance(raw, list):
        raise SlaError(f"{path}.{key}", f"expected a list, got {_kind(raw)}")
    return [(f"{path}.{key}[{i}]", _fields_of(item, f"{path}.{key}[{i}]", known)) for i, item in enumerate(raw)]


def _secrets(micro: dict[str, Any], path: str, virtualization: str) -> tuple[tuple[SecretRef, ...], str]:
    """The ``secrets`` list and the ``registry_secret``, every field checked."""
    refs: list[SecretRef] = []
    for where, ref in _listed(micro, "secrets", path, SECRET_KEYS):
        name = _ref_name(ref.get("name"), f"{where}.name")
        env, file = _str(ref, "env", where), _str(ref, "file", where)
        if bool(env) == bool(file):
            raise SlaError(where, "give the secret as 'env' (a variable name) or as 'file' (a path), one of them")
        if env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env):
            raise SlaError(f"{where}.env", f"{env!r} is not an environment variable name")
        if file and (not file.startswith("/") or ".." in file.split("/") or file.endswith("/") or "\0" in file):
            raise SlaError(f"{where}.file", f"{file!r} is not an absolute path to a file")
        if file and virtualization == "wasm":
            raise SlaError(f"{where}.file", "a wasm module opens directories, not single files: give it as 'env'")
        if env and virtualization in VM_VIRTUALIZATIONS:
            raise SlaError(f"{where}.env", f"a {virtualization} has no environment the worker could set: give the "
                                           "secret as 'file' (it reaches the guest in its initramfs)")
        refs.append(SecretRef(name, env, file))
    registry = micro.get("registry_secret") or ""
    if registry:
        registry = _ref_name(registry, f"{path}.registry_secret")
        if virtualization in (*VM_VIRTUALIZATIONS, "process", "wasm"):
            raise SlaError(f"{path}.registry_secret", "a registry_secret logs in to pull a container's image; a "
                                                      f"{virtualization} pulls none")
    return tuple(refs), registry


def _is_oakestra_volumes(raw: Any) -> bool:
    """Oakestra's CSI form of ``volumes`` (``volume_id``, ``csi_driver``): kept in ``extra`` as it is."""
    return isinstance(raw, list) and any(isinstance(v, dict) and ("volume_id" in v or "csi_driver" in v)
                                         for v in raw)


def _volumes(micro: dict[str, Any], path: str, virtualization: str) -> tuple[VolumeRef, ...]:
    """Oakling's ``volumes`` (``[{"name", "path"}]``), every field checked."""
    if _is_oakestra_volumes(micro.get("volumes")):
        return ()
    refs: list[VolumeRef] = []
    vm = virtualization in VM_VIRTUALIZATIONS
    for where, ref in _listed(micro, "volumes", path, VOLUME_KEYS):
        name = _ref_name(ref.get("name"), f"{where}.name", "volume")
        target = _str(ref, "path", where, required=True)
        if not target.startswith("/") or ".." in target.split("/") or target == "/" or "\0" in target:
            raise SlaError(f"{where}.path", f"{target!r} is not an absolute path to a directory")
        if vm and re.search(r"[\s,:]", target):  # it goes on the kernel command line as name:path,...
            raise SlaError(f"{where}.path", f"{target!r}: a VM's volume path has no spaces, ',' or ':'")
        if any(r.name == name for r in refs):
            raise SlaError(f"{where}.name", f"volume {name!r} appears twice")
        size = int(_number(ref, "size_mb", where, integer=True, default=0))
        if size and not vm:
            raise SlaError(f"{where}.size_mb", "a directory volume grows as it is written; size_mb sizes a VM's disk")
        if size > MAX_VOLUME_MB:
            raise SlaError(f"{where}.size_mb", f"at most {MAX_VOLUME_MB} (MB)")
        refs.append(VolumeRef(name, target.rstrip("/"), size))
    return tuple(refs)


def _update(micro: dict[str, Any], path: str) -> UpdatePolicy | None:
    """The ``update`` object, every field checked."""
    if micro.get("update") is None:
        return None
    where = f"{path}.update"
    raw = _fields_of(micro["update"], where, UPDATE_KEYS)
    defaults = UpdatePolicy()
    max_parallel = int(_number(raw, "max_parallel", where, integer=True, default=defaults.max_parallel))
    if max_parallel < 1:
        raise SlaError(f"{where}.max_parallel", "must be at least 1")
    min_healthy = float(_number(raw, "min_healthy_time", where, integer=False, default=defaults.min_healthy_time))
    deadline = float(_number(raw, "healthy_deadline", where, integer=False, default=defaults.healthy_deadline))
    if deadline <= min_healthy:
        raise SlaError(f"{where}.healthy_deadline", f"must be longer than min_healthy_time ({min_healthy:g} s)")
    auto_revert = _bool(raw, "auto_revert", where, default=True)
    canary = int(_number(raw, "canary", where, integer=True, default=0))
    return UpdatePolicy(max_parallel, min_healthy, deadline, auto_revert, canary)


def _disconnect(micro: dict[str, Any], path: str) -> DisconnectPolicy | None:
    """The ``disconnect`` object, every field checked."""
    if micro.get("disconnect") is None:
        return None
    where = f"{path}.disconnect"
    raw = _fields_of(micro["disconnect"], where, DISCONNECT_KEYS)
    lost_after = float(_number(raw, "lost_after", where, integer=False))
    stop_after = None if raw.get("stop_after") is None else float(_number(raw, "stop_after", where, integer=False))
    for key, value in (("lost_after", lost_after), ("stop_after", stop_after)):
        if value is not None and value > MAX_DISCONNECT_WAIT:
            raise SlaError(f"{where}.{key}", f"at most {MAX_DISCONNECT_WAIT:.0f} seconds (a week)")
    reconcile = _str(raw, "reconcile", where, default=KEEP_REPLACEMENT)
    if reconcile not in RECONCILE_CHOICES:
        raise SlaError(f"{where}.reconcile", f"{reconcile!r} is not one of {', '.join(RECONCILE_CHOICES)}")
    return DisconnectPolicy(lost_after, _bool(raw, "replace", where, default=True), stop_after, reconcile)


def updated(current: ServiceSpec, changes: Any, path: str = "microservice") -> tuple[ServiceSpec, list[str]]:
    """*current* with the SLA microservice fields in *changes* (a whole microservice, or some of its
    fields) put over it, validated as a new one is; and the fields that differ. The service keeps its
    name and its service IP (SlaError otherwise, naming the field)."""
    given = {k: v for k, v in _obj(changes, path).items() if k != "microserviceID"}
    before = current.to_sla()
    for key in ("microservice_name", "microservice_namespace"):
        if key in given and given[key] != before[key]:
            raise SlaError(f"{path}.{key}", f"an update cannot rename the service (it is {before[key]!r})")
    spec = _service({**before, **given}, path, current.app_name, current.app_namespace)
    if spec.rr_ip != current.rr_ip:
        raise SlaError(f"{path}.addresses.rr_ip", f"a service keeps its round-robin IP ({current.rr_ip or 'none'})")
    old, new = current.to_dict(), spec.to_dict()
    return spec, [key for key in new if new[key] != old.get(key)]


def _service(micro: Any, path: str, app: str, app_ns: str) -> ServiceSpec:
    micro = _obj(micro, path)
    _empty_id(micro, "microserviceID", path)
    name, namespace = _name(micro, "microservice_name", path), _name(micro, "microservice_namespace", path)
    virtualization = _str(micro, "virtualization", path, required=True)
    virtualization = "container" if virtualization == "docker" else virtualization
    if not VIRT_RE.fullmatch(virtualization):
        raise SlaError(f"{path}.virtualization", f"{virtualization!r} is not a runtime name ([a-z0-9_-]{{1,30}})")
    code = _str(micro, "code", path, required=True)
    if not code and virtualization != "process":
        raise SlaError(f"{path}.code", f"a {virtualization} service needs its image or kernel in 'code'")
    _arch(micro, path, virtualization, code)
    cmd = _strings(micro, "cmd", path)
    if virtualization == "process" and not cmd:
        raise SlaError(f"{path}.cmd", "a process service needs the command to run, e.g. [\"sleep\", \"60\"]")
    if virtualization == "process" and not cmd[0]:
        raise SlaError(f"{path}.cmd[0]", "the program to run must not be empty")
    environment = _strings(micro, "environment", path)
    for i, entry in enumerate(environment):
        if not ENV_RE.fullmatch(entry):
            raise SlaError(f"{path}.environment[{i}]", f"{entry!r} is not KEY=VALUE")
    memory = int(_number(micro, "memory", path, integer=True))
    vcpu = _number(micro, "vcpu", path, integer=False)  # Oakestra's docs spell it so; 'vcpus' wins if both
    vcpus = _number(micro, "vcpus", path, integer=False) if "vcpus" in micro else vcpu
    vgpus = int(_number(micro, "vgpus", path, integer=True))
    if vgpus and virtualization in (*VM_VIRTUALIZATIONS, "wasm"):
        raise SlaError(f"{path}.vgpus", f"a {virtualization} cannot be given GPUs; run it as a container or process")
    storage = int(_number(micro, "storage", path, integer=True))
    port = _port(_str(micro, "port", path), f"{path}.port")
    one_shot, privileged = _bool(micro, "one_shot", path), _bool(micro, "privileged", path)
    rr_ip, other_addresses = _rr_ip(micro, path)
    constraints, clusters, nodes = _constraints(micro, path)
    health, update = _health(micro, path, virtualization), _update(micro, path)
    secrets, registry_secret = _secrets(micro, path, virtualization)
    volumes = _volumes(micro, path, virtualization)
    disconnect = _disconnect(micro, path)
    extra = {k: copy.deepcopy(v) for k, v in micro.items() if k not in MICRO_KEYS and k != "addresses"
             and not (k == "volumes" and not _is_oakestra_volumes(v))}
    if other_addresses:
        extra["addresses"] = other_addresses
    return ServiceSpec(
        app_name=app, app_namespace=app_ns, name=name, namespace=namespace, virtualization=virtualization,
        code=code, cmd=cmd, environment=environment, memory=memory, vcpus=vcpus, vgpus=vgpus, storage=storage,
        port=port, one_shot=one_shot, privileged=privileged, rr_ip=rr_ip, clusters=clusters, nodes=nodes,
        constraints=constraints, extra=extra, health=health, update=update, secrets=secrets,
        registry_secret=registry_secret, volumes=volumes, disconnect=disconnect,
    )


def _application(raw: Any, path: str) -> AppSpec:
    app = _obj(raw, path)
    name, namespace = _name(app, "application_name", path), _name(app, "application_namespace", path)
    _empty_id(app, "applicationID", path)
    desc = _str(app, "application_desc", path)
    if "microservices" not in app:
        raise SlaError(f"{path}.microservices", "is required")
    micros = app["microservices"]
    if not isinstance(micros, list):
        raise SlaError(f"{path}.microservices", f"expected a list, got {_kind(micros)}")
    services: list[ServiceSpec] = []
    for i, micro in enumerate(micros):
        service = _service(micro, f"{path}.microservices[{i}]", name, namespace)
        if any(s.name == service.name and s.namespace == service.namespace for s in services):
            raise SlaError(f"{path}.microservices[{i}]", f"service {service.name}.{service.namespace} appears twice")
        services.append(service)
    return AppSpec(name, namespace, desc, tuple(services))


def registry_of(reference: str) -> str:
    """The registry an image reference (a container's ``code``) is pulled from: ``docker.io`` when its first
    part names none."""
    first, _, rest = reference.partition("/")
    return first if rest and ("." in first or ":" in first or first == "localhost") else "docker.io"


def parse_sla(payload: bytes | str | dict[str, Any]) -> tuple[AppSpec, ...]:
    """Validate an SLA v2.0 document (bytes/str JSON or an already decoded dict) and return its applications."""
    if isinstance(payload, bytes | bytearray | memoryview | str):
        try:
            payload = json.loads(bytes(payload) if isinstance(payload, memoryview) else payload)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise SlaError("$", f"not valid JSON: {exc}") from None
    doc = _obj(payload, "$")
    version = _str(doc, "sla_version", "$", required=True)
    if version != "v2.0":
        raise SlaError("sla_version", f"{version!r} is not supported (use \"v2.0\")")
    _str(doc, "customerID", "$", required=True)
    apps = doc.get("applications")
    if not isinstance(apps, list) or not apps:
        raise SlaError("applications", "expected a non-empty list of applications")
    out: list[AppSpec] = []
    for i, raw in enumerate(apps):
        app = _application(raw, f"applications[{i}]")
        if any(a.name == app.name and a.namespace == app.namespace for a in out):
            raise SlaError(f"applications[{i}]", f"application {app.name}.{app.namespace} appears twice")
        out.append(app)
    return tuple(out)
