"""The embedded amqtt broker as an async context manager."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from amqtt.broker import Broker

from broker.credentials import Credentials
from broker.routing import BrokerStats, IndexedRouting

for _name in ("amqtt", "transitions"):
    logging.getLogger(_name).setLevel(logging.WARNING)


@dataclass(frozen=True)
class Listeners:
    """Where the broker listens: plain TCP always; TLS and websockets when asked for."""

    host: str = "127.0.0.1"
    port: int = 0
    tls_port: int | None = None
    certfile: str | None = None
    keyfile: str | None = None
    ws_port: int | None = None


class _Broker(IndexedRouting, BrokerStats, Broker):
    """amqtt's broker, with retained messages sent only to the subscriptions of the session itself.

    On every CONNECT amqtt 0.12 replays the retained messages matching *every* filter any client has
    subscribed to, to the connecting client, bypassing the topic rules: a new client would receive
    other clients' retained topics. Here a filter counts only if this session subscribed to it.
    """

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Any) -> None:
        subscribers = self._subscriptions.get(subscription[0], ())
        if any(subscriber is session for subscriber, _ in subscribers):
            await super()._publish_retained_messages_for_subscription(subscription, session)


class EmbeddedBroker:
    """An amqtt broker with Oakling's authentication and topic rules; no anonymous access.

    ``async with EmbeddedBroker(Listeners(port=0), credentials) as broker: broker.port``
    """

    def __init__(self, listeners: Listeners, credentials: Credentials) -> None:
        self.listeners = listeners
        self.credentials = credentials
        self._broker: _Broker | None = None
        self.port = listeners.port

    def _config(self) -> dict[str, Any]:
        lst = self.listeners
        listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": f"{lst.host}:{lst.port}"}}
        if lst.tls_port is not None:
            listeners["tls"] = {
                "type": "tcp",
                "bind": f"{lst.host}:{lst.tls_port}",
                "ssl": True,
                "certfile": lst.certfile,
                "keyfile": lst.keyfile,
            }
        if lst.ws_port is not None:
            listeners["ws"] = {"type": "ws", "bind": f"{lst.host}:{lst.ws_port}"}
        return {
            "listeners": listeners,
            "plugins": {
                "broker.plugins.OakAuthPlugin": {"credentials": self.credentials},
                "broker.plugins.OakTopicPlugin": {},
            },
        }

    async def __aenter__(self) -> EmbeddedBroker:
        self._broker = _Broker(self._config())
        await self._broker.start()
        server = self._broker._servers["default"].instance
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
