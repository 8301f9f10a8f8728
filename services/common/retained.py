"""What was last published on each retained topic, so that a repeat is not sent again.

Retained topics carry the current state; publishing the same state twice only costs the broker and
every subscriber a message. Publishers keep a :class:`LastSent` and ask it before each publish.
"""

from __future__ import annotations

from collections.abc import Hashable


class LastSent:
    """The last value (or a key standing for it) published on each topic."""

    def __init__(self) -> None:
        self._last: dict[Hashable, object] = {}

    def fresh(self, topic: Hashable, value: object) -> bool:
        """True, and *value* remembered, when *value* differs from what *topic* last carried."""
        if topic in self._last and self._last[topic] == value:
            return False
        self._last[topic] = value
        return True

    def last(self, topic: Hashable) -> object | None:
        """What *topic* last carried (None: nothing yet, or forgotten)."""
        return self._last.get(topic)

    def forget(self, topic: Hashable) -> None:
        """Forget *topic* (its retained message was cleared), so its next value is sent."""
        self._last.pop(topic, None)
