"""Which workers each worker measures latency to: a small ring, so a join changes few lists."""

from __future__ import annotations

from collections.abc import Iterable

PEERS = 8


def rings(probes: Iterable[tuple[str, str]], size: int = PEERS) -> dict[str, list[dict[str, str]]]:
    """For every worker (name, probe address), the up to *size* workers after it in the ring of names."""
    ordered = sorted(probes)
    out = {}
    for index, (name, _) in enumerate(ordered):
        ring = [ordered[(index + k) % len(ordered)] for k in range(1, min(size, len(ordered) - 1) + 1)]
        out[name] = [{"name": n, "probe": p} for n, p in ring]
    return out
