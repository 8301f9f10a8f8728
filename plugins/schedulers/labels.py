"""``labels``: honour ``addons`` constraints; a service that ``needs`` labels goes where all of them are.

Workers get labels with ``oak worker --label gpu --label camera``; an SLA asks for them with
``{"type": "addons", "needs": ["camera"]}``. A cluster offers the labels of the worker that would take
the instance.
"""

from __future__ import annotations

from typing import Any

from services.common.plugin_api import Candidate, Demand, hookimpl

NAME = "labels"


class Labels:
    """Filter by required labels."""

    name = NAME
    evaluates = ("addons",)  # the SLA constraint types it honours

    def filter(self, demand: Demand, candidate: Candidate) -> str | None:
        """Reject a candidate missing any needed label."""
        if not demand.needs:
            return None
        missing = sorted(set(demand.needs) - set(candidate.labels))
        return f"lacks label {','.join(missing)}" if missing else None


@hookimpl
def oak_make_scheduler(name: str, args: dict[str, Any]) -> Labels | None:
    """Build the plugin when asked for by its name."""
    return Labels() if name == NAME else None
