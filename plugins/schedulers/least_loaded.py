"""``least-loaded``: prefer the candidate with the most free capacity left after placing the instance.

Spreads load: the score is the mean of the free CPU and free memory fractions that would remain,
lowered by the candidate's measured CPU load.
"""

from __future__ import annotations

from services.common.hookspecs import Candidate, Demand, hookimpl

NAME = "least-loaded"


class LeastLoaded:
    """Spread instances over the least loaded candidates."""

    name = NAME

    def filter(self, demand: Demand, candidate: Candidate) -> str | None:
        """Reject nothing beyond the framework's fit check."""
        return None

    def score(self, demand: Demand, candidate: Candidate) -> float:
        """Mean free fraction of CPU and memory after placement, minus a share of the measured load."""
        cpu_left = (candidate.cpu_free - demand.vcpus) / candidate.cpu_total if candidate.cpu_total else 0.0
        mem_left = (
            (candidate.memory_free_mb - demand.memory_mb) / candidate.memory_total_mb
            if candidate.memory_total_mb
            else 0.0
        )
        return 100.0 * (cpu_left + mem_left) / 2 - candidate.cpu_percent / 10


@hookimpl
def oak_make_scheduler(name: str) -> LeastLoaded | None:
    """Build the plugin when asked for by its name."""
    return LeastLoaded() if name == NAME else None
