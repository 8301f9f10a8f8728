"""``bin-pack``: fill candidates up before using new ones, leaving whole workers free for big jobs.

Score: the mean fraction of CPU and memory that would be *used* after placement. Filters nothing.
"""

from __future__ import annotations

from typing import Any

from plugins.schedulers.least_loaded import left_fraction
from services.common.plugin_api import Candidate, Demand, hookimpl

NAME = "bin-pack"


class BinPack:
    """Prefer the fullest candidate that still fits."""

    name = NAME

    def score(self, demand: Demand, candidate: Candidate) -> float:
        """Used fraction after placement, 0..100."""
        return 100.0 * (1.0 - left_fraction(demand, candidate))


@hookimpl
def oak_make_scheduler(name: str, args: dict[str, Any]) -> BinPack | None:
    """Build the plugin when asked for by its name."""
    return BinPack() if name == NAME else None
