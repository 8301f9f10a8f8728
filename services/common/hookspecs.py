"""The plugin contract of Oakling: every ``oak_*`` hook, documented like pytest's hookspecs.

Plugins are plain modules (or objects) carrying ``@hookimpl`` functions. Oakling finds them through the
entry-point groups ``oak.schedulers``, ``oak.runtimes`` and ``oak.collectors`` (its own built-ins are
declared there too) and asks them, by name, for the one the operator chose at startup.

pluggy calls hooks synchronously; a hook therefore *returns an object* whose methods may be async
(a :class:`Runtime`), it is never a coroutine itself. Always call hooks with keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import pluggy

PROJECT = "oak"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------------------------------
# Runtimes: how a worker runs an instance
# --------------------------------------------------------------------------------------------------


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

    Optionally, ``facts() -> dict[str, str]`` says something about the runtime on this worker (the vm
    runtime: ``{"vm.accel": "kvm"}``); the worker adds each fact to its node labels as ``key=value``,
    so people see it in ``oak node list`` and SLAs can ask for it with an ``addons`` constraint.

    Optionally, ``async close()`` is awaited when the worker stops gracefully, after its instances
    were stopped (the container runtime stops the containerd it started).
    """

    name: str
    virtualizations: tuple[str, ...]

    async def start(self, spec: LaunchSpec) -> Handle:
        """Start the instance; raise :class:`RuntimeError` with a readable message when it cannot start."""
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


@runtime_checkable
class SchedulerPlugin(Protocol):
    """One scheduling plugin: it may filter, score and normalise (Kubernetes' extension points).

    The framework first removes candidates that lack the resources, the virtualization, the
    architecture or a ``direct`` constraint (*fit*). Then, for the plugins of the profile, in order:

    * ``filter(demand, candidate)``: return None to keep the candidate, or a short reason to reject
      it (``"memory 512 < 1024"``); the reason is shown to users when nothing fits;
    * ``score(demand, candidate)``: a number, higher is better, for every surviving candidate;
    * ``normalize(scores)`` (optional): map this plugin's raw scores of one decision to 0..100.
      Without it, scores are clamped to 0..100.

    The framework multiplies each plugin's normalised score by the weight the profile gives it, sums
    them, and picks the highest total (ties broken by candidate id). Plugins never see the weights.
    A plugin that only filters returns 0 from ``score``.
    """

    name: str

    def filter(self, demand: Demand, candidate: Candidate) -> str | None:
        """Return None to keep *candidate*, or a reason to reject it."""
        ...

    def score(self, demand: Demand, candidate: Candidate) -> float:
        """Return a score; the highest (after normalisation and weighting) wins."""
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


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def oak_make_runtime(name: str, config: dict[str, Any]) -> Runtime | None:
    """Return the runtime called *name*, built with *config*, or None if this plugin has no such runtime.

    Called once per runtime the worker was told to enable (``--runtime``), at worker startup.
    Stops at first non-None result.

    :param name: the runtime's name as the operator wrote it, e.g. ``"process"``.
    :param config: ``data_dir`` (the worker's data directory) plus any runtime options.
    """


@hookspec(firstresult=True)
def oak_make_collector(name: str) -> Collector | None:
    """Return the metrics collector called *name*, or None.

    Called once at worker startup. Stops at first non-None result.
    """


@hookspec(firstresult=True)
def oak_make_scheduler(name: str, args: dict[str, Any]) -> SchedulerPlugin | None:
    """Return the scheduler plugin called *name*, configured with *args*, or None.

    Called once per plugin of the scheduling profile, at root or cluster startup; the same plugins
    serve both tiers (the candidates are clusters at the root and workers at a cluster). Raise
    ``ValueError`` with a readable message for bad *args*. Stops at first non-None result.

    :param name: the plugin's name as the profile writes it, e.g. ``"least-loaded"``.
    :param args: the profile's ``args`` table for this plugin (``{}`` when it has none). An
        implementation may leave this parameter out if it takes no arguments.
    """
