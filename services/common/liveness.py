"""Which children have gone: the cluster's view of its workers, the root's of its clusters.

A child is *heard* whenever a live message of its arrives (its reports come every few seconds, so they
are its heartbeat). It is *gone* when its connection closed (its last will, :meth:`Liveness.closed`) or
when nothing came from it for its ``silent_after`` seconds (:meth:`Liveness.check`): a frozen process or
a link that dropped without a reset says nothing, and MQTT's keepalive would take 15-20 s to notice.

Two guards keep a busy parent from calling a healthy child silent:

* silence is measured up to the *horizon*: when the oldest message still waiting to be read arrived
  (everything a child sent before that has been read), not up to now;
* a check that runs much later than the one before (this process stalled) decides nothing: the
  messages that arrived meanwhile have not been read yet.

Plain logic on the caller's clock (monotonic seconds), tested by calling it (tests/test_liveness.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

STALL = 1.0  # a check this much later than the previous one decides nothing

# How long a child may go unheard before it is gone. The parent calls it gone after this silence, and the
# child, measuring the same silence from its side, counts itself cut off after it too: so a service with
# stop_after < lost_after is stopped by the cut-off child before its parent replaces it.
MISSED_REPORTS, SILENCE_SLACK = 2, 1.0  # a worker: two of its report intervals and a second
DEFAULT_REPORT_EVERY = 2.0
CLUSTER_BEAT_EVERY = 1.0  # a cluster's heartbeat to the root, and the root's to each cluster
CLUSTER_SILENT_AFTER = 4.0


def worker_silent_after(report_every: float) -> float:
    """How long a worker that reports every *report_every* seconds (0: the default) may send nothing."""
    return MISSED_REPORTS * (report_every if report_every > 0 else DEFAULT_REPORT_EVERY) + SILENCE_SLACK


@dataclass
class Liveness:
    """When each child was last heard, and which are gone since when."""

    stall: float = STALL
    heard: dict[str, float] = field(default_factory=dict)
    gone: dict[str, float] = field(default_factory=dict)  # name -> when it was found gone
    limits: dict[str, float] = field(default_factory=dict)  # name -> its silent_after
    _checked: float | None = None

    def hear(self, name: str, at: float, silent_after: float) -> bool:
        """*name* said something at *at*; True when it was gone until now (it is back)."""
        self.heard[name] = max(at, self.heard.get(name, at))
        self.limits[name] = silent_after
        return self.gone.pop(name, None) is not None

    def expect(self, name: str, until: float, silent_after: float) -> None:
        """Give *name* until *until* to be heard, or it is gone then (a parent that just restarted, or restarts
        its broker on purpose, waits that long for its children to reconnect)."""
        self.heard[name] = max(self.heard.get(name, until - silent_after), until - silent_after)
        self.limits[name] = silent_after

    def closed(self, name: str, at: float) -> bool:
        """*name*'s connection closed at *at* (its last will); True when that makes it gone."""
        if name in self.gone:
            return False
        self.heard.setdefault(name, at)
        self.gone[name] = at
        return True

    def check(self, now: float, horizon: float | None = None) -> list[str]:
        """The children found gone by this check: silent from their last message up to the *horizon*
        (default *now*) for longer than they may be. Nothing when this check comes late (a stall)."""
        late = self._checked is not None and now - self._checked > self.stall
        self._checked = now
        if late:
            return []
        upto = now if horizon is None else min(now, horizon)
        out = [name for name, at in self.heard.items()
               if name not in self.gone and upto - at > self.limits.get(name, 0.0)]
        for name in out:
            self.gone[name] = self.heard[name] + self.limits[name]
        return out

    def since(self, name: str) -> float | None:
        """When *name* was found gone (None while it is not)."""
        return self.gone.get(name)

    def forget(self, name: str) -> None:
        """*name* left for good."""
        self.heard.pop(name, None)
        self.gone.pop(name, None)
        self.limits.pop(name, None)
