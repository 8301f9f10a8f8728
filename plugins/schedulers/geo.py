"""``geo``: honour ``geo`` constraints: run within a distance of a place, and prefer the closest.

An SLA asks with ``{"type": "geo", "location": "48.14,11.58", "threshold": 50}`` (km). Candidates
have a location ``"lat,long"`` (``CLUSTER_LOCATION`` for a cluster, ``oak worker --location`` for a
worker; a worker without one inherits nothing and is rejected when a geo constraint applies).
"""

from __future__ import annotations

import math
from typing import Any

from services.common.plugin_api import Candidate, Demand, hookimpl

NAME = "geo"
EARTH_RADIUS_KM = 6371.0


def parse_location(text: str) -> tuple[float, float] | None:
    """``"lat,long[,radius]"`` as (lat, long), or None when it is not a valid position."""
    parts = text.split(",")
    try:
        lat, lon = float(parts[0]), float(parts[1])
    except (ValueError, IndexError):
        return None
    return (lat, lon) if -90 <= lat <= 90 and -180 <= lon <= 180 else None


def distance_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle (haversine) distance between two (lat, long) points."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(h))


class Geo:
    """Filter by distance to the SLA's places; score closer candidates higher."""

    name = NAME
    evaluates = ("geo",)  # the SLA constraint types it honours

    def _distances(self, demand: Demand, candidate: Candidate) -> list[tuple[float, float]] | None:
        here = parse_location(candidate.location)
        if here is None:
            return None
        return [(distance_km(here, (lat, lon)), limit) for lat, lon, limit in demand.near]

    def filter(self, demand: Demand, candidate: Candidate) -> str | None:
        """Reject candidates farther than a constraint's threshold, or with no known location."""
        if not demand.near:
            return None
        distances = self._distances(demand, candidate)
        if distances is None:
            return "location unknown"
        for km, limit in distances:
            if km > limit:
                return f"{km:.0f} km away > {limit:g} km"
        return None

    def score(self, demand: Demand, candidate: Candidate) -> float:
        """100 at the place itself, falling linearly to 0 at the threshold."""
        distances = self._distances(demand, candidate) if demand.near else None
        if not distances:
            return 0.0
        return min(100.0 * (1 - km / limit) if limit else 100.0 for km, limit in distances)


@hookimpl
def oak_make_scheduler(name: str, args: dict[str, Any]) -> Geo | None:
    """Build the plugin when asked for by its name."""
    return Geo() if name == NAME else None
