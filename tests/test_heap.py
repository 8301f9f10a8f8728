"""The garbage collector kept out of a busy tier's way: what it made frozen, its cycles collected when quiet."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Iterator

import pytest

from services.common.heap import Heap
from tests.stack import eventually


class Node:
    """An object in a reference cycle with itself: freed only by the cycle collector."""

    def __init__(self) -> None:
        self.me = self


def garbage_cycle() -> weakref.ref[Node]:
    """A cycle nobody references any more; a weak reference says when it is freed."""
    return weakref.ref(Node())


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    """Leave the test process's collector as found."""
    yield
    gc.unfreeze()


def test_a_frozen_cycle_waits_for_the_heaps_collection() -> None:
    cycle = garbage_cycle()
    gc.freeze()
    gc.collect()
    assert cycle() is not None, "frozen: no collection walks it"
    heap = Heap()
    heap.collect()
    assert cycle() is None
    assert gc.get_freeze_count() > 0, "what is left is frozen again"
    assert heap.collections == 1


async def test_what_the_tier_makes_is_frozen_and_its_cycles_collected_once_quiet() -> None:
    heap = Heap(quiet=0.3, longest=60, every=0.02)
    running = asyncio.create_task(heap.run())
    try:
        await asyncio.sleep(0.1)
        assert heap.collections == 0, "nothing was done yet: nothing to collect"
        before = gc.get_freeze_count()
        made = [[n] for n in range(10_000)]  # tracked objects, as a burst makes
        cycle = garbage_cycle()
        end = time.process_time() + 0.1
        while time.process_time() < end:  # busy, without a turn of the event loop
            pass
        await asyncio.sleep(0.06)
        assert gc.get_freeze_count() >= before + len(made), "what the burst made is frozen"
        assert heap.collections == 0, "busy a moment ago: no collection yet"
        assert cycle() is not None
        await eventually(lambda: heap.collections == 1, 5, 0.02, what="the collection once quiet")
        assert cycle() is None, "the cycle made during the burst is collected"
    finally:
        running.cancel()


async def test_a_process_never_quiet_still_collects_its_cycles_in_time() -> None:
    heap = Heap(quiet=3600, longest=0.2, every=0.02)
    cycle = garbage_cycle()
    running = asyncio.create_task(heap.run())
    try:
        await eventually(lambda: heap.collections >= 1, 5, 0.02, what="the collection once overdue")
        assert cycle() is None
    finally:
        running.cancel()


async def test_one_heap_serves_a_process() -> None:
    """``oak up`` runs the root and the cluster in one process: the second Heap leaves it to the first, and
    serves once the first is gone."""
    first, second = Heap(every=0.02), Heap(every=0.02)
    running = asyncio.create_task(first.run())
    await asyncio.sleep(0.05)
    await asyncio.wait_for(second.run(), 1)  # returns at once
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    again = asyncio.create_task(second.run())
    await asyncio.sleep(0.05)
    assert not again.done(), "the first ended: the second serves now"
    again.cancel()
    await asyncio.gather(again, return_exceptions=True)
