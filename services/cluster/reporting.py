"""The cluster's ``state`` for the root: every worker's summary and every desired instance's status.

Plain logic: :class:`StateReport` builds the document from what the orchestrator holds, keeping each
worker's and instance's document with the values it was made from, so a report converts only what
changed since the last one (10,000 instances, a few of them changing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.cluster.placement import NodeView
from services.common import models
from services.common.models import InstanceSpec, InstanceStatus, NodeSummary


def status_of(cluster: str, node: str | None, seen: InstanceStatus | None, why: str,
              lost_since: float = 0.0) -> InstanceStatus:
    """An instance's status as the root should see it: where it was placed and what its worker says; *why*
    is why it waits for a worker, or, placed, what its reason says while its worker says nothing (its
    volumes starting empty). On a worker gone since *lost_since* it is LOST."""
    if node is None:
        return InstanceStatus(models.NO_WORKER_CAPACITY if why else models.REQUESTED, why, cluster=cluster)
    if lost_since:
        return models.lost(seen, f"worker {node}", lost_since, node=node, cluster=cluster)
    if seen is None:
        return InstanceStatus(models.NODE_SCHEDULED, why, node=node, cluster=cluster)
    return InstanceStatus(**{**seen.__dict__, "node": node, "cluster": cluster, "reason": seen.reason or why})


class StateReport:
    """Builds the cluster's state document, converting only the workers and instances that changed."""

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self._nodes: dict[str, tuple[NodeSummary, dict[str, Any]]] = {}
        self._instances: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def nodes(self, summaries: Mapping[str, NodeSummary]) -> dict[str, dict[str, Any]]:
        """The ``nodes`` section."""
        out = {}
        for name, summary in summaries.items():
            made = self._nodes.get(name)
            if made is None or made[0] != summary:
                made = self._nodes[name] = (summary, models.dump(summary))
            out[name] = made[1]
        if len(self._nodes) > len(out):
            for name in self._nodes.keys() - out.keys():
                del self._nodes[name]
        return out

    def instances(self, desired: Mapping[str, InstanceSpec], assigned: Mapping[str, str],
                  nodes: Mapping[str, NodeView], unplaced: Mapping[str, str],
                  notes: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
        """The ``instances`` section: the status of every desired instance (*unplaced*: why one waits for a
        worker; *notes*: what a placed one's reason says while its worker's says nothing)."""
        out = {}
        notes = notes or {}
        for iid in desired:
            node = assigned.get(iid)
            view = nodes.get(node) if node is not None else None
            seen = view.statuses.get(iid) if view is not None else None
            inputs = (node, seen, unplaced.get(iid) or notes.get(iid, ""), view.lost_since if view else 0.0)
            made = self._instances.get(iid)
            if made is None or made[0] != inputs:
                made = self._instances[iid] = (inputs, models.dump(status_of(self.cluster, *inputs)))
            out[iid] = made[1]
        if len(self._instances) > len(out):  # instances went: forget their documents
            for iid in self._instances.keys() - out.keys():
                del self._instances[iid]
        return out
