"""What the feed tells the dashboard: Textual messages built from MQTT messages."""

from __future__ import annotations

from typing import Any

from textual.message import Message


class ServiceChanged(Message):
    """A service's retained state changed; ``state`` is None when the service was deleted."""

    def __init__(self, job_name: str, state: dict[str, Any] | None) -> None:
        super().__init__()
        self.job_name = job_name
        self.state = state


class InfrastructureChanged(Message):
    """The clusters and their workers, as the root reports them to this user."""

    def __init__(self, clusters: list[dict[str, Any]], nodes: list[dict[str, Any]]) -> None:
        super().__init__()
        self.clusters = clusters
        self.nodes = nodes


class FeedStatus(Message):
    """The connection to the root: connected, or an error to show."""

    def __init__(self, text: str, ok: bool) -> None:
        super().__init__()
        self.text = text
        self.ok = ok


class EventsArrived(Message):
    """Events from the root's feed: the retained recent ones, or a live batch (either may repeat some)."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        super().__init__()
        self.events = events
