"""The garbage collector's full passes kept out of a busy tier's way.

CPython's cycle collector walks every object it tracks in a full collection, holding the interpreter lock
meanwhile: every thread of the process waits, the embedded broker's and the users' lane's with the rest.
A heap that grows, as a burst of deploys grows a root's or a cluster's, sets off a full collection each
time it has grown by a quarter, each one walking all of it (BENCHMARKS.md, issue 15).

So what the tier made is frozen (``gc.freeze``, which costs nothing: the collector no longer walks those
objects) every *every* seconds, and the automatic collections only ever walk what is younger. Objects
that become garbage are still freed as their last reference goes; only garbage held in cycles waits, for
the full collection :class:`Heap` runs (everything unfrozen, collected, frozen again) once the process
has been quiet (under :data:`QUIET_SHARE` of a CPU) for :data:`QUIET` seconds, or at the latest every
:data:`LONGEST` seconds.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger(__name__)

FREEZE_EVERY = 1.0  # seconds between two freezes of what the tier made meanwhile
QUIET = 10.0  # seconds under QUIET_SHARE of a CPU before the cycles are collected
QUIET_SHARE = 0.1
LONGEST = 600.0  # seconds at most between two collections of the cycles, quiet or not


class Heap:
    """Freezes what the process made, and collects its garbage cycles while it is quiet. One serves a
    process: where several tiers share one (``oak up``), the first started does it for all."""

    _running = False

    def __init__(self, quiet: float = QUIET, longest: float = LONGEST, every: float = FREEZE_EVERY) -> None:
        self.quiet = quiet
        self.longest = longest
        self.every = every
        self.collections = 0

    def collect(self) -> None:
        """One full collection of everything (frozen or not), then freeze what is left."""
        began = time.perf_counter()
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.collections += 1
        log.debug("collected the garbage cycles in %.0f ms", (time.perf_counter() - began) * 1000)

    async def run(self) -> None:
        """Freeze every *every* seconds; collect once quiet (or overdue), until cancelled."""
        if Heap._running:
            return
        Heap._running = True
        try:
            await self._run()
        finally:
            Heap._running = False

    async def _run(self) -> None:
        collected = busy_at = time.monotonic()
        cpu, at = time.process_time(), collected
        while True:
            await asyncio.sleep(self.every)
            gc.freeze()
            now, used = time.monotonic(), time.process_time()
            if used - cpu > QUIET_SHARE * (now - at):
                busy_at = now
            cpu, at = used, now
            quiet_after_work = busy_at > collected and now - busy_at >= self.quiet
            if quiet_after_work or now - collected >= self.longest:
                self.collect()
                collected = time.monotonic()
                cpu, at = time.process_time(), collected
