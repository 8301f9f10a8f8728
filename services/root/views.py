"""The infrastructure as users see it: clusters and workers, for ``clusters/list``, ``nodes/list`` and
the retained ``oak/api/<user>/state/infrastructure`` topic the dashboard builds its overview from."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from services.common import models
from services.root.clusters import ClusterView


def cluster_rows(clusters: Iterable[ClusterView]) -> list[dict[str, Any]]:
    """Every cluster: online, location, workers and their aggregate capacity."""
    out = []
    for view in sorted(clusters, key=lambda v: v.name):
        nodes = [n for n in view.nodes.values() if n.online]
        out.append({
            "name": view.name,
            "online": view.online,
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
    mine = viewer + "/"
    return [
        {"cluster": view.name, **models.dump(node), "online": node.online and view.online,
         "services": {key[len(mine):]: n for key, n in node.services.items() if key.startswith(mine)}}
        for view in sorted(clusters, key=lambda v: v.name)
        for node in sorted(view.nodes.values(), key=lambda n: n.name)
    ]
