"""What the root decided and saw, as a feed its users follow: ``oak events [-f]``, or ``mosquitto_sub`` on
their topics.

An :class:`Event` is one placement (with the reasons candidates were refused), one status change of an
instance (with its reason), a worker or cluster coming or going, a rollout step, or a refused request.
Service events go to the service's owner, refused requests to who made them, workers and clusters to every
user. Events are sent in batches, at most every FLUSH_EVERY seconds, on ``oak/api/<user>/events`` (live,
``{"events": [...]}``); the last RECENT of each user stay retained on ``oak/api/<user>/state/events``, so a
follower sees the recent past at once. Batching (of at most BATCH_MAX events a message) keeps a burst of
10,000 instances to a few dozen messages.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

from services.common import channels
from services.common.mqtt import MqttSession

RECENT = 200  # events kept (retained) per user
FLUSH_EVERY = 0.5  # seconds between batches
BATCH_MAX = 500  # events per message: a burst's batch is sent as several


@dataclass(frozen=True)
class Event:
    """One thing that happened; empty fields do not apply."""

    at: float  # epoch seconds
    kind: str  # placed, unplaced, status, node, cluster, rollout, refused
    what: str  # one line, as a person reads it
    service: str = ""  # job name
    instance: str = ""
    cluster: str = ""
    node: str = ""
    reason: str = ""

    def doc(self) -> dict[str, object]:
        """The event as sent: the fields that apply."""
        return {k: v for k, v in asdict(self).items() if v not in ("", None)}


class Feed:
    """Each user's events: kept (the last RECENT), and sent in batches."""

    def __init__(self, session: MqttSession, users: Callable[[], list[str]]) -> None:
        self.session = session
        self.users = users
        self.recent: dict[str, deque[dict[str, object]]] = {}
        self._waiting: dict[str, list[dict[str, object]]] = {}

    def to(self, user: str, kind: str, what: str, **fields: str) -> None:
        """An event for *user*."""
        doc = Event(round(time.time(), 3), kind, what, **fields).doc()
        self._waiting.setdefault(user, []).append(doc)

    def to_everyone(self, kind: str, what: str, **fields: str) -> None:
        """An event for every user (workers and clusters)."""
        for user in self.users():
            self.to(user, kind, what, **fields)

    def flush(self) -> None:
        """Send what waits: each user's batch live, and their recent events retained."""
        waiting, self._waiting = self._waiting, {}
        for user, batch in waiting.items():
            kept = self.recent.setdefault(user, deque(maxlen=RECENT))
            kept.extend(batch)
            for start in range(0, len(batch), BATCH_MAX):
                self.session.send(channels.API_EVENTS, {"events": batch[start:start + BATCH_MAX]}, "root", user=user)
            self.session.send(channels.API_EVENTS_RECENT, {"events": list(kept)}, "root", user=user)

    async def run(self) -> None:
        """Flush every FLUSH_EVERY seconds until cancelled (and once more then)."""
        try:
            while True:
                await asyncio.sleep(FLUSH_EVERY)
                self.flush()
        finally:
            self.flush()
