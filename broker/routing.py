"""Message routing for the embedded amqtt broker without a scan of every filter per message.

amqtt 0.12 matches every published topic against every subscribed filter, and every new subscription
against every retained message. A worker subscribes to three topics of its own, so a cluster of 1,000
workers holds over 3,000 filters: each report a worker publishes costs 3,000 matches. Here filters
without wildcards (almost all of them) are found by one dict lookup and only the few wildcard filters
are matched, and of those only the ones whose literal leading levels the topic starts with;
delivery follows amqtt's rules (receive ACL, queueing for a persistent session that is
offline, QoS of the subscription unless the message forces one).

The broker also counts publishes in and deliveries out; with ``OAK_BROKER_STATS=SECONDS`` in the
environment it logs them (cumulative, with a timestamp) that often, which benchmarks read.

A QoS 1 delivery whose PUBACK comes after amqtt's 5 s wait (a subscriber whose event loop is busy, such as
the orchestrator sharing the broker's loop during a burst) has been sent; amqtt would log a warning, an
exception with its traceback from its broadcast loop and another warning when the PUBACK arrives, which
cost the busy loop more than the delivery did (7.5 % of a cluster placing for 1,000 workers). Here such a
delivery is counted (``late_acks``) and those lines are left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from amqtt.contexts import Action
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.session import Session

log = logging.getLogger(__name__)

BROADCAST_BATCH = 1000  # published messages delivered per turn of amqtt's broadcast loop, at most
ACK_LINES = ("Timeout waiting for PUBACK", "Received PUBACK for unknown pending message")


class LateAcks(logging.Filter):
    """Keeps amqtt's lines about a PUBACK that came after its wait out of the log (counted instead)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """False for amqtt's PUBACK-timeout lines, which are counted."""
        if isinstance(record.msg, str) and record.msg.startswith(ACK_LINES):
            self.dropped += 1
            return False
        return True


LATE_ACKS = LateAcks()
logging.getLogger("amqtt.mqtt.protocol.handler").addFilter(LATE_ACKS)


def is_wildcard(topic_filter: str) -> bool:
    """True when *topic_filter* has ``+`` or ``#`` in it."""
    return "+" in topic_filter or "#" in topic_filter


