"""Fences this worker's instances while it is cut off from its cluster (services/common/fencing.py).

"Cut off" is measured on the link: seconds since the cluster's broker last sent this worker anything. Its
state reports are acknowledged every couple of seconds, so the measure is that fine; the worker counts
itself cut off after the silence its cluster waits before calling it gone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from services.common.fencing import FENCE_TICK, Fencing
from services.common.liveness import worker_silent_after
from services.worker.engine import Engine


async def fence(engine: Engine, quiet_for: Callable[[], float], report_every: float) -> None:
    """Keep the engine's fenced instances in step with how long the link has been quiet (the worker reports
    every *report_every* seconds), until cancelled."""
    fencing = Fencing(worker_silent_after(report_every))
    while True:
        quiet = quiet_for()
        await engine.fence(fencing.wanted(lambda: engine.desired or {}, engine.fenced, quiet, time.monotonic()))
        # While the link is fine nothing can be due before it has been quiet for cut_after: a thousand
        # simulated workers in one process look a few times a minute, not four times a second.
        pause = FENCE_TICK if engine.fenced else max(FENCE_TICK, fencing.cut_after - quiet - FENCE_TICK)
        fencing.pace(pause - FENCE_TICK)
        await asyncio.sleep(pause)
