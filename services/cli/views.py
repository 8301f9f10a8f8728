"""How services look in a terminal: the tables and lines ``oak service`` prints."""

from __future__ import annotations

import time
from typing import Any

from services.cli.tables import table

SERVICE_COLUMNS = [("SERVICE", "job_name"), ("ID", "service_id"), ("STATUS", "status"),
                   ("REPLICAS", "replicas"), ("VIRT", "virtualization"), ("RR IP", "rr_ip"), ("CODE", "code")]
INSTANCE_COLUMNS = [("#", "number"), ("STATUS", "status"), ("CLUSTER", "cluster"), ("NODE", "node"),
                    ("IP", "ip"), ("CPU%", "cpu_percent"), ("MEM MB", "memory_mb"), ("IO MB", "io_mb"),
                    ("RESTARTS", "restarts"), ("REASON", "reason")]


def services_text(data: Any) -> str:
    """Services as ``oak service list`` prints them."""
    return table(data, SERVICE_COLUMNS) if data else "no services"


def health_check_text(check: dict[str, Any] | None) -> str:
    """The service's health check in one line ("" without one)."""
    if not check:
        return ""
    what = " ".join(check["cmd"]) if check["type"] == "exec" else f":{check['port']}"
    what += check["path"] if check["type"] == "http" else ""
    return (f"health check: {check['type']} {what} every {check['interval']:g}s (timeout {check['timeout']:g}s, "
            f"unhealthy after {check['failures']} failures, start period {check['start_period']:g}s)\n")


def service_text(data: Any) -> str:
    """A service state as `oak service inspect` prints it: its spec, its IPs and health check, and its instances."""
    head = (f"{data['job_name']}  ({data['service_id']})  {data['status']}\n"
            f"{data['virtualization']} {data['code'] or ' '.join(data['cmd'])}  "
            f"vcpus={data['vcpus']} memory={data['memory']}MB replicas={data['replicas']} "
            f"revision={data.get('revision', 1)}\n"
            f"service IPs: round-robin {data.get('rr_ip') or '-'}, closest {data.get('closest_ip') or '-'}\n"
            + health_check_text(data.get("health")))
    columns = INSTANCE_COLUMNS
    if any(i.get("health") for i in data["instances"]):
        columns = [*columns[:2], ("HEALTH", "health"), *columns[2:]]
    if len({i.get("revision") for i in data["instances"]}) > 1:
        columns = [*columns[:1], ("REV", "revision"), *columns[1:]]
    return head + rollout_text(data.get("rollout")) + (table(data["instances"], columns) if data["instances"]
                                                       else "no instances")


def rollout_text(rollout: dict[str, Any] | None) -> str:
    """The latest rollout in one line ("" when there was none)."""
    if not rollout:
        return ""
    why = f": {rollout['reason']}" if rollout["reason"] else ""
    return f"rollout of revision {rollout['revision']}: {rollout['state']}, {rollout['updated']} updated{why}\n"


def event_line(event: dict[str, Any]) -> str:
    """One event as a line: time, kind, what, and why."""
    at = time.strftime("%H:%M:%S", time.localtime(float(event.get("at", 0))))
    why = f"  ({event['reason']})" if event.get("reason") else ""
    return f"{at}  {str(event.get('kind', '')):<9} {event.get('what', '')}{why}"


def event_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of an ``events`` document (live batch or retained ring), skipping whatever is not one."""
    events = doc.get("events")
    return [e for e in events if isinstance(e, dict)] if isinstance(events, list) else []
