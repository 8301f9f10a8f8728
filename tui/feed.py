"""The one place the dashboard touches MQTT: the user's retained state in, requests out.

It subscribes to the user's retained state (every service's state, the infrastructure view and the recent
events, so the whole picture arrives at once) and to the live events, and turns each message into a
Textual message. It never polls.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol

from textual.message_pump import MessagePump

from services.cli.client import CliError, OakClient, Profile
from services.cli.views import event_rows
from services.common import channels
from tui.messages import EventsArrived, FeedStatus, InfrastructureChanged, ServiceChanged


class Feed(Protocol):
    """What the dashboard needs from its data source (tests provide a fake one)."""

    async def run(self, target: MessagePump) -> None:
        """Post messages to *target* until cancelled."""
        ...

    async def request(self, resource: str, action: str, body: dict[str, Any] | None = None,
                      raw: bytes | None = None) -> Any:
        """Send an API request; return its data or raise CliError with the root's message."""
        ...

    async def stream(self, resource: str, action: str, body: dict[str, Any]) -> tuple[Any, AsyncIterator[dict]]:
        """Send a request answered many times (logs): its first answer's data, and the rest."""
        ...

    async def stop_stream(self, stream: str) -> None:
        """End a log stream early."""
        ...


def translate(topic: str, payload: bytes) -> ServiceChanged | InfrastructureChanged | EventsArrived | None:
    """The Textual message for one MQTT message, or None for anything else."""
    service = channels.API_SERVICE_STATE.parse(topic)
    if service is not None:
        return ServiceChanged(service["job"], channels.API_SERVICE_STATE.decode(payload) if payload else None)
    if channels.API_INFRASTRUCTURE.parse(topic) is not None and payload:
        data = channels.API_INFRASTRUCTURE.decode(payload)
        return InfrastructureChanged(list(data.get("clusters", [])), list(data.get("nodes", [])))
    for channel in (channels.API_EVENTS, channels.API_EVENTS_RECENT):
        if channel.parse(topic) is not None and payload:
            return EventsArrived(event_rows(channel.decode(payload)))
    return None


class MqttFeed:
    """The real feed: an :class:`OakClient` session with the root."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.client: OakClient | None = None

    async def run(self, target: MessagePump) -> None:
        """Connect, subscribe to the user's state, and forward every change."""
        try:
            self.client = await OakClient(self.profile).__aenter__()
        except CliError as exc:
            target.post_message(FeedStatus(str(exc), ok=False))
            return
        target.post_message(FeedStatus(f"{self.profile.username} @ {self.profile.root}", ok=True))
        me = self.profile.username
        await self.client.session.subscribe_confirmed(
            channels.API_SERVICE_STATE.filter(user=me), channels.API_INFRASTRUCTURE.topic(user=me),
            channels.API_EVENTS_RECENT.topic(user=me), channels.API_EVENTS.topic(user=me))
        try:
            while True:
                message = await self.client.updates.get()
                try:
                    translated = translate(message.topic, message.payload)
                except ValueError:
                    continue
                if translated is not None:
                    target.post_message(translated)
        finally:
            await self.client.__aexit__(None, None, None)

    def _client(self) -> OakClient:
        if self.client is None:
            raise CliError("not connected to the root")
        return self.client

    async def request(self, resource: str, action: str, body: dict[str, Any] | None = None,
                      raw: bytes | None = None) -> Any:
        """Send one API request through the session."""
        return await self._client().request(resource, action, body, raw=raw)

    async def stream(self, resource: str, action: str, body: dict[str, Any]) -> tuple[Any, AsyncIterator[dict]]:
        """Send a request answered many times."""
        return await self._client().stream(resource, action, body)

    async def stop_stream(self, stream: str) -> None:
        """Ask the root to end a log stream."""
        with contextlib.suppress(CliError):
            await self._client().request("services", "logs", {"stop": stream})
