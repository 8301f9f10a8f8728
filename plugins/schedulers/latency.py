"""``latency``: honour ``latency`` constraints: run where the round trip to a given worker is short.

An SLA asks with ``{"type": "latency", "target": "w3", "threshold": 20}`` (ms). Workers measure RTTs
to their peers and keep Vivaldi coordinates; the estimated RTT between a candidate and the target is
the distance between their coordinates. Candidates over the threshold are rejected, nearer ones score
higher. An unknown target, or a candidate that has not measured yet, cannot satisfy the constraint.
"""

from __future__ import annotations

import math
from typing import Any

from services.common.plugin_api import Candidate, Demand, hookimpl

NAME = "latency"


def estimate(candidate: Candidate, target: tuple[float, ...]) -> float | None:
    """Estimated RTT (ms) from the candidate to a target coordinate, or None when unknown."""
    if not candidate.coord or not target or len(candidate.coord) != len(target):
        return None
    return math.dist(candidate.coord[:-1], target[:-1])  # the last element is the coordinate's error


class Latency:
    """Filter and score by estimated round-trip time to the SLA's target workers."""

    name = NAME
    evaluates = ("latency",)  # the SLA constraint types it honours

    def filter(self, demand: Demand, candidate: Candidate) -> str | None:
        """Reject candidates whose estimated RTT to a target is over its threshold (or unknown)."""
        for target, limit in demand.latency:
            if candidate.id == target:
                continue
            coord = demand.targets.get(target)
            if coord is None:
                return f"latency target {target} unknown"
            rtt = estimate(candidate, coord)
            if rtt is None:
                return "no latency measurements yet"
            if rtt > limit:
                return f"~{rtt:.1f} ms to {target} > {limit:g} ms"
        return None

    def score(self, demand: Demand, candidate: Candidate) -> float:
        """100 next to the target, falling linearly to 0 at the threshold."""
        scores = []
        for target, limit in demand.latency:
            rtt = 0.0 if candidate.id == target else estimate(candidate, demand.targets.get(target, ()))
            scores.append(0.0 if rtt is None else 100.0 * (1 - rtt / limit))
        return min(scores, default=0.0)


@hookimpl
def oak_make_scheduler(name: str, args: dict[str, Any]) -> Latency | None:
    """Build the plugin when asked for by its name."""
    return Latency() if name == NAME else None
