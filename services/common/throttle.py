"""Spacing reports by their own cost, so that reporting a big state never takes over the event loop."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReportThrottle:
    """Spaces reports by their own cost: the next one starts at least :attr:`gap` (``max(minimum,
    factor × cost of the last one)``) after the last one started, and never sooner than *coalesce* after
    a change, so changes in a burst share a report and reporting uses at most ~1/factor of the loop."""

    minimum: float
    factor: float = 10.0
    coalesce: float = 0.005
    _started: float = float("-inf")
    _cost: float = 0.0

    @property
    def gap(self) -> float:
        """The least time between the starts of the last report and the next."""
        return max(self.minimum, self.factor * self._cost)

    def delay(self, now: float) -> float:
        """How long to wait, at *now*, before the next report."""
        return max(self.coalesce, self._started + self.gap - now)

    def ran(self, started: float, ended: float) -> None:
        """Record a report that ran from *started* to *ended*."""
        self._started, self._cost = started, ended - started
