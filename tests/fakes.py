"""Fakes shared by the tests that drive a tier's logic without a broker."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from services.common.channels import Channel
from services.common.inbox import Inbox, Received
from services.common.mqtt import Message, MqttSession


class FakeSession:
    """Records what a tier publishes (``send`` is the real session's, over this ``publish``)."""

    backlog = 0  # nothing waits: the tier is idle
    lag = 0.0  # seconds the oldest message waiting for the tier has waited (set it to make the tier behind)

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, retain: bool = False, qos: int = 1) -> None:
        self.published.append((topic, payload))

    def subscribe(self, *filters: str) -> None:
        pass

    def horizon(self) -> float:
        """When the oldest message waiting arrived (*lag* ago; now when nothing waits)."""
        return time.monotonic() - self.lag

    send = MqttSession.send
    waited = MqttSession.waited


class Listener(Protocol):
    def listen(self, inbox: Inbox) -> None: ...


async def deliver(listener: Listener, session: Any, topic: str, payload: bytes, retain: bool = False) -> None:
    """Hand one message to *listener* as its inbox would: decoded against its channel, bad input dropped."""
    inbox = Inbox()
    listener.listen(inbox)
    await inbox.deliver(session, Message(topic, payload, retain, 1))


async def deliver_on(channel: Channel[Any], handler: Callable[[Received[Any]], Awaitable[Any]], session: Any,
                     topic: str, payload: bytes) -> None:
    """Hand one message on *channel* to *handler*, as an inbox would."""
    inbox = Inbox()
    inbox.on(channel, handler)
    await inbox.deliver(session, Message(topic, payload, False, 1))


def received(channel: Channel[Any], topic: str, payload: bytes) -> Received[Any]:
    """*payload* on *topic* as a handler of *channel* receives it."""
    names = channel.parse(topic)
    assert names is not None, f"{topic} is not on {channel.pattern}"
    return Received(channel, names, channel.decode(payload) if payload else None, Message(topic, payload, False, 1))
