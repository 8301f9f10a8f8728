"""Vivaldi coordinates learn a latency matrix from samples."""

from __future__ import annotations

import random

from services.common.vivaldi import Coordinate, distance, update

# Four sites: two close pairs 10 ms apart inside, 80 ms between the pairs.
RTT = {("a", "b"): 10.0, ("c", "d"): 10.0, ("a", "c"): 80.0, ("a", "d"): 80.0, ("b", "c"): 80.0,
       ("b", "d"): 80.0}


def rtt(x: str, y: str) -> float:
    return RTT.get((x, y)) or RTT[(y, x)]


def test_coordinates_converge_to_the_matrix() -> None:
    """After random pairwise samples, predicted distances are within 20 % of the true RTTs."""
    rng = random.Random(4)
    coords = {name: Coordinate() for name in "abcd"}
    for _ in range(2000):
        x, y = rng.sample(sorted(coords), 2)
        coords[x] = update(coords[x], coords[y], rtt(x, y) * rng.uniform(0.95, 1.05), rng)
    for (x, y), true in RTT.items():
        assert abs(distance(coords[x], coords[y]) - true) / true < 0.2, (x, y)
    assert all(c.error < 0.3 for c in coords.values())


def test_round_trip_and_validation() -> None:
    """The JSON form reads back; a malformed one is refused."""
    c = Coordinate((1.0, 2.0, 3.0), 0.5)
    assert Coordinate.from_list(c.to_list()) == c
    try:
        Coordinate.from_list([1, 2])
    except ValueError:
        pass
    else:
        raise AssertionError("a short list was accepted")
