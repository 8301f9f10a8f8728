"""Pacing batched work (reports, placement passes): at once on an idle tier, batched on a busy one.

:class:`ReportThrottle` says how long to wait before the next run; :class:`Trigger` runs a piece of work
soon after it is asked for, once for all the asks made before it starts, paced by a throttle. The root's
reconcile pass, the cluster's placement pass and the state reports all go through these.
:class:`TimeSlices` keeps one long pass from holding the event loop the tier shares with its broker and
its users' requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)
SLICE = 0.001  # seconds a long pass runs before it lets the rest of the event loop have a turn
IDLE_BURST = 0.1  # seconds of cost spacing an idle tier's reports may run ahead (ReportThrottle.burst)
# A tier is busy (batches) while the oldest message waiting for it has waited longer than this: a standing
# queue, as CoDel judges one by its sojourn time. Counting the messages instead made one heartbeat that
# arrived beside a report hold a quiet cluster's next report for its busy spacing (200 ms).
BUSY_WAIT = 0.01


def behind(waited: float) -> bool:
    """Whether a tier whose oldest waiting message has waited *waited* seconds is behind (see BUSY_WAIT)."""
    return waited > BUSY_WAIT


@dataclass
class ReportThrottle:
    """Spaces runs by their own cost, and while the tier is busy (a queue stands in its inbox) by a
    minimum too: the work uses at most ~1/``factor`` of the loop over time, and while busy, the next run
    starts at least *minimum* (and ``factor`` × the last one's cost) after the last one started and never
    sooner than *coalesce* after it was asked for.

    This is what makes the batching adaptive: an idle tier runs the next one at once (a deploy on a quiet
    system is not held up), a busy one batches what arrives meanwhile into one run per *minimum*.

    While idle, the cost is paid like a leaky bucket (GCRA): every run owes ``factor`` × its cost of
    time, and a run may start up to *burst* seconds before what is owed is paid. So the few runs one
    change sets off in a row (a deploy: placed, CREATING, RUNNING) all go at once, and a long stream of
    them is still spaced by their cost.
    """

    minimum: float
    factor: float = 10.0
    coalesce: float = 0.005
    burst: float = 0.0  # seconds an idle tier may run ahead of what its runs' cost allows
    _started: float = float("-inf")
    _cost: float = 0.0
    _paid_at: float = float("-inf")  # when the runs so far have paid for their cost (factor × cost each)

    @property
    def gap(self) -> float:
        """The least time between the starts of two runs while the tier is busy."""
        return max(self.minimum, self.factor * self._cost)

    def delay(self, now: float, busy: bool = True) -> float:
        """How long to wait, at *now*, before the next run (*busy*: the tier is behind, see :func:`behind`; an idle one
        neither coalesces nor keeps the minimum spacing)."""
        if not busy:
            return max(0.0, self._paid_at - self.burst - now)
        return max(self.coalesce, self._started + self.gap - now)

    def ran(self, started: float, ended: float) -> None:
        """Record a run from *started* to *ended*."""
        self._started, self._cost = started, ended - started
        self._paid_at = max(self._paid_at, started) + self.factor * self._cost


class Trigger:
    """Runs *action* soon after :meth:`pull`: once for every pull made before the run starts, once more
    for pulls made during it; never two runs at a time; paced by *pacing* (:class:`ReportThrottle`),
    whose minimum spacing applies while *busy*() says the tier is behind."""

    def __init__(self, action: Callable[[], Awaitable[object]], pacing: ReportThrottle, what: str,
                 busy: Callable[[], bool] = lambda: True) -> None:
        self.action = action
        self.pacing = pacing
        self.what = what
        self.busy = busy
        self.task: asyncio.Task[None] | None = None
        self._wanted = False

    def pull(self) -> None:
        """Have the action run soon, without waiting for it."""
        self._wanted = True
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def settled(self) -> None:
        """Wait until no pulled run is pending or running."""
        while self.task is not None and not self.task.done():
            await asyncio.shield(self.task)

    def cancel(self) -> None:
        """Stop a pending or running run (shutdown)."""
        if self.task is not None:
            self.task.cancel()

    async def _run(self) -> None:
        while self._wanted:
            await asyncio.sleep(self.pacing.delay(time.monotonic(), self.busy()))
            self._wanted = False
            started = time.monotonic()
            try:
                await self.action()
            except Exception:
                log.exception("%s failed", self.what)
            self.pacing.ran(started, time.monotonic())


class TimeSlices:
    """Cuts a long pass into slices of about *budget* seconds: :meth:`turn`, called between two steps,
    lets every other ready task of the event loop run once the slice is used up.

    Counting steps instead does not bound the wait of a request that arrives meanwhile: a step's cost
    varies a hundredfold between an idle fleet and a burst, and a request needs several turns of the
    loop (broker in, handler, broker out) before its answer leaves."""

    def __init__(self, budget: float = SLICE) -> None:
        self.budget = budget
        self._since = time.perf_counter()

    async def turn(self) -> None:
        """Yield to the event loop if this slice is used up."""
        if time.perf_counter() - self._since >= self.budget:
            await asyncio.sleep(0)
            self._since = time.perf_counter()
