"""What users see: their services' retained states (``oak/api/<user>/state/services/<job>``), and the
infrastructure, clusters and workers, for ``clusters/list``, ``nodes/list`` and the retained
``oak/api/<user>/state/infrastructure`` topic the dashboard builds its overview from."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from services.common import models
from services.common.models import InstanceStatus
from services.root.catalog import Instance, Service
from services.root.clusters import ClusterView
from services.root.rollout import Rollout


class ServiceStates:
    """The users' view of their services: spec summary, overall status and every instance's row.

    A burst changes a few rows of a thousand between two publications, so each row is kept with its
    JSON text and the status it was made from, and made again only when that changed."""

    def __init__(self, status_of: Callable[[Instance], InstanceStatus]) -> None:
        self.status_of = status_of  # the best-known status of an instance (the orchestrator's)
        self._rows: dict[str, tuple[tuple[int, str, InstanceStatus], dict[str, Any], str]] = {}

    def state(self, service: Service, instances: list[Instance]) -> dict[str, Any]:
        """*service* as its owner sees it, with its *instances* (by number)."""
        spec = service.spec
        rows = [self._row(instance) for instance in instances]
        return {
            "service_id": service.sid,
            "job_name": service.job_name,
            "app_id": service.app_id,
            "virtualization": spec.virtualization,
            "code": spec.code,
            "cmd": list(spec.cmd),
            "memory": spec.memory,
            "vcpus": spec.vcpus,
            "replicas": service.replicas,
            "rr_ip": service.rr_ip,
            "closest_ip": service.closest_ip,
            "health": spec.health.to_dict() if spec.health else None,
            "revision": service.revision,
            "volumes": [v.to_dict() for v in spec.volumes],
            "rollout": _rollout(service.rollout, rows),
            "status": overall_status(service.replicas, [r["status"] for r in rows]),
            "instances": rows,
        }

    def _row(self, instance: Instance) -> dict[str, Any]:
        inputs = (instance.number, instance.cluster, self.status_of(instance))
        made = self._rows.get(instance.iid)
        if made is None or made[0] != inputs:
            row = {"number": instance.number, "iid": instance.iid, "revision": instance.revision,
                   "cluster": instance.cluster,
                   **{k: v for k, v in models.dump(inputs[2]).items() if k != "cluster"}}
            made = self._rows[instance.iid] = (inputs, row, json.dumps(row, separators=(",", ":")))
        return made[1]

    def text(self, iid: str) -> str:
        """The JSON text of an instance's last row."""
        return self._rows[iid][2]

    def json_text(self, state: dict[str, Any]) -> str:
        """A :meth:`state` as JSON text, its rows' taken as they were made (the ``data`` of its envelope)."""
        head = json.dumps({k: v for k, v in state.items() if k != "instances"}, separators=(",", ":"))
        rows = ",".join(self._rows[row["iid"]][2] for row in state["instances"])
        return f'{head[:-1]},"instances":[{rows}]}}'

    def forget(self, iid: str) -> None:
        """*iid* was removed."""
        self._rows.pop(iid, None)


def _rollout(rollout: Rollout | None, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The latest rollout as users see it: revision, state, reason, and how many instances run it."""
    if rollout is None:
        return None
    updated = sum(1 for row in rows if row["revision"] == rollout.revision)
    return {"revision": rollout.revision, "state": rollout.state, "reason": rollout.reason,
            "previous": rollout.previous, "updated": updated, "active": rollout.active}


def overall_status(replicas: int, statuses: list[str]) -> str:
    """One word for a service: UNDEPLOYED, RUNNING, COMPLETED, or the status holding it back."""
    if replicas == 0 and not statuses:
        return "UNDEPLOYED"
    if statuses and all(s == models.RUNNING for s in statuses):
        return models.RUNNING
    if statuses and all(s == models.COMPLETED for s in statuses):
        return models.COMPLETED
    for worst in (models.FAILED, models.DEAD, models.NO_CLUSTER_CAPACITY, models.NO_WORKER_CAPACITY):
        if worst in statuses:
            return worst
    return next((s for s in statuses if s != models.RUNNING), models.REQUESTED)


def condition(online: bool, lost_since: float = 0.0, suspect: str = "") -> str:
    """One word for a cluster or worker in a listing: ``LOST`` (silent; since when is beside it),
    ``SUSPECT`` (it accepted instances and ran none of them), ``online`` or ``offline``."""
    if lost_since:
        return "LOST"
    if suspect:
        return "SUSPECT"
    return "online" if online else "offline"


def cluster_rows(clusters: Iterable[ClusterView]) -> list[dict[str, Any]]:
    """Every cluster: online, location, workers and their aggregate capacity."""
    out = []
    for view in sorted(clusters, key=lambda v: v.name):
        nodes = [n for n in view.nodes.values() if n.online]
        out.append({
            "name": view.name,
            "online": view.online,
            "state": condition(view.online, view.lost_since, view.suspect),
            "reason": view.suspect,
            "lost_since": view.lost_since,
            "location": view.info.location if view.info else "",
            "nodes": len(nodes),
            "cpu_cores": sum(n.cpu_cores for n in nodes),
            "memory_mb": sum(n.memory_mb for n in nodes),
            "cpu_percent": round(sum(n.cpu_percent for n in nodes) / len(nodes), 1) if nodes else 0.0,
            "instances": len(view.statuses),
        })
    return out


def node_rows(clusters: Iterable[ClusterView], viewer: str) -> list[dict[str, Any]]:
    """Every worker of every cluster, as *viewer* may see it: of the services on it, only the viewer's own
    (by job name; clusters count them as ``owner/job_name``)."""
    return [
        {"cluster": view.name, **node.doc, "online": node.online and view.online,
         "state": condition(node.online and view.online, node.silent_since or view.lost_since, node.suspect),
         "services": dict(node.services_by_owner.get(viewer, {}))}
        for view in sorted(clusters, key=lambda v: v.name)
        for node in sorted(view.nodes.values(), key=lambda n: n.name)
    ]
