"""Which children have gone: the cluster's view of its workers, the root's of its clusters.

A child is *heard* whenever a live message of its arrives (its reports come every few seconds, so they
are its heartbeat). It is *gone* when its connection closed (its last will, :meth:`Liveness.closed`) or
when nothing came from it for its ``silent_after`` seconds (:meth:`Liveness.check`): a frozen process or
a link that dropped without a reset says nothing, and MQTT's keepalive would take 15-20 s to notice.

Four guards keep a busy parent from calling a healthy child silent:

* silence is measured up to the *horizon*: when the oldest message still waiting to be read arrived
  (everything a child sent before that has been read), not up to now;
* with many children (RELATIVE_FROM), silence is measured up to a second after the freshest message of
  any of them: a parent whose input has stalled somewhere it cannot see (its broker's queues, its
  sockets) hears nobody and calls nobody silent, while one child that stops among the others that
  report stands out (Kubernetes likewise stops evicting when a whole zone goes quiet at once);
* a check that runs much later than the one before (this process stalled) decides nothing: the
  messages that arrived meanwhile have not been read yet;
* silence is counted only up to as long ago as messages now take to arrive (:meth:`Liveness.delay`: how
  much later than its fastest each child's messages arrive, by the time they say they were sent): an
  overloaded parent whose broker hands it reports tens of seconds late does not take the late ones for
  silent children (on a 2-core machine with 1,000 simulated workers, it did, and the moves it made
  overloaded it further).

Plain logic on the caller's clock (monotonic seconds), tested by calling it (tests/test_liveness.py).
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field

STALL = 1.0  # a check this much later than the previous one decides nothing
RELATIVE_FROM = 10  # children from which silence is measured against the freshest of them
LAG_WINDOW = 3.0  # seconds of recent deliveries the transport delay is judged on (short: it may grow fast)
LAG_QUANTILE = 0.9
MASS_SHARE, MASS_MIN = 0.25, 10  # more children than both gone silent within one silence: a pause of the parent's

# How long a child may go unheard before it is gone. The parent calls it gone after this silence, and the
# child, measuring the same silence from its side, counts itself cut off after it too: so a service with
# stop_after < lost_after is stopped by the cut-off child before its parent replaces it.
MISSED_REPORTS, SILENCE_SLACK = 2, 1.0  # a worker: two of its report intervals and a second
DEFAULT_REPORT_EVERY = 2.0
CLUSTER_BEAT_EVERY = 1.0  # a cluster's heartbeat to the root, and the root's to each cluster
CLUSTER_SILENT_AFTER = 4.0


def epoch(moment: float) -> float:
    """The wall-clock time (epoch seconds) of the monotonic *moment*: what a message's arrival or a child's
    last word is shown and compared as."""
    return time.time() - (time.monotonic() - moment)


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
    _fastest: dict[str, float] = field(default_factory=dict)  # name -> the smallest lag its messages had
    _lags: deque[tuple[float, float]] = field(default_factory=deque)  # (arrival, lag beyond the fastest)
    _delay: tuple[float, float] = (float("-inf"), 0.0)  # (when computed, the delay), at most once a second
    _freshest: float = float("-inf")  # the latest arrival from any child
    # (when silent, name) for every child, the earliest first; an entry is stale once the child was heard
    # again (its deadline moved), so a check looks at the children due, not at all of them.
    _due: list[tuple[float, str]] = field(default_factory=list)
    _silenced: deque[tuple[float, str]] = field(default_factory=deque)  # (when, name) found silent lately
    held: int = 0  # children the last check found silent and held back (too many at once)

    def _watch(self, name: str, silent_after: float) -> None:
        self.limits[name] = silent_after
        heapq.heappush(self._due, (self.heard[name] + silent_after, name))
        if len(self._due) > 4 * len(self.heard) + 64:  # drop the stale entries now and then
            self._due = [(at + self.limits[n], n) for n, at in self.heard.items() if n not in self.gone]
            heapq.heapify(self._due)

    def hear(self, name: str, at: float, silent_after: float, lag: float | None = None) -> bool:
        """*name* said something that arrived at *at*, *lag* seconds after it says it sent it (on its own
        clock: only the lag beyond its fastest counts); True when it was gone until now (it is back)."""
        self.heard[name] = max(at, self.heard.get(name, at))
        self._freshest = max(self._freshest, at)
        self._watch(name, silent_after)
        if lag is not None:
            fastest = self._fastest[name] = min(self._fastest.get(name, lag), lag)
            self._lags.append((at, lag - fastest))
        return self.gone.pop(name, None) is not None

    def delay(self, now: float) -> float:
        """How late messages arrive now: the LAG_QUANTILE of the recent ones' lags beyond their sender's fastest
        (worked out at most every half second); when none arrived lately, what it was (no news is no proof
        that the delay is gone)."""
        if now - self._delay[0] < 0.5:
            return self._delay[1]
        while self._lags and self._lags[0][0] < now - LAG_WINDOW:
            self._lags.popleft()
        ordered = sorted(lag for _, lag in self._lags)
        self._delay = (now, ordered[int(LAG_QUANTILE * (len(ordered) - 1))] if ordered else self._delay[1])
        return self._delay[1]

    def expect(self, name: str, until: float, silent_after: float) -> None:
        """Give *name* until *until* to be heard, or it is gone then (a parent that just restarted, or restarts
        its broker on purpose, waits that long for its children to reconnect)."""
        self.heard[name] = max(self.heard.get(name, until - silent_after), until - silent_after)
        self._watch(name, silent_after)

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
        upto = self.upto(now, horizon)
        out = []
        while self._due and self._due[0][0] < upto:
            due, name = heapq.heappop(self._due)
            if name in self.gone or name not in self.heard or self.heard[name] + self.limits[name] != due:
                continue  # stale: heard again since, gone already, or forgotten
            out.append(name)
        if self._mass(out, now):
            self.held = len(out)
            for name in out:  # looked at again on the next check
                heapq.heappush(self._due, (self.heard[name] + self.limits[name], name))
            return []
        self.held = 0
        for name in out:
            self.gone[name] = self.heard[name] + self.limits[name]
            self._silenced.append((now, name))
        return out

    def _mass(self, found: list[str], now: float) -> bool:
        """Whether *found*, with the children found silent within the last silence, are too many at once: more
        than MASS_SHARE of those heard and more than MASS_MIN. Then the parent itself stalled somewhere it
        cannot see (an overloaded broker hands it reports late), or lost its own network, where moving the
        instances inside the cluster would not help: it waits (Kubernetes likewise stops evicting when a
        whole zone goes quiet)."""
        if not found:
            return False
        window = max(self.limits.get(name, 0.0) for name in found)
        while self._silenced and self._silenced[0][0] < now - window:
            self._silenced.popleft()
        together = len(found) + len(self._silenced)
        return together > MASS_MIN and together > MASS_SHARE * (len(self.heard) - len(self.gone))

    def upto(self, now: float, horizon: float | None = None) -> float:
        """The moment up to which this parent has heard what its children sent: *now*, or the *horizon*, or,
        with RELATIVE_FROM children or more, a second after the freshest message of any of them; less the
        time messages now take to arrive."""
        upto = now if horizon is None else min(now, horizon)
        if len(self.heard) - len(self.gone) >= RELATIVE_FROM:
            upto = min(upto, self._freshest + self.stall)
        return upto - self.delay(now)

    def since(self, name: str) -> float | None:
        """When *name* was found gone (None while it is not)."""
        return self.gone.get(name)

    def forget(self, name: str) -> None:
        """*name* left for good."""
        self.heard.pop(name, None)
        self.gone.pop(name, None)
        self.limits.pop(name, None)
