"""The messages tiers exchange, as frozen dataclasses with a JSON form.

Readers build them with :func:`load` (services/common/wire.py), which ignores unknown keys (newer
senders may add optional ones), raises :class:`ValueError` on a malformed body, and builds the nested
types (an instance's :class:`ServiceSpec`) once: nothing re-parses them afterwards.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import Any

from services.common.plugin_api import Candidate, Demand
from services.common.sla import ServiceSpec
from services.common.wire import check, dump, load

__all__ = ["dump", "load"]  # models.load / models.dump: what readers and writers of messages use

# Instance statuses, as Oakestra names them on the wire.
REQUESTED = "REQUESTED"
CLUSTER_SCHEDULED = "CLUSTER_SCHEDULED"
NODE_SCHEDULED = "NODE_SCHEDULED"
CREATING = "CREATING"
RUNNING = "RUNNING"
FAILED = "FAILED"
DEAD = "DEAD"
COMPLETED = "COMPLETED"
LOST = "LOST"  # its worker (or cluster) has gone silent: it may still run there, nobody can tell
NO_CLUSTER_CAPACITY = "NoActiveClusterWithCapacity"
NO_WORKER_CAPACITY = "NO_WORKER_CAPACITY"
UNSCHEDULED = (REQUESTED, NO_CLUSTER_CAPACITY)
# An instance's health, when its service has a health check ("" when it has none).
STARTING, HEALTHY, UNHEALTHY = "starting", "healthy", "unhealthy"


def demand_of(service: ServiceSpec, key: str) -> Demand:
    """What an instance of *service* (``owner/job_name`` *key*) asks of the place it runs on."""
    arch = service.extra.get("arch", ())
    return Demand(
        vcpus=float(service.vcpus),
        memory_mb=int(service.memory),
        virtualization=service.virtualization,
        clusters=service.clusters,
        nodes=service.nodes,
        service=key,
        gpus=int(service.vgpus),
        arch=tuple(a for a in arch if isinstance(a, str)) if isinstance(arch, list) else (),
        needs=service.needs,
        near=service.near,
        latency=service.latency,
    )


@dataclass(frozen=True)
class InstanceSpec:
    """One instance a parent wants running: the value type of every ``desired`` map."""

    iid: str
    owner: str
    job_name: str
    instance_number: int
    service: ServiceSpec
    sid: str = ""
    rr_ip: str = ""
    closest_ip: str = ""
    prefer: str = ""  # the worker to place it on when it fits there (where the instance it replaces ran)

    @property
    def service_key(self) -> str:
        """Identifies the service across users: ``owner/job_name``."""
        return f"{self.owner}/{self.job_name}"

    @functools.cached_property
    def demand(self) -> Demand:
        """What the instance asks of the place it runs on."""
        return demand_of(self.service, self.service_key)

    @functools.cached_property
    def volume_keys(self) -> tuple[str, ...]:
        """Its service's volumes as workers name them: ``owner/job_name/volume``."""
        return tuple(f"{self.service_key}/{v.name}" for v in self.service.volumes)

    @functools.cached_property
    def doc(self) -> dict[str, Any]:
        """The JSON form (the service's part is the service's own, shared by its instances)."""
        return {"iid": self.iid, "owner": self.owner, "job_name": self.job_name,
                "instance_number": self.instance_number, "service": self.service.doc, "sid": self.sid,
                "rr_ip": self.rr_ip, "closest_ip": self.closest_ip, "prefer": self.prefer}


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
    health: str = ""  # starting, healthy or unhealthy when the service has a health check

    @property
    def serves(self) -> bool:
        """Whether the instance is a backend of its service's IPs: RUNNING at an address, and healthy
        when it has a health check (readiness)."""
        return self.ready and bool(self.ip)

    @property
    def ready(self) -> bool:
        """Whether the instance works as far as its worker knows: RUNNING, and healthy when it has a check."""
        return self.status == RUNNING and self.health in ("", HEALTHY)


def lost(seen: InstanceStatus | None, where: str, since: float, **at: str) -> InstanceStatus:
    """The status of an instance whose *where* (``worker w1``, ``cluster c1``) has been silent since *since*
    (epoch seconds): LOST, with what was last seen of it."""
    last = f"; last seen {seen.status}" if seen else ""
    clock = time.strftime("%H:%M:%S", time.localtime(since))
    kept = {k: v for k, v in (seen.__dict__ if seen else {}).items() if k in ("node", "cluster", "restarts", "ip")}
    return InstanceStatus(**{**kept, **at, "status": LOST, "reason": f"{where} silent since {clock}{last}",
                             "since": since})


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
    volumes: dict[str, int] = dataclasses.field(default_factory=dict)  # owner/job/name -> bytes

    @classmethod
    def load(cls, data: dict[str, Any]) -> NodeState:
        """Read the published form: ``{"instances": {...}, "coord": [...], "volumes": {...}, <metric>:
        <number>...}``."""
        coord, volumes = data.get("coord", []), data.get("volumes", {})
        check(coord, list[float], "NodeState.coord")
        check(volumes, dict[str, int], "NodeState.volumes")
        metrics = {k: float(v) for k, v in data.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        return cls(load_statuses(data.get("instances", {})), metrics, [float(x) for x in coord], volumes)


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
    gpus: int = 0  # whole NVIDIA GPUs (services/worker/gpus.py)
    gpu_model: str = ""  # their model (models joined with " + " when they differ)
    gpu_memory_mb: float = 0.0  # the memory of each (the smallest, when they differ)
    probe: str = ""
    overlay: str = ""  # the VXLAN endpoint ``ip:port`` when the worker has the overlay network
    report_every: float = 0.0  # seconds between its state reports (its heartbeat; 0: the default)


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
    gpus: int = 0
    gpu_model: str = ""
    services: dict[str, int] = dataclasses.field(default_factory=dict)
    coord: list[float] = dataclasses.field(default_factory=list)
    cert_expires: float = 0.0  # when the worker's certificate ends (epoch seconds; 0: it has none)
    volumes: dict[str, int] = dataclasses.field(default_factory=dict)  # the services' volumes on it: bytes
    silent_since: float = 0.0  # when it was last heard, once it is found silent (epoch seconds; 0: it is not)
    suspect: str = ""  # why it is not trusted with new instances ("": it is)

    @functools.cached_property
    def doc(self) -> dict[str, Any]:
        """The JSON form, made once: the root shows every worker to every user every few seconds, and a
        summary holds lists and maps (read it, never change it)."""
        return dump(self)

    @functools.cached_property
    def services_by_owner(self) -> dict[str, dict[str, int]]:
        """:attr:`services` (``owner/job_name``: instances) by owner, keyed by job name: each user is shown
        only their own."""
        out: dict[str, dict[str, int]] = {}
        for key, count in self.services.items():
            owner, _, job = key.partition("/")
            out.setdefault(owner, {})[job] = count
        return out

    def candidate(self) -> Candidate:
        """This worker as a scheduling candidate."""
        return Candidate(
            id=self.name, cpu_free=self.cpu_free, memory_free_mb=self.memory_free_mb, cpu_total=self.cpu_cores,
            memory_total_mb=self.memory_mb, virtualizations=tuple(self.runtimes), cpu_percent=self.cpu_percent,
            location=self.location, gpus_free=self.gpus_free, arch=self.arch, labels=tuple(self.labels),
            services=dict(self.services), coord=tuple(self.coord), volumes=tuple(self.volumes),
        )


@dataclass(frozen=True)
class ClusterInfo:
    """A cluster's static facts (retained ``info``)."""

    name: str
    location: str = ""
    version: str = ""
    scheduler: str = ""
