"""Services (one row each) and the instances of the selected one."""

from __future__ import annotations

from typing import Any

from textual.widgets import DataTable

STATUS_STYLE = {"RUNNING": "green", "COMPLETED": "blue", "DEAD": "red", "FAILED": "red",
                "NoActiveClusterWithCapacity": "yellow", "NO_WORKER_CAPACITY": "yellow",
                "healthy": "green", "starting": "yellow", "unhealthy": "red"}


def styled(status: str) -> str:
    """A status with its colour."""
    style = STATUS_STYLE.get(status)
    return f"[{style}]{status}[/]" if style else status


class ServicesTable(DataTable[str]):
    """One row per service, keyed by job name."""

    def on_mount(self) -> None:
        """Set up the columns."""
        self.cursor_type = "row"
        self.add_columns("service", "status", "replicas", "virt")

    def show(self, services: dict[str, dict[str, Any]]) -> None:
        """Redraw every row, keeping the cursor on the same service."""
        selected = self.selected
        self.clear()
        for job in sorted(services):
            state = services[job]
            self.add_row(job, styled(state["status"]), str(state["replicas"]), state["virtualization"], key=job)
        if selected in services:
            self.move_cursor(row=sorted(services).index(selected))

    @property
    def selected(self) -> str | None:
        """The job name under the cursor."""
        if not self.row_count:
            return None
        return str(self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value)


class InstancesTable(DataTable[str]):
    """The instances of one service."""

    def on_mount(self) -> None:
        """Set up the columns."""
        self.cursor_type = "row"
        self.add_columns("#", "status", "health", "cluster", "node", "ip", "cpu%", "MB", "restarts", "reason")

    def show(self, state: dict[str, Any] | None) -> None:
        """Redraw for *state* (None: nothing selected); the border shows the service's IPs."""
        self.clear()
        rr, closest = (state or {}).get("rr_ip"), (state or {}).get("closest_ip")
        rollout = (state or {}).get("rollout")
        titles = [f"service IPs: round-robin {rr}, closest {closest}" if rr else ""]
        if rollout:
            titles.append(f"revision {rollout['revision']} {rollout['state']} ({rollout['updated']} updated)")
        self.border_title = "  ".join(t for t in titles if t) or None
        for i in (state or {}).get("instances", []):
            self.add_row(str(i["number"]), styled(i["status"]), styled(i.get("health") or "-"),
                         i["cluster"] or "-", i["node"] or "-",
                         i.get("ip") or "-",
                         f"{i['cpu_percent']:.0f}", f"{i['memory_mb']:.0f}", str(i["restarts"]), i["reason"] or "")
