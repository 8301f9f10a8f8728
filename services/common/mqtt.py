"""An asyncio MQTT 3.1.1 session over gmqtt, shaped like aiomqtt.

What every Oakling service needs from its broker connection, in one place:

* MQTT 3.1.1 always (amqtt speaks nothing else), credentials always;
* a retained last will (``{"state":"offline"}``) and a retained birth once connected;
* gmqtt owns reconnection; on every (re)connect this session resubscribes and, once gmqtt has
  replayed its in-flight messages, republishes every retained topic it owns, so a broker that
  restarted empty is refilled and an old in-flight message never overwrites a newer one;
* incoming messages as an async iterator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import gmqtt
from gmqtt.mqtt.constants import MQTTv311

from services.common import envelope
from services.common.channels import Channel
from services.common.envelope import OFFLINE, ONLINE
from services.common.liveness import epoch

log = logging.getLogger(__name__)
logging.getLogger("gmqtt").setLevel(logging.WARNING)


def _not_cancelled_reconnect(record: logging.LogRecord) -> bool:
    """Drop gmqtt's report of its own reconnect task being cancelled at shutdown (harmless noise)."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (isinstance(exc, asyncio.CancelledError) and "reconnect" in record.getMessage())


logging.getLogger("asyncio").addFilter(_not_cancelled_reconnect)

CONNECT_TIMEOUT = 10.0


class MqttError(Exception):
    """The broker cannot be reached or refused us."""


