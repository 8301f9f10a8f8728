"""The cluster's placement, as plain logic: what it knows of its workers, and where pending instances go.

No broker, no store, no event loop: :func:`plan` takes the desired instances and what is observed of
the workers and returns the placements, so it is tested by calling it (tests/test_cluster_placement.py).
The orchestrator applies the result, stores it and publishes the workers' maps.

Fit is judged on *declared* demand (the SLA's vcpus and memory summed over a worker's instances), so
two placements in a row never double-book a worker; measured load only breaks ties.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from services.common import scheduling
from services.common.models import InstanceSpec, InstanceStatus, NodeInfo, NodeSummary
from services.common.plugin_api import Candidate
from services.common.scheduling import Profile, reserve, with_targets


@dataclass
class NodeView:
    """What the cluster knows of one worker."""

    name: str
    online: bool = False
    info: NodeInfo | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    statuses: dict[str, InstanceStatus] = field(default_factory=dict)
    coord: list[float] = field(default_factory=list)
    volumes: dict[str, int] = field(default_factory=dict)  # the services' volumes it holds, with their bytes
    lost_since: float = 0.0  # when it was last heard, while it is gone (epoch seconds; 0: it is not)
    suspect: str = ""  # why it gets no new instances ("": it does)


def summaries(nodes: Mapping[str, NodeView], desired: Mapping[str, InstanceSpec], assigned: Mapping[str, str],
              location: str = "", cert_expiry: Callable[[str], float] = lambda _node: 0.0) -> dict[str, NodeSummary]:
    """Every worker that said what it is: capacity, what remains free after its instances' demands,
    labels, replicas per service (*location*: the cluster's, for workers that give none)."""
    used: dict[str, list[float]] = {}
    services: dict[str, dict[str, int]] = {}
    for iid, node in assigned.items():
        spec = desired[iid]
        demand = spec.demand
        total = used.setdefault(node, [0.0, 0.0, 0.0, 0.0])
        total[0] += demand.vcpus
        total[1] += demand.memory_mb
        total[2] += demand.gpus
        total[3] += 1
        counts = services.setdefault(node, {})
        counts[spec.service_key] = counts.get(spec.service_key, 0) + 1
    out = {}
    for view in nodes.values():
        if view.info is None:
            continue
        cpu, mem, gpus, count = used.get(view.name, [0.0, 0.0, 0.0, 0.0])
        info = view.info
        out[view.name] = NodeSummary(
            name=view.name, online=view.online, cpu_cores=info.cpu_cores, memory_mb=info.memory_mb,
            cpu_free=info.cpu_cores - cpu, memory_free_mb=info.memory_mb - mem,
            cpu_percent=view.metrics.get("cpu_percent", 0.0), runtimes=list(info.runtimes),
            instances=int(count), arch=info.arch, labels=list(info.labels),
            location=info.location or location, gpus_free=info.gpus - gpus, gpus=info.gpus,
            gpu_model=info.gpu_model,
            services=services.get(view.name, {}), coord=list(view.coord),
            cert_expires=cert_expiry(view.name), volumes=dict(view.volumes), silent_since=view.lost_since,
            suspect=view.suspect,
        )
    return out


@dataclass(frozen=True)
class Plan:
    """What one placement pass decided: new placements (instance -> worker), and why the others wait."""

    placed: dict[str, str]
    unplaced: dict[str, str]


def plan(desired: Mapping[str, InstanceSpec], assigned: Mapping[str, str], candidates: list[Candidate],
         profile: Profile) -> Plan:
    """Place every desired instance without a worker on the online *candidates*, in a stable order (by
    service and number), each decision seeing the demands of those before it. An instance that replaces
    another (a rolling update) goes to the worker it ``prefer``s when that one takes it; one with volumes,
    to a worker holding them when one takes it."""
    pool = {c.id: c for c in candidates}
    coords = {c.id: c.coord for c in candidates if c.coord}
    placed: dict[str, str] = {}
    unplaced: dict[str, str] = {}
    pending = sorted((iid for iid in desired if iid not in assigned),
                     key=lambda i: (desired[i].job_name, desired[i].instance_number))
    for iid in pending:
        demand = with_targets(desired[iid].demand, coords)
        decision = None
        for first in _preferred(desired[iid], pool):
            decision = scheduling.place(demand, first, profile, "node")
            if decision.choice is not None:
                break
        if decision is None or decision.choice is None:
            decision = scheduling.place(demand, list(pool.values()), profile, "node")
        if decision.choice is None:
            unplaced[iid] = decision.why_not() if pool else "no worker online"
            continue
        pool[decision.choice.id] = reserve(decision.choice, demand)
        placed[iid] = decision.choice.id
    return Plan(placed, unplaced)


def _preferred(spec: InstanceSpec, pool: Mapping[str, Candidate]) -> list[list[Candidate]]:
    """The candidates to try before the others, best first: the worker *spec* prefers, then those holding
    its volumes."""
    out = [[pool[spec.prefer]]] if spec.prefer in pool else []
    if not spec.service.volumes:  # most instances: no look at the thousand candidates
        return out
    keys = set(spec.volume_keys)
    holders = [c for c in pool.values() if keys & set(c.volumes)]
    return [*out, holders] if holders else out


def volume_note(spec: InstanceSpec, node: str, nodes: Mapping[str, NodeView]) -> str:
    """What the status of *spec*, placed on *node*, should say of its volumes: that they start empty there
    while their data is on another worker ("" when it holds them, or nobody does)."""
    keys = set(spec.volume_keys)
    if not keys or keys & set(nodes[node].volumes if node in nodes else ()):
        return ""
    holders = sorted(n for n, view in nodes.items() if keys & set(view.volumes))
    if not holders:
        return ""
    return f"its volumes start empty here: their data is on {', '.join(holders)}, which cannot take it now"
