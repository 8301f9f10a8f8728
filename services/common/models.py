"""The messages tiers exchange, as frozen dataclasses with a JSON form.

Readers build them with :func:`load`, which ignores unknown keys (newer senders may add optional
ones) and raises :class:`ValueError` on a malformed body.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from services.common.hookspecs import Candidate, Demand
from services.common.sla import ServiceSpec

T = TypeVar("T")

# Instance statuses, as Oakestra names them on the wire.
REQUESTED = "REQUESTED"
CLUSTER_SCHEDULED = "CLUSTER_SCHEDULED"
NODE_SCHEDULED = "NODE_SCHEDULED"
CREATING = "CREATING"
RUNNING = "RUNNING"
FAILED = "FAILED"
DEAD = "DEAD"
COMPLETED = "COMPLETED"
NO_CLUSTER_CAPACITY = "NoActiveClusterWithCapacity"
NO_WORKER_CAPACITY = "NO_WORKER_CAPACITY"
UNSCHEDULED = (REQUESTED, NO_CLUSTER_CAPACITY)


_FIELDS: dict[type, tuple[str, ...]] = {}
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _fields(cls: type) -> tuple[str, ...]:
    """The field names of dataclass *cls* (looked up once per class)."""
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def load(cls: type[T], data: Any) -> T:
    """Build dataclass *cls* from a JSON object, ignoring unknown keys; every field must have its type
    (ValueError naming the field otherwise: ``NodeInfo.cpu_cores: expected a number, got 'x'``)."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    names = _fields(cls)
    hints = _hints(cls)
    kept = {k: v for k, v in data.items() if k in names}
    for name, value in kept.items():
        why = _mismatch(value, hints.get(name, Any))
        if why:
            raise ValueError(f"{cls.__name__}.{name}: {why}")
    try:
        return cls(**kept)
    except TypeError as exc:
        raise ValueError(f"{cls.__name__}: {exc}") from None


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _mismatch(value: Any, hint: Any) -> str:
    """Why *value* (decoded JSON) is not of type *hint* ("" when it is)."""
    if hint is Any:
        return ""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        whys = [_mismatch(value, arg) for arg in args]
        return "" if "" in whys else whys[0]
    if hint is type(None):
        return "" if value is None else f"expected null, got {value!r:.40}"
    if hint is bool:
        return "" if isinstance(value, bool) else f"expected true or false, got {value!r:.40}"
    if hint in (int, float):
        ok = isinstance(value, int if hint is int else int | float) and not isinstance(value, bool)
        return "" if ok else f"expected a number, got {value!r:.40}"
    if hint is str:
        return "" if isinstance(value, str) else f"expected a string, got {value!r:.40}"
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            return f"expected a list, got {value!r:.40}"
        inner = args[0] if args else Any
        return next((f"[{i}]: {why}" for i, item in enumerate(value) if (why := _mismatch(item, inner))), "")
    if origin is dict:
        if not isinstance(value, dict):
            return f"expected an object, got {value!r:.40}"
        inner = args[1] if len(args) == 2 else Any
        return next((f"[{k!r}]: {why}" for k, item in value.items() if (why := _mismatch(item, inner))), "")
    return ""


def dump(obj: Any) -> dict[str, Any]:
    """The JSON form of a dataclass. One whose fields all hold scalars (an instance's status, 10,000 of
    them at the root during a burst) is read field by field, without :func:`dataclasses.asdict`'s
    recursion and deep copies (the same result, a tenth of the time)."""
    out = {}
    for name in _fields(type(obj)):
        value = getattr(obj, name)
        if type(value) not in _SCALARS:
            return dataclasses.asdict(obj)
        out[name] = value
    return out


@dataclass(frozen=True)
class InstanceSpec:
    """One instance a parent wants running: the value type of every ``desired`` map."""

    iid: str
    owner: str
    job_name: str
    instance_number: int
    service: dict[str, Any]
    sid: str = ""
    rr_ip: str = ""
    closest_ip: str = ""

    @property
    def spec(self) -> ServiceSpec:
        """The service this is an instance of."""
        return ServiceSpec.from_dict(self.service)

    @property
    def service_key(self) -> str:
        """Identifies the service across users: ``owner/job_name``."""
        return f"{self.owner}/{self.job_name}"

    def demand(self) -> Demand:
        """What the instance asks of the place it runs on."""
        spec = self.spec
        arch = spec.extra.get("arch", ())
        return Demand(
            vcpus=float(spec.vcpus),
            memory_mb=int(spec.memory),
            virtualization=spec.virtualization,
            clusters=tuple(spec.clusters),
            nodes=tuple(spec.nodes),
            service=self.service_key,
            gpus=int(spec.vgpus),
            arch=tuple(a for a in arch if isinstance(a, str)) if isinstance(arch, list) else (),
            needs=tuple(spec.needs),
            near=tuple(spec.near),
            latency=tuple(spec.latency),
        )


