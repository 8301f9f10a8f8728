"""The *user lane* of bench.scale, as a process of its own: one user asking ``services/list`` every
50 ms, timing each answer.

It runs apart from the benchmark's process, which follows ten thousand instances through their states:
a user's own client does not share its event loop with that work, and the lane, measured there, timed
the benchmark as much as the root.

Run by bench.scale: ``python -m bench.lane ROOT USER PASSWORD [CA]``; it asks until its stdin closes,
then prints ``{"answered": [seconds, ...], "busy": n}`` on stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

from services.cli.client import CliError, OakClient, Profile
from services.common.mqtt import BrokerUrl

INTERVAL = 0.05  # seconds between an answer and the next request


async def ask(profile: Profile, answered: list[float], busy: list[int], stop: asyncio.Event) -> None:
    """Ask ``services/list`` every INTERVAL until *stop*; note each answer's time, count busy answers."""
    async with OakClient(profile) as client:
        print("ready", file=sys.stderr, flush=True)
        while not stop.is_set():
            began = time.perf_counter()
            try:
                await client.request("services", "list")
            except CliError as exc:
                if "busy" in str(exc):
                    busy.append(1)
            else:
                answered.append(time.perf_counter() - began)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), INTERVAL)


async def lane(profile: Profile) -> dict[str, object]:
    """Ask until stdin closes; what was measured."""
    answered: list[float] = []
    busy: list[int] = []
    stop = asyncio.Event()
    asking = asyncio.create_task(ask(profile, answered, busy, stop))
    await asyncio.to_thread(sys.stdin.read)  # returns at EOF: the benchmark is done with the lane
    stop.set()
    await asking
    return {"answered": answered, "busy": len(busy)}


def main() -> None:
    root, user, password, *ca = sys.argv[1:]
    profile = Profile(user, password, BrokerUrl.parse(root), Path(ca[0]) if ca else None)
    print(json.dumps(asyncio.run(lane(profile))), flush=True)


if __name__ == "__main__":
    main()