@dataclass(frozen=True)
class BrokerUrl:
    """Where a broker listens: ``mqtt://host:port`` or ``mqtts://host:port``."""

    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, url: str, default_port: int = 1883, tls: bool = False) -> BrokerUrl:
        """Parse ``mqtt://host:port``, ``mqtts://host:port`` or a bare ``host[:port]`` (TLS when *tls*)."""
        if "://" not in url:
            url = f"{'mqtts' if tls else 'mqtt'}://{url}"
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise ValueError(f"not a broker URL: {url!r} (expected mqtt://host:port)")
        return cls(parts.hostname, parts.port or default_port, parts.scheme in ("mqtts", "ssl"))

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def tls_context(ca: Path | None = None, cert: Path | None = None, key: Path | None = None, *,
                ca_pem: str | None = None) -> ssl.SSLContext:
    """A client's TLS context: the server must present a certificate issued under the CA in *ca* (the
    fleet's CA, pinned at join), and *cert*/*key* are the client's own certificate, when it has one.

    *ca_pem* gives the CA as PEM text instead of a file. Without either the server is not verified at
    all: only for a newcomer fetching the CA to check it against the fingerprint it was given
    (broker.join), never for anything else. Host names are not checked: tiers are reached by any
    address, and only the fleet's CA (and the clusters' CAs it signs) issue server certificates.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    if ca is None and ca_pem is None:
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cafile=str(ca) if ca else None, cadata=ca_pem)
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


@dataclass(frozen=True)
class Message:
    """A message received from the broker."""

    topic: str
    payload: bytes
    retain: bool
    qos: int
    received: float = 0.0  # when it arrived (monotonic seconds)

    @property
    def lag(self) -> float | None:
        """Seconds from when its sender says it sent it (an envelope's or a heartbeat's ``ts``, on the
        sender's clock) to its arrival here; None when it does not say."""
        sent = envelope.sent_at(self.payload)
        return None if sent is None or not self.received else epoch(self.received) - sent


class MqttSession:
    """One client connection; use as ``async with MqttSession(...) as session``."""

    def __init__(
        self,
        url: BrokerUrl,
        client_id: str,
        username: str,
        password: str,
        *,
        avail_topic: str | None = None,
        clean_session: bool = True,
        keepalive: int = 10,
        retry_first_connect: bool = True,
        announce: bool = True,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self._tls = tls
        self.client_id = client_id
        self._avail_topic = avail_topic
        self._retry = retry_first_connect
        self._keepalive = keepalive
        will = gmqtt.Message(avail_topic, OFFLINE, qos=1, retain=True) if avail_topic else None
        self._client = gmqtt.Client(client_id, clean_session=clean_session, will_message=will)
        self._client.set_auth_credentials(username, password)
        self._client.set_config({"reconnect_retries": -1, "reconnect_delay": 1})
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._subacks: dict[int, asyncio.Future[None]] = {}
        self._filters: dict[str, int] = {}
        self._retained: dict[str, bytes] = {}
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._arrivals: deque[float] = deque()  # when each message in the queue arrived
        self._heard = time.monotonic()  # when the broker last sent anything, as of the last look
        self._tasks: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()
        self.reconnects = 0
        self.received_count = 0  # messages received, and published (the metrics read them)
        self.sent_count = 0
        self._closing = False
        self._announce = announce
        self._diverted: tuple[str, Callable[[str, bytes, bool, int], None]] | None = None

    # ---- connection --------------------------------------------------------------------------

    async def __aenter__(self) -> MqttSession:
        delay = 0.2
        while True:
            try:
                await asyncio.wait_for(self._connect_once(), CONNECT_TIMEOUT)
                return self
            except gmqtt.mqtt.handler.MQTTConnectError as exc:
                raise MqttError(f"{self.url} refused {self.client_id!r}: {exc}") from None
            except (OSError, TimeoutError) as exc:
                if not self._retry:
                    raise MqttError(f"cannot reach the broker at {self.url}: {exc}") from None
                log.warning("cannot reach the broker at %s (%s); retrying in %.1f s", self.url, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _connect_once(self) -> None:
        tls: Any = self._tls or (ssl.create_default_context() if self.url.tls else False)
        await self._client.connect(
            self.url.host, self.url.port, ssl=tls, keepalive=self._keepalive, version=MQTTv311
        )

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Say offline (a graceful disconnect suppresses the will) and disconnect."""
        for task in self._tasks:
            task.cancel()
        self.connected.clear()
        self._closing = True
        if self._avail_topic and self._client.is_connected:
            self._client.publish(self._avail_topic, OFFLINE, qos=1, retain=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._client._persistent_storage.wait_empty(), 2)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.disconnect(), 2)

    def _on_connect(self, client: gmqtt.Client, flags: int, rc: int, properties: Any) -> None:
        if self.connected.is_set() or self.reconnects:
            log.info("%s reconnected to %s", self.client_id, self.url)
        self.reconnects += 1
        for topic_filter, qos in self._filters.items():
            client.subscribe(topic_filter, qos=qos)
        task = asyncio.get_running_loop().create_task(self._refill())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refill(self) -> None:
        """After gmqtt has replayed its in-flight messages, republish every retained topic we own."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._client._persistent_storage.wait_empty(), 3)
        for topic, payload in list(self._retained.items()):
            self._client.publish(topic, payload, qos=1, retain=True)
        if self._avail_topic and self._announce:
            self._client.publish(self._avail_topic, ONLINE, qos=1, retain=True)
        self.connected.set()

    def announce(self) -> None:
        """Say online now (for a session made with ``announce=False``, once it serves) and after every
        reconnect from now on."""
        self._announce = True
        if self._avail_topic and self._client.is_connected:
            self._client.publish(self._avail_topic, ONLINE, qos=1, retain=True)

    def _on_disconnect(self, client: gmqtt.Client, packet: Any, exc: Any = None) -> None:
        self.quiet_for()  # remember the last time the lost connection heard the broker
        if self.connected.is_set() and not self._closing:
            log.warning("%s lost the broker at %s; reconnecting", self.client_id, self.url)
        self.connected.clear()

    def _on_message(self, client: gmqtt.Client, topic: str, payload: bytes, qos: int, properties: Any) -> int:
        retain = bool(properties.get("retain", 0)) if isinstance(properties, dict) else False
        self._heard = time.monotonic()
        self.received_count += 1
        self.take_in(topic, payload or b"", retain=retain, qos=qos)
        return 0

    def take_in(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        """Have a message that came another way (the cluster's in-process bridge, from the root) read as if
        this session's broker had delivered it (it counts as the other way's traffic, not this session's)."""
        now = time.monotonic()
        self._arrivals.append(now)
        self._queue.put_nowait(Message(topic, payload, retain, qos, now))

    def divert(self, prefix: str, publish: Callable[[str, bytes, bool, int], None]) -> None:
        """Hand what is published under *prefix* to *publish* (topic, payload, retain, qos) instead of this
        session's broker: the cluster's in-process bridge takes the orchestrator's upstream to the root."""
        self._diverted = (prefix, publish)

    # ---- traffic -----------------------------------------------------------------------------

    def subscribe(self, *filters: str, qos: int = 1) -> None:
        """Subscribe now and after every reconnect."""
        for topic_filter in filters:
            self._filters[topic_filter] = qos
            if self._client.is_connected:
                self._client.subscribe(topic_filter, qos=qos)

    async def subscribe_confirmed(self, *filters: str, qos: int = 1, timeout: float = 10.0) -> None:
        """Subscribe and wait for the broker's SUBACK, so nothing published after this is missed.

        amqtt handles SUBSCRIBE and PUBLISH packets of one connection concurrently: a request
        published right after a plain :meth:`subscribe` may be answered before the subscription exists.
        """
        loop = asyncio.get_running_loop()
        waiters = []
        for topic_filter in filters:
            self._filters[topic_filter] = qos
            waiter = loop.create_future()
            self._subacks[self._client.subscribe(topic_filter, qos=qos)] = waiter
            waiters.append(waiter)
        await asyncio.wait_for(asyncio.gather(*waiters), timeout)

    def _on_subscribe(self, client: gmqtt.Client, mid: int, qos: Any, properties: Any) -> None:
        waiter = self._subacks.pop(mid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        """Publish; a retained topic is remembered and republished after every reconnect.

        An empty retained payload clears the topic at the broker and here.
        """
        if self._diverted is not None and topic.startswith(self._diverted[0]):
            self._diverted[1](topic, payload, retain, qos)
            return
        if retain:
            if payload:
                self._retained[topic] = payload
            else:
                self._retained.pop(topic, None)
        self.sent_count += 1
        self._client.publish(topic, payload, qos=qos, retain=retain)

    def send(self, channel: Channel[Any], data: Mapping[str, Any] | bytes, src: str = "", **names: str) -> None:
        """Publish *data* (encoded as *channel* says, unless already bytes) on *channel*'s topic for *names*,
        retained and at the QoS the channel table gives."""
        payload = data if isinstance(data, bytes) else channel.encode(data, src)
        self.publish(channel.topic(**names), payload, retain=channel.retained, qos=channel.qos)

    @property
    def unacknowledged(self) -> int:
        """QoS 1 messages published and not yet acknowledged by the broker (gmqtt keeps them to resend)."""
        with contextlib.suppress(AttributeError, TypeError):
            return len(self._client._persistent_storage._messages)
        return 0

    @property
    def backlog(self) -> int:
        """Messages received and not yet taken: how far behind the service reading them is."""
        return self._queue.qsize()

    def horizon(self) -> float:
        """The moment up to which every message received has been taken (monotonic): when the oldest one
        still waiting arrived, or now. A reader judging its peers' silence looks no further."""
        return self._arrivals[0] if self._arrivals else time.monotonic()

    def waited(self) -> float:
        """Seconds the oldest message still waiting to be taken has waited (0 when none waits)."""
        return time.monotonic() - self.horizon()

    def quiet_for(self) -> float:
        """Seconds since the broker last sent this session anything (a message, an acknowledgement, a
        ping's answer), connected or not: how long this side has been cut off, if it is."""
        connection = getattr(self._client, "_connection", None)
        if self._client.is_connected and connection is not None:  # gmqtt notes every packet's arrival
            self._heard = max(self._heard, float(getattr(connection, "_last_data_in", 0.0)))
        return time.monotonic() - self._heard

    async def _take(self) -> Message:
        message = await self._queue.get()
        self._arrivals.popleft()
        return message

    async def messages(self) -> AsyncIterator[Message]:
        """Yield incoming messages forever."""
        while True:
            yield await self._take()

    async def get(self, timeout: float) -> Message:
        """Return the next incoming message, or raise TimeoutError."""
        return await asyncio.wait_for(self._take(), timeout)
