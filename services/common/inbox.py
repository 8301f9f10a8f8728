"""A service's typed inbox: the channels it reads, each with the handler that takes it.

Registering a handler with its channel (:meth:`Inbox.on`) is also what subscribes to it, so the list of
``on`` calls in an ``app.py`` is the whole of what that service hears. Every message is decoded at the
edge against its channel's type before a handler sees it: one that does not decode is dropped with one
log line naming the sender and what is wrong (a child's bad retained message is cleared too, or it would
be read again after every restart), and the service keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from services.common.channels import CLUSTER, NODE, Channel
from services.common.mqtt import Message, MqttSession
from services.common.throttle import TimeSlices

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Received(Generic[T]):
    """One message on a channel: the topic's placeholders, and the decoded body (None when the payload is
    empty: a retained topic cleared)."""

    channel: Channel[T]
    names: dict[str, str]
    body: T | None
    message: Message

    @property
    def sender(self) -> str:
        """The identity the channel belongs to (``w1`` on ``oak/nodes/w1/up/info``), or ""."""
        return _sender(self.channel, self.names)


def _sender(channel: Channel[Any], names: dict[str, str]) -> str:
    owner = channel.owner
    return names.get(owner, "") if owner else ""


Handler = Callable[[Received[Any]], Awaitable[Any]]


@dataclass(frozen=True)
class _Route:
    channel: Channel[Any]
    names: dict[str, str]  # the placeholders this route narrows the channel to
    handler: Handler

    @property
    def topic_filter(self) -> str:
        return self.channel.filter(**self.names)

    def parse(self, topic: str) -> dict[str, str] | None:
        """The topic's placeholders when it is this route's, else None."""
        names = self.channel.parse(topic)
        if names is None or any(names[key] != value for key, value in self.names.items()):
            return None
        return names


class Inbox:
    """The channels one session reads, in the order they were registered."""

    def __init__(self) -> None:
        self._routes: list[_Route] = []
        self._subscribed = False

    def on(self, channel: Channel[T], handler: Callable[[Received[T]], Awaitable[Any]], **names: str) -> None:
        """Hand messages on *channel* (its placeholders narrowed to *names*, e.g. ``node="w1"``) to *handler*."""
        self._routes.append(_Route(channel, names, handler))

    @property
    def filters(self) -> list[str]:
        """The subscriptions this inbox needs."""
        return [route.topic_filter for route in self._routes]

    async def subscribe(self, session: MqttSession, *, elsewhere: str = "") -> None:
        """Subscribe to every channel, waiting for the broker's acknowledgements; not to those whose topics
        start with *elsewhere*, which reach *session* another way (the cluster's in-process bridge)."""
        if not self._subscribed:
            await session.subscribe_confirmed(*(f for f in self.filters if not (elsewhere and f.startswith(elsewhere))))
            self._subscribed = True

    async def deliver(self, session: MqttSession, message: Message) -> None:
        """Decode *message* against its channel and hand it to its handler; bad input is logged and dropped."""
        route, names = next(((r, n) for r in self._routes if (n := r.parse(message.topic)) is not None),
                            (None, None))
        if route is None or names is None:
            return
        channel = route.channel
        try:
            body = channel.decode(message.payload) if message.payload else None
        except (ValueError, RecursionError) as exc:
            sender = _sender(channel, names)
            log.warning("dropped a bad message on %s%s: %s", message.topic,
                        f" from {channel.owner} {sender}" if sender else "", str(exc)[:300] or repr(exc))
            if message.retain and channel.retained and channel.publisher in (CLUSTER, NODE):
                session.publish(message.topic, b"", retain=True)
            return
        try:
            await route.handler(Received(channel, names, body, message))
        except (ValueError, RecursionError) as exc:
            log.warning("ignoring a bad message on %s: %s", message.topic, str(exc)[:300] or repr(exc))
        except Exception:
            log.exception("failed to handle a message on %s", message.topic)

    async def run(self, session: MqttSession) -> None:
        """Subscribe, then deliver every incoming message, one at a time, forever. A backlog of messages
        is taken in slices (:class:`TimeSlices`): waiting messages do not suspend the loop, so a burst of
        a thousand would otherwise hold it until the last one was handled."""
        await self.subscribe(session)
        slices = TimeSlices()
        async for message in session.messages():
            await self.deliver(session, message)
            await slices.turn()


async def serve(session: MqttSession, inbox: Inbox, *loops: Coroutine[Any, Any, None]) -> None:
    """Run *inbox* on *session* while running *loops*, until cancelled."""
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(inbox.run(session))
        for loop in loops:
            tasks.create_task(loop)