class BrokerStats:
    """A mixin for :class:`amqtt.broker.Broker`: counts publishes (and wills) in and deliveries out."""

    _subscriptions: dict[str, list[tuple[Session, int]]]
    _retained_messages: dict[str, Any]
    published = 0
    delivered = 0
    late_acks = 0
    _stats_task: asyncio.Task[None] | None = None

    async def _broadcast_message(self, session: Session | None, topic: str | None, data: Any,
                                 force_qos: int | None = None) -> None:
        self.published += 1
        await super()._broadcast_message(session, topic, data, force_qos)  # type: ignore[misc]

    # ---- statistics --------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters since start: publishes in, deliveries out; and the current sizes."""
        return {"published": self.published, "delivered": self.delivered, "late_acks": self.late_acks,
                "clients": len(self._sessions), "filters": len(self._subscriptions),  # type: ignore[attr-defined]
                "retained": len(self._retained_messages)}

    async def start(self) -> None:
        """amqtt's start; then the statistics log when asked for."""
        await super().start()  # type: ignore[misc]
        every = float(os.environ.get("OAK_BROKER_STATS", "0") or 0)
        if every > 0:
            self._stats_task = asyncio.create_task(self._log_stats(every))

    async def shutdown(self) -> None:
        """Stop the statistics log, then amqtt's shutdown."""
        if self._stats_task is not None:
            self._stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_task
        await super().shutdown()  # type: ignore[misc]

    async def _log_stats(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            fields = " ".join(f"{k}={v}" for k, v in self.stats().items())
            log.info("broker stats: t=%.3f %s", time.time(), fields)


class IndexedRouting:
    """A mixin for :class:`amqtt.broker.Broker` (put it before :class:`BrokerStats` and the broker)."""

    _subscriptions: dict[str, list[tuple[Session, int]]]
    _retained_messages: dict[str, Any]
    _broadcast_queue: asyncio.Queue[dict[str, Any]]
    delivered = 0
    late_acks = 0
    _wild: dict[tuple[str, ...], list[str]] | None = None
    _filters_of: dict[str, set[str]]

    # ---- which filters match ------------------------------------------------------------------

    def _wildcards(self) -> dict[tuple[str, ...], list[str]]:
        """The subscribed filters with wildcards by their literal leading levels (``a/b/+/c`` under
        ``("a", "b")``), rebuilt after one is added or removed. Every worker has one (``.../cmd/+``)."""
        if self._wild is None:
            self._wild = {}
            for topic_filter in self._subscriptions:
                if is_wildcard(topic_filter):
                    levels = topic_filter.split("/")
                    literal = next(i for i, level in enumerate(levels) if is_wildcard(level))
                    self._wild.setdefault(tuple(levels[:literal]), []).append(topic_filter)
        return self._wild

    def matching_filters(self, topic: str) -> Iterator[str]:
        """Every subscribed filter *topic* matches: exact ones by look-up, wildcard ones by prefix."""
        if topic in self._subscriptions:
            yield topic
        index, levels = self._wildcards(), topic.split("/")
        for k in range(len(levels) + 1):
            for topic_filter in index.get(tuple(levels[:k]), ()):
                if self._matches(topic, topic_filter):  # type: ignore[attr-defined]
                    yield topic_filter

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """amqtt's subscribe; a new wildcard filter joins the index, and the session's filters are noted."""
        known = subscription[0] in self._subscriptions
        code = await super().add_subscription(subscription, session)  # type: ignore[misc]
        if subscription[0] in self._subscriptions:
            self._filters_of.setdefault(session.client_id, set()).add(subscription[0])
            if not known and is_wildcard(subscription[0]):
                self._wild = None
        return int(code)

    async def _del_all_subscriptions(self, session: Session) -> None:
        """Remove the session's own subscriptions (amqtt looks at every filter of every client)."""
        for topic_filter in self._filters_of.pop(session.client_id, ()):
            self._del_subscription(topic_filter, session)  # type: ignore[attr-defined]
            if not self._subscriptions.get(topic_filter, True):
                del self._subscriptions[topic_filter]
                if is_wildcard(topic_filter):
                    self._wild = None

    async def start(self) -> None:
        """amqtt's start (which forgets every subscription)."""
        self._wild, self._filters_of = None, {}
        await super().start()  # type: ignore[misc]

    # ---- delivery ----------------------------------------------------------------------------

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[Any]]) -> None:
        """Deliver the published messages waiting (at least one, at most BROADCAST_BATCH) to the sessions
        whose filters match their topics.

        amqtt takes one message per turn of its broadcast loop, and a turn costs several turns of the
        event loop. When the loop is busy (the orchestrator shares it) a burst, such as the last wills of
        100 workers killed at once, would then trickle out one message per busy turn; taken together they
        reach their subscribers together.
        """
        broadcasts = [await self._broadcast_queue.get()]
        while len(broadcasts) < BROADCAST_BATCH and not self._broadcast_queue.empty():
            broadcasts.append(self._broadcast_queue.get_nowait())
        for broadcast in broadcasts:
            for topic_filter in list(self.matching_filters(broadcast["topic"])):
                for target, sub_qos in list(self._subscriptions.get(topic_filter, ())):
                    task = await self._deliver(broadcast, target, broadcast.get("qos", sub_qos))
                    if task is not None:
                        running_tasks.append(task)

    def may_receive(self, session: Session, topic: str) -> bool | None:
        """Whether *session* may receive *topic*, decided without the plugins; None: ask the topic plugins.

        amqtt asks its plugins through tasks it awaits, so each delivery costs a turn of the event loop;
        a broker whose rules are known here answers at once (see :class:`broker.server`)."""
        return None

    async def _deliver(self, broadcast: dict[str, Any], target: Session, qos: int) -> asyncio.Task[Any] | None:
        topic = broadcast["topic"]
        allowed = self.may_receive(target, topic)
        if allowed is None:
            allowed = await self._topic_filtering(target, topic=topic, action=Action.RECEIVE)  # type: ignore[attr-defined]
        if not allowed:
            return None
        if target.transitions.state != "connected":
            # a persistent session gets QoS 1/2 messages when it comes back (amqtt's rule, MQTT 3.1.2.4)
            if not target.clean_session and qos in (QOS_1, QOS_2) and not target.is_anonymous:
                await self._retain_broadcast_message(broadcast, qos, target)  # type: ignore[attr-defined]
            return None
        handler = self._get_handler(target)  # type: ignore[attr-defined]
        if handler is None:
            return None
        self.delivered += 1
        return asyncio.ensure_future(self._send(handler, topic, broadcast["data"], qos))

    async def _send(self, handler: Any, topic: str, data: bytes, qos: int) -> None:
        """One delivery; sent but acknowledged after amqtt's wait, it is counted, not raised (amqtt's
        broadcast loop would log it with its traceback)."""
        try:
            await handler.mqtt_publish(topic, data, qos, retain=False)
        except TimeoutError:
            self.late_acks += 1

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """The retained message of an exact filter is looked up, not searched for."""
        topic_filter, qos = subscription
        if is_wildcard(topic_filter):
            await super()._publish_retained_messages_for_subscription(subscription, session)  # type: ignore[misc]
            return
        retained = self._retained_messages.get(topic_filter)
        handler = self._get_handler(session)  # type: ignore[attr-defined]
        if retained is not None and handler is not None:
            await handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)
