"""``anti-affinity``: replicas of one service on different candidates.

With ``hard = true`` (the default) a candidate already running a replica of the service is rejected
(``"already runs a replica of shop.test.web.test"``); with ``hard = false`` it only scores lower, so
replicas share candidates when there are more replicas than candidates.
"""

from __future__ import annotations

from typing import Any

from services.common.plugin_api import Candidate, Demand, hookimpl

NAME = "anti-affinity"


class AntiAffinity:
    """Keep a service's replicas apart."""

    name = NAME

    def __init__(self, hard: bool = True) -> None:
        self.hard = hard

    def filter(self, demand: Demand, candidate: Candidate) -> str | None:
        """In hard mode, reject candidates that already hold a replica."""
        if self.hard and candidate.services.get(demand.service):
            return f"already runs a replica of {demand.service.split('/', 1)[-1]}"
        return None

    def score(self, demand: Demand, candidate: Candidate) -> float:
        """100 for a candidate without replicas, less for each replica it has."""
        return 100.0 / (1 + candidate.services.get(demand.service, 0))


@hookimpl
def oak_make_scheduler(name: str, args: dict[str, Any]) -> AntiAffinity | None:
    """Build the plugin when asked for by its name; ``args``: ``hard`` (bool)."""
    if name != NAME:
        return None
    unknown = set(args) - {"hard"}
    if unknown or not isinstance(args.get("hard", True), bool):
        raise ValueError("anti-affinity takes one argument: hard = true|false")
    return AntiAffinity(args.get("hard", True))
