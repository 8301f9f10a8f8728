"""Vivaldi network coordinates (Dabek et al., SIGCOMM 2004): each worker keeps a point in a small
Euclidean space whose distances predict round-trip times, learnt from RTT samples to a few peers.

A worker measuring ``rtt`` ms to a peer that reports its own coordinate calls :func:`update`; the
distance between two coordinates (:func:`distance`) then estimates the RTT between any two workers
that never measured each other directly.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

DIMENSIONS = 3
CE = 0.25  # how fast the error estimate adapts
CC = 0.25  # how fast the coordinate moves
MIN_ERROR = 0.01


@dataclass(frozen=True)
class Coordinate:
    """A position (ms units) and how wrong it is believed to be (relative error, 1.0 = unknown)."""

    vec: tuple[float, ...] = (0.0,) * DIMENSIONS
    error: float = 1.0

    def to_list(self) -> list[float]:
        """JSON form: the position followed by the error."""
        return [*self.vec, self.error]

    @classmethod
    def from_list(cls, data: list[float]) -> Coordinate:
        """Inverse of :meth:`to_list`; raises ValueError on a malformed list."""
        if not isinstance(data, list) or len(data) != DIMENSIONS + 1:
            raise ValueError("a coordinate is a list of 4 numbers")
        values = [float(x) for x in data]
        return cls(tuple(values[:DIMENSIONS]), max(MIN_ERROR, values[DIMENSIONS]))


def distance(a: Coordinate, b: Coordinate) -> float:
    """Predicted RTT in ms between two coordinates."""
    return math.dist(a.vec, b.vec)


def update(local: Coordinate, remote: Coordinate, rtt: float, rng: random.Random | None = None) -> Coordinate:
    """Move *local* after measuring *rtt* ms to a node at *remote*."""
    if rtt <= 0:
        return local
    weight = local.error / (local.error + remote.error)
    predicted = distance(local, remote)
    sample_error = abs(predicted - rtt) / rtt
    error = max(MIN_ERROR, sample_error * CE * weight + local.error * (1 - CE * weight))
    force = CC * weight * (rtt - predicted)
    direction = [x - y for x, y in zip(local.vec, remote.vec, strict=True)]
    length = math.hypot(*direction)
    if length < 1e-9:  # same place: push apart in a random direction
        rng = rng or random.Random()
        direction = [rng.uniform(-1, 1) for _ in local.vec]
        length = math.hypot(*direction) or 1.0
    vec = tuple(x + force * d / length for x, d in zip(local.vec, direction, strict=True))
    return Coordinate(vec, error)
