"""What a plugin author writes against: the data a hook's objects receive and return, and the
Protocols they implement (one per extension point or optional ability, checked with ``isinstance``).

The hooks that hand these objects to Oakling are in :mod:`services.common.hookspecs`; a plugin module
imports ``hookimpl`` and the types it needs from here::

    from services.common.plugin_api import Candidate, Demand, hookimpl
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import pluggy

PROJECT = "oak"
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------------------------------
# Runtimes: how a worker runs an instance
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuDevice:
    """One NVIDIA GPU the worker gave an instance: its index (``/dev/nvidia<index>``) and UUID (``GPU-...``)."""

    index: int
    uuid: str


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a runtime needs to start one instance of a service."""

    iid: str
    job_name: str
    instance_number: int
    virtualization: str
    code: str
    cmd: tuple[str, ...]
    environment: tuple[str, ...]
    memory_mb: int
    vcpus: float
    one_shot: bool
    log_path: str
    work_dir: str
    privileged: bool = False
    port: str = ""
    netns: str = ""  # path of the instance's network namespace (/run/netns/...); "" = the worker's own
    ip: str = ""  # the instance IP inside *netns* ("" without the overlay)
    gateway: str = ""  # the instance's default gateway inside *netns*
    arch: tuple[str, ...] = ()  # the SLA's ``arch`` list, paired by position with comma-separated ``code`` entries
    #: The SLA's secrets given as variables, ``KEY=value`` (never log them; kept out of ``repr``).
    secret_env: tuple[str, ...] = field(default=(), repr=False)
    #: The SLA's secrets given as files: (the file on the worker's tmpfs, the path the instance sees it
    #: at, read-only).
    secret_files: tuple[tuple[str, str], ...] = ()
    #: The instance's private directory (a tmpfs when the worker is root) holding those files, where a
    #: runtime may write what else carries secrets (the container runtime's env file); "" without secrets.
    secret_dir: str = ""
    #: A registry credential for pulling ``code`` (the SLA's ``registry_secret``): the path of a skopeo
    #: auth file in *secret_dir*; "" without one.
    registry_auth: str = ""
    #: The SLA's volumes: (the service's directory on the worker, the path the instance sees it at),
    #: mounted read-write; the directory outlives the instance.
    volumes: tuple[tuple[str, str], ...] = ()
    #: For a VM, the size of each volume's disk in MB, in the order of *volumes* (0: the runtime's default).
    volume_sizes_mb: tuple[int, ...] = ()
    #: The whole GPUs the worker gave the instance for the SLA's ``vgpus`` (none without).
    gpus: tuple[GpuDevice, ...] = ()
    #: Called, from any thread, with a short status reason while the runtime prepares the instance
    #: (e.g. ``"pulling docker.io/library/nginx:latest"``); the worker shows it with CREATING.
    on_progress: Callable[[str], None] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Handle:
    """What a runtime remembers of a started instance; stored in TinyDB so a restarted worker can adopt it."""

    iid: str
    runtime: str
    pid: int
    started_at: float
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Exit:
    """How an instance ended: its exit code (None when unknown) and a reason people can read."""

    code: int | None
    reason: str


@dataclass(frozen=True)
class InstanceStats:
    """A sample of one instance's resource use."""

    cpu_percent: float
    memory_mb: float
    io_mb: float = 0.0  # MB read from and written to block devices since the instance started


@runtime_checkable
class Runtime(Protocol):
    """A way to run instances (OS processes, OCI containers, VMs).

    ``virtualizations`` are the SLA ``virtualization`` values this runtime serves; the worker advertises
    them in its node info, and the schedulers never place a service on a worker lacking its value.

    Optional abilities are Protocols of their own: :class:`HasFacts`, :class:`Closeable` and
    :class:`Executes`.
    """

    name: str
    virtualizations: tuple[str, ...]

    async def start(self, spec: LaunchSpec) -> Handle:
        """Start the instance; raise :class:`RuntimeError` with a readable message when it cannot start.

        A start is never cancelled: an instance removed while it starts waits for the start to end, and
        what it started is then stopped. A start need not clean up after a cancel."""
        ...

    async def wait(self, handle: Handle) -> Exit:
        """Return once the instance has ended."""
        ...

    async def stop(self, handle: Handle, grace: float) -> None:
        """Ask the instance to stop (SIGTERM), kill it after *grace* seconds, and clean up after it."""
        ...

    async def adopt(self, handle: Handle) -> bool:
        """Return True when the instance behind *handle* still runs, so a restarted worker keeps it."""
        ...

    async def stats(self, handle: Handle) -> InstanceStats | None:
        """Return a resource sample of a running instance, or None when it cannot be measured."""
        ...


@runtime_checkable
class HasFacts(Protocol):
    """An optional ability of a :class:`Runtime`: something to say about it on this worker."""

    def facts(self) -> dict[str, str]:
        """Facts such as ``{"vm.accel": "kvm"}``; the worker adds each to its node labels as ``key=value``,
        so people see it in ``oak node list`` and SLAs can ask for it with an ``addons`` constraint."""
        ...


@runtime_checkable
class Closeable(Protocol):
    """An optional ability of a :class:`Runtime`: something to release when the worker stops."""

    async def close(self) -> None:
        """Awaited when the worker stops gracefully, after its instances were stopped (the container
        runtime stops the containerd it started)."""
        ...


