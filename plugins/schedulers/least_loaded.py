"""``least-loaded``: spread instances; prefer the candidate with the most capacity left after placement.

Score: the mean of the free CPU and free memory fractions that would remain (0..100), lowered by a
fiftieth of the candidate's measured CPU load (at most 2 points: measurements are noisy, declared
demands are not). Filters nothing.
"""

from __future__ import annotations

from typing import Any

from services.common.plugin_api import Candidate, Demand, hookimpl

NAME = "least-loaded"


def left_fraction(demand: Demand, candidate: Candidate) -> float:
    """Mean fraction of CPU and memory that would remain free on *candidate* after placing *demand*."""
    cpu = (candidate.cpu_free - demand.vcpus) / candidate.cpu_total if candidate.cpu_total else 0.0
    total_mem = candidate.memory_total_mb
    mem = (candidate.memory_free_mb - demand.memory_mb) / total_mem if total_mem else 0.0
    return (cpu + mem) / 2


class LeastLoaded:
    """Spread instances over the least loaded candidates."""

    name = NAME

    def score(self, demand: Demand, candidate: Candidate) -> float:
        """Free fraction after placement (0..100), minus a fiftieth of the measured CPU load."""
        return 100.0 * left_fraction(demand, candidate) - candidate.cpu_percent / 50


@hookimpl
def oak_make_scheduler(name: str, args: dict[str, Any]) -> LeastLoaded | None:
    """Build the plugin when asked for by its name."""
    return LeastLoaded() if name == NAME else None
