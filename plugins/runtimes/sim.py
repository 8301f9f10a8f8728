"""``sim``: a simulated runtime for testbeds (``oak sim``): instances are only timers.

It serves the ``process`` and ``container`` virtualizations so simulated workers take the same
services as real ones; everything around it (MQTT, reports, desired maps, statuses, restarts) is
the real worker. An instance runs until stopped, unless its ``cmd`` is ``["exit", CODE, SECONDS]``:
then it ends with CODE after SECONDS. Never use it for real workloads: nothing is executed.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from services.common.plugin_api import Exit, Handle, InstanceStats, LaunchSpec, hookimpl

NAME = "sim"
_pids = itertools.count(10_000_000)


class SimRuntime:
    """Pretends to run instances."""

    name = NAME
    virtualizations = ("process", "container")

    def __init__(self) -> None:
        self._stops: dict[str, asyncio.Event] = {}
        self._plans: dict[str, tuple[int, float]] = {}

    async def start(self, spec: LaunchSpec) -> Handle:
        """Start a timer."""
        self._stops[spec.iid] = asyncio.Event()
        if len(spec.cmd) == 3 and spec.cmd[0] == "exit":
            self._plans[spec.iid] = (int(spec.cmd[1]), float(spec.cmd[2]))
        return Handle(spec.iid, NAME, next(_pids), time.time())

    async def wait(self, handle: Handle) -> Exit:
        """Until stopped, or until the planned exit."""
        stop = self._stops.setdefault(handle.iid, asyncio.Event())
        code, after = self._plans.get(handle.iid, (0, float("inf")))
        try:
            await asyncio.wait_for(stop.wait(), None if after == float("inf") else after)
            return Exit(None, "stopped")
        except TimeoutError:
            return Exit(code, f"exited with code {code}")

    async def stop(self, handle: Handle, grace: float) -> None:
        """Stop the timer."""
        self._stops.setdefault(handle.iid, asyncio.Event()).set()

    async def adopt(self, handle: Handle) -> bool:
        """Simulated instances do not survive their worker."""
        return False

    async def stats(self, handle: Handle) -> InstanceStats | None:
        """A token load."""
        return InstanceStats(1.0, 8.0)


@hookimpl
def oak_make_runtime(name: str, config: dict[str, Any]) -> SimRuntime | None:
    """Build the simulated runtime when asked for it by name."""
    return SimRuntime() if name == NAME else None
