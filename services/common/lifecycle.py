"""Running a service: one TaskGroup, clean shutdown on SIGINT/SIGTERM, readable logs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Shutdown(Exception):
    """Raised inside the service's TaskGroup when it is asked to stop."""


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr as ``time level component: message``."""
    level = logging.DEBUG if verbose or os.environ.get("OAK_DEBUG") else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    raise Shutdown


async def run_until_signalled(*services: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run *services* side by side until SIGINT/SIGTERM, then cancel them and let them clean up."""
    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(_wait_for_signal())
            for service in services:
                tasks.create_task(service())
    except* Shutdown:
        log.info("stopped")


def serve(main: Callable[[], Awaitable[None]]) -> int:
    """Run *main* to completion in a fresh event loop; return a process exit code."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())  # type: ignore[arg-type]
    return 0