@runtime_checkable
class Executes(Protocol):
    """An optional ability of a :class:`Runtime`: run a command inside a running instance (its
    namespaces and filesystem), as an ``exec`` health check does. Without it such checks fail, saying so."""

    async def exec(self, handle: Handle, argv: tuple[str, ...], timeout: float) -> Exit:
        """Run *argv* inside the instance behind *handle* and return how it ended (``reason`` ends with
        what it printed); after *timeout* seconds kill it and return code None."""
        ...


# --------------------------------------------------------------------------------------------------
# Collectors: what a worker reports about itself
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class Collector(Protocol):
    """Measures the node a worker runs on."""

    name: str

    def info(self) -> dict[str, Any]:
        """Static facts: ``cpu_cores``, ``memory_mb``, ``arch``, ``os``, ``hostname``."""
        ...

    def sample(self) -> dict[str, Any]:
        """Dynamic facts: ``cpu_percent``, ``memory_free_mb``, ``memory_percent``, ``disk_percent``."""
        ...


# --------------------------------------------------------------------------------------------------
# Schedulers: where an instance goes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Demand:
    """What one instance asks of the candidate it is placed on.

    ``service`` identifies the service (``owner/job_name``) so plugins can see where its other
    replicas run; ``near`` holds geo constraints as ``(latitude, longitude, max_km)``; ``latency``
    holds latency constraints as ``(target worker, max_ms)`` and ``targets`` the Vivaldi coordinates
    of the target workers the scheduler knows (filled in just before a decision).
    """

    vcpus: float
    memory_mb: int
    virtualization: str
    clusters: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()
    service: str = ""
    gpus: int = 0
    arch: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    near: tuple[tuple[float, float, float], ...] = ()
    latency: tuple[tuple[str, float], ...] = ()
    targets: dict[str, tuple[float, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    """A place an instance can go: a worker (at a cluster) or a cluster (at the root).

    For a cluster, the resources, architecture and labels are those of the worker of that cluster that
    would take the instance (never sums), so the root never sends an instance no worker can hold.
    ``services`` counts the replicas of each service already there; ``location`` is ``"lat,long"``;
    ``coord`` is the worker's Vivaldi coordinate (empty until it has measured).
    """

    id: str
    cpu_free: float
    memory_free_mb: float
    cpu_total: float
    memory_total_mb: float
    virtualizations: tuple[str, ...]
    cpu_percent: float = 0.0
    location: str = ""
    node_names: tuple[str, ...] = ()
    gpus_free: float = 0.0
    arch: str = ""
    labels: tuple[str, ...] = ()
    services: dict[str, int] = field(default_factory=dict)
    coord: tuple[float, ...] = ()
    volumes: tuple[str, ...] = ()  # the services' volumes it holds (``owner/job_name/volume``)


@runtime_checkable
class SchedulerPlugin(Protocol):
    """One scheduling plugin: it takes part in a decision at the extension points it implements
    (Kubernetes' scheduling framework), each a small Protocol of its own: :class:`FilterPlugin`,
    :class:`ScorePlugin`, and optionally :class:`Normalizer` and :class:`ConstraintEvaluator`.

    The framework first removes candidates that lack the resources, the virtualization, the
    architecture or a ``direct`` constraint (*fit*). Then the filter plugins of the profile, in order,
    reject candidates; then the score plugins score the survivors. Each plugin's scores are normalised
    to 0..100 (by its ``normalize`` when it is a :class:`Normalizer`, else clamped), multiplied by the
    weight the profile gives the plugin, and summed; the highest total wins (ties broken by candidate
    id). Plugins never see the weights. A plugin must implement ``filter`` or ``score`` or both.
    """

    name: str


@runtime_checkable
class FilterPlugin(Protocol):
    """The filter extension point: may *candidate* take the instance at all?"""

    name: str

    def filter(self, demand: Demand, candidate: Candidate) -> str | None:
        """Return None to keep *candidate*, or a short reason to reject it (``"memory 512 < 1024"``); the
        reason is shown to users when nothing fits."""
        ...


@runtime_checkable
class ScorePlugin(Protocol):
    """The score extension point: how good is each surviving candidate?"""

    name: str

    def score(self, demand: Demand, candidate: Candidate) -> float:
        """Return a score, higher is better (after normalisation and weighting the highest total wins)."""
        ...


@runtime_checkable
class Normalizer(Protocol):
    """An optional ability of a :class:`ScorePlugin`: map its raw scores of one decision to 0..100
    (without it, scores are clamped to 0..100)."""

    def normalize(self, scores: dict[str, float]) -> dict[str, float]:
        """*scores* (candidate id -> raw score) mapped to 0..100."""
        ...


@runtime_checkable
class ConstraintEvaluator(Protocol):
    """A scheduler plugin that honours SLA ``constraints`` of some types (an ability a plugin declares).

    ``evaluates`` names the constraint types (``"geo"``, ``"latency"``, ``"addons"``, ...) its ``filter``
    and ``score`` take into account. A service with a constraint that no plugin of the profile
    evaluates is refused at deploy (the framework's *fit* itself handles ``direct``), rather than placed
    as if the constraint were not there.
    """

    evaluates: tuple[str, ...]
