"""A piece of a tier on an event loop of its own, in a thread of its own.

The tier's event loop runs its work (placement, the clusters' state, every write); during a burst of ten
thousand instances it is busy for seconds on end, and whatever shares it waits that long. What must not wait
(the embedded broker routing everyone's messages, the users' read requests) runs on a loop of its own. The
threads share the interpreter, which switches between them every few milliseconds, so each gets its turn
within milliseconds however busy the other is, as long as the process gets a CPU: where other processes
keep every CPU busy, a thread descheduled while it holds the interpreter holds the others up with it.

What runs there reads the tier's objects only through values the tier replaces whole (never changes in
place), and the tier reaches it only through :meth:`LoopThread.call` and :meth:`LoopThread.run`.

A thread that waited for a socket needs the interpreter back before it goes on, and a busy thread gives it
up only every *switch interval* (5 ms by default): a broker reading a message of a megabyte in 64 KB
pieces while the tier computes waited that long for each piece, and a user's request, which crosses two
such threads several times, waited for all of them. So the first LoopThread to start makes the interval
:data:`SWITCH_INTERVAL` for the whole process. Shorter is not better: every switch hands the interpreter to a
thread that may itself wait for a CPU, and on a machine whose CPUs are all busy the tier's own work then
slowed down (BENCHMARKS.md, issue 15's users' lane).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import threading
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
SWITCH_INTERVAL = 0.001  # seconds a thread holds the interpreter while another one waits for it


class LoopThread:
    """Runs what *serving* opens, on an event loop of its own in a thread named *name*, from ``async with``
    until the block ends: ``async with LoopThread("broker", lambda: broker): ...``. *serving* is called in
    that thread, so what it makes belongs to that loop."""

    def __init__(self, name: str, serving: Callable[[], AbstractAsyncContextManager[object]]) -> None:
        self.name = name
        self.serving = serving
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ended: concurrent.futures.Future[None] = concurrent.futures.Future()

    async def __aenter__(self) -> LoopThread:
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, args=(started,), name=self.name, daemon=True)
        self._thread.start()
        await asyncio.wrap_future(started)
        return self

    def _main(self, started: concurrent.futures.Future[None]) -> None:
        try:
            asyncio.run(self._serve(started))
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            else:
                log.exception("%s stopped", self.name)
            if not self._ended.cancelled():  # nobody waits for it any more (the tier is stopping)
                self._ended.set_exception(exc)
        else:
            if not self._ended.cancelled():
                self._ended.set_result(None)

    async def _serve(self, started: concurrent.futures.Future[None]) -> None:
        self.loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with self.serving():
            started.set_result(None)
            await self._stop.wait()

    def call(self, function: Callable[..., object], *args: Any) -> None:
        """Have *function*(*args*) called on this thread's loop, soon."""
        assert self.loop is not None
        self.loop.call_soon_threadsafe(function, *args)

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run *work* on this thread's loop and wait for its result on the caller's."""
        assert self.loop is not None
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self.loop))

    async def ended(self) -> None:
        """Wait until the thread ends: it failed (raised here) or was stopped."""
        await asyncio.wrap_future(self._ended)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.loop is not None and self._stop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
