"""Fencing: a tier cut off from its parent stops, by itself, the instances whose service asks for it (the
SLA's ``disconnect.stop_after``), so a replacement started elsewhere never runs beside them for longer than
the operator allowed. A worker fences what it runs; a cluster cut off from the root takes those instances
out of its workers' maps. Once the link has been back for REJOIN_WAIT (long enough for the parent's
current map to arrive), the ones still wanted start again.

A tier counts itself cut off after the silence its parent waits before calling it gone (*cut_after*,
services/common/liveness.py), and stops an instance ``stop_after`` seconds later: the same clock as the
parent's ``lost_after``, so ``stop_after < lost_after`` stops the original before the replacement starts.

Plain logic on the caller's clock: :class:`Fencing` says what should be fenced now; the tier applies it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from services.common.liveness import STALL
from services.common.models import InstanceSpec

FENCE_TICK = 0.25  # seconds between two looks at the link
REJOIN_WAIT = 1.0  # seconds the link must be back before fenced instances start again


def to_fence(desired: Mapping[str, InstanceSpec], cut_off: float) -> frozenset[str]:
    """The desired instances to stop *cut_off* seconds after the tier counted itself cut off."""
    return frozenset(iid for iid, spec in desired.items()
                     if (after := spec.service.on_disconnect.stop_after) is not None and cut_off >= after)


class Fencing:
    """What should be fenced, from how long the link has been quiet; fenced instances stay fenced until the
    link has been back for REJOIN_WAIT. A look that comes late (this process was stalled, or frozen and
    thawed: what its parent sent meanwhile is not read yet) changes nothing."""

    def __init__(self, cut_after: float, stall: float = STALL) -> None:
        self.cut_after = cut_after  # seconds of silence after which this tier counts itself cut off
        self.stall = stall
        self._back_since: float | None = None
        self._expected: float | None = None  # when the next look should come (the last one's time, or later)

    def wanted(self, placed: Callable[[], Mapping[str, InstanceSpec]], fenced: frozenset[str], quiet: float,
               now: float) -> frozenset[str]:
        """The instances to keep stopped among those *placed* here (asked for only when some may be), given
        those *fenced* now and *quiet* seconds of silence."""
        late = self._expected is not None and now - self._expected > self.stall
        self._expected = now
        if late or (quiet < self.cut_after and not fenced):
            return fenced
        desired = placed()
        fence = to_fence(desired, quiet - self.cut_after) if quiet >= self.cut_after else frozenset()
        still = (fenced - fence) & desired.keys()
        if not still:
            self._back_since = None
            return fence
        if self._back_since is None:
            self._back_since = now
        if now - self._back_since < REJOIN_WAIT:
            return fence | still
        self._back_since = None
        return fence

    def pace(self, seconds: float) -> None:
        """The next look comes *seconds* after this one on purpose (not a stall)."""
        if self._expected is not None:
            self._expected += seconds
