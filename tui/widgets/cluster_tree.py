"""The overview: clusters as a tree with their workers, online or not, with CPU and memory."""

from __future__ import annotations

from typing import Any

from textual.widgets import Tree


def _mark(online: bool) -> str:
    return "[green]●[/]" if online else "[red]○[/]"


class ClusterTree(Tree[str]):
    """Clusters and their workers."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("clusters", **kwargs)
        self.show_root = False

    def show(self, clusters: list[dict[str, Any]], nodes: list[dict[str, Any]]) -> None:
        """Redraw from the infrastructure view."""
        self.clear()
        for cluster in clusters:
            label = (f"{_mark(cluster['online'])} {cluster['name']}  {cluster['nodes']} workers  "
                     f"{cluster['cpu_percent']:.0f}% cpu  {cluster['instances']} instances")
            branch = self.root.add(label, data=cluster["name"], expand=True)
            for node in (n for n in nodes if n["cluster"] == cluster["name"]):
                free = node["memory_free_mb"]
                branch.add_leaf(f"{_mark(node['online'])} {node['name']}  {node['cpu_percent']:.0f}% cpu  "
                                f"{node['cpu_free']:.1f}/{node['cpu_cores']:.0f} vcpu free  {free:.0f} MB free  "
                                f"{','.join(node['runtimes'])}", data=node["name"])
        if not clusters:
            self.root.add_leaf("no clusters yet")

    def labels(self) -> list[str]:
        """The plain text of every line, for tests and screen readers."""
        out = []
        for cluster in self.root.children:
            out.append(str(cluster.label))
            out.extend(str(node.label) for node in cluster.children)
        return out