def load_desired(data: Any) -> dict[str, InstanceSpec]:
    """Decode a ``desired`` map ``{"instances": {iid: spec}}``."""
    if not isinstance(data, dict) or not isinstance(data.get("instances"), dict):
        raise ValueError("desired: expected {'instances': {...}}")
    return {iid: load(InstanceSpec, spec) for iid, spec in data["instances"].items()}


@dataclass(frozen=True)
class InstanceStatus:
    """What is observed of one instance; travels up from worker to cluster to root."""

    status: str
    reason: str = ""
    node: str = ""
    cluster: str = ""
    cpu_percent: float = 0.0
    memory_mb: float = 0.0
    restarts: int = 0
    exit_code: int | None = None
    since: float = 0.0
    ip: str = ""
    io_mb: float = 0.0  # disk: MB read and written by the instance (its cgroup's block I/O)


def load_statuses(data: Any) -> dict[str, InstanceStatus]:
    """Decode an ``{iid: status}`` map."""
    if not isinstance(data, dict):
        raise ValueError("instances: expected an object")
    return {iid: load(InstanceStatus, status) for iid, status in data.items()}


@dataclass(frozen=True)
class NodeState:
    """A worker's live facts (retained ``state``): its instances' statuses, its load (every number it
    samples: ``cpu_percent``, ``memory_percent``...) and its latency coordinate."""

    instances: dict[str, InstanceStatus]
    metrics: dict[str, float]
    coord: list[float]

    @classmethod
    def load(cls, data: dict[str, Any]) -> NodeState:
        """Read the published form: ``{"instances": {...}, "coord": [...], <metric>: <number>...}``."""
        coord = data.get("coord", [])
        why = _mismatch(coord, list[float])
        if why:
            raise ValueError(f"NodeState.coord: {why}")
        metrics = {k: float(v) for k, v in data.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        return cls(load_statuses(data.get("instances", {})), metrics, [float(x) for x in coord])


@dataclass(frozen=True)
class NodeInfo:
    """A worker's static facts (retained ``info``)."""

    name: str
    cpu_cores: float
    memory_mb: float
    runtimes: list[str]
    arch: str = ""
    os: str = ""
    hostname: str = ""
    location: str = ""
    version: str = ""
    labels: list[str] = dataclasses.field(default_factory=list)
    gpus: int = 0
    probe: str = ""
    overlay: str = ""  # the VXLAN endpoint ``ip:port`` when the worker has the overlay network


@dataclass(frozen=True)
class NodeSummary:
    """A worker as its cluster reports it to the root: capacity, what is free, and its load."""

    name: str
    online: bool
    cpu_cores: float
    memory_mb: float
    cpu_free: float
    memory_free_mb: float
    cpu_percent: float
    runtimes: list[str]
    instances: int = 0
    arch: str = ""
    labels: list[str] = dataclasses.field(default_factory=list)
    location: str = ""
    gpus_free: float = 0.0
    services: dict[str, int] = dataclasses.field(default_factory=dict)
    coord: list[float] = dataclasses.field(default_factory=list)
    cert_expires: float = 0.0  # when the worker's certificate ends (epoch seconds; 0: it has none)

    def candidate(self) -> Candidate:
        """This worker as a scheduling candidate."""
        return Candidate(
            id=self.name, cpu_free=self.cpu_free, memory_free_mb=self.memory_free_mb, cpu_total=self.cpu_cores,
            memory_total_mb=self.memory_mb, virtualizations=tuple(self.runtimes), cpu_percent=self.cpu_percent,
            location=self.location, gpus_free=self.gpus_free, arch=self.arch, labels=tuple(self.labels),
            services=dict(self.services), coord=tuple(self.coord),
        )


@dataclass(frozen=True)
class ClusterInfo:
    """A cluster's static facts (retained ``info``)."""

    name: str
    location: str = ""
    version: str = ""
    scheduler: str = ""
