"""The embedded amqtt broker as an async context manager."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action, ListenerType
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

from broker import acl
from broker.credentials import Credentials
from broker.gate import PENDING_PER_SOURCE, GatedSocket
from broker.identity import USER, Identity
from broker.plugins import ACTIONS, permitted
from broker.routing import BrokerStats, IndexedRouting

log = logging.getLogger(__name__)
for _name in ("amqtt", "transitions"):
    logging.getLogger(_name).setLevel(logging.WARNING)


@dataclass(frozen=True)
class Listeners:
    """Where the broker listens: plain TCP always; TLS and websockets when asked for.

    *cafile*: the CA whose certificates log clients in on the TLS listener (machines, and users who
    have one); without it the TLS listener takes passwords only. *plain_host* binds the plain listener
    elsewhere than the others (a tier keeps it on loopback); *plain_admits*, when given, are the only
    kinds of identity (broker.identity) it lets in.
    """

    host: str = "127.0.0.1"
    port: int = 0
    tls_port: int | None = None
    certfile: str | None = None
    keyfile: str | None = None
    ws_port: int | None = None
    cafile: str | None = None
    plain_host: str | None = None
    plain_admits: frozenset[str] | None = None
    crlfile: str | None = None  # certificates revoked (mosquitto's certificate listener reads it at start)
    pending_per_source: int = PENDING_PER_SOURCE  # connections one address may hold before it logs in


# amqtt waits keepalive + this many seconds for a client's next packet (MQTT asks 1.5 x keepalive; Oakling's
# clients use 10 s and their pings may be late when their process is busy, so 2 x).
KEEPALIVE_GRACE = 10
# A connection that has not finished its TLS handshake, or then sent its CONNECT, within this many seconds
# is closed: an idle socket holds a file descriptor and memory, and enough of them exhaust the process.
CONNECT_DEADLINE = 5.0
GENERATED_ID = "amqtt/"  # how amqtt names a client that sent an empty client id


def certified_name(peer: dict[str, Any] | None) -> str:
    """The common name of a verified client certificate (as ``ssl.SSLObject.getpeercert`` gives it), or ""."""
    for rdn in (peer or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


async def _close(handler: BrokerProtocolHandler) -> None:
    """Close a client's connection as if it had dropped (its last will goes out)."""
    await handler.handle_connection_closed()
    await handler.stop()


class _Handler(BrokerProtocolHandler):
    """amqtt's protocol handler, closing a connection whose client fell silent for longer than its
    keepalive allows (amqtt 0.12 only logs it: a worker whose machine vanished without closing its
    TCP connection was never declared gone and its last will never sent)."""

    def handle_read_timeout(self) -> None:
        """The client missed its keepalive: treat the connection as lost (the will goes out)."""
        log.info("%s sent nothing within its keepalive: closing its connection",
                 self.session.client_id if self.session else "a client")
        asyncio.ensure_future(self.handle_connection_closed())


class _Broker(IndexedRouting, BrokerStats, Broker):
    """amqtt's broker, with retained messages sent only to the subscriptions of the session itself.

    On every CONNECT amqtt 0.12 replays the retained messages matching *every* filter any client has
    subscribed to, to the connecting client, bypassing the topic rules: a new client would receive
    other clients' retained topics. Here a filter counts only if this session subscribed to it.
    Also: a client silent past its keepalive is disconnected (:class:`_Handler`), and deliveries check
    the topic rules directly instead of through a task per message.

    And a CONNECT is admitted (password and client id, :class:`broker.plugins.OakAuthPlugin`) *before*
    the session its client id names is looked up: amqtt 0.12 first deleted that session (a clean
    CONNECT drops the subscriptions of the client connected under that id, which stayed connected and
    never heard anything again) and took it over, and only then refused the newcomer's password.
    """

    def __init__(self, config: dict[str, Any], pending_per_source: int = PENDING_PER_SOURCE) -> None:
        super().__init__(config)
        self.pending_per_source = pending_per_source
        self.gates: list[GatedSocket] = []

    def _create_ssl_context(self, listener: Any) -> ssl.SSLContext:  # type: ignore[override]
        """The TLS listener's context: client certificates are checked against the tier's CA alone when
        it has one (amqtt's own falls back to the system's CAs, which must never log anyone in here)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(listener["certfile"], listener["keyfile"])
        if listener.get("cafile"):
            context.load_verify_locations(cafile=listener["cafile"])
            context.verify_mode = ssl.CERT_OPTIONAL
        return context

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str,
                                         remote_port: int) -> tuple[BrokerProtocolHandler, Any]:
        """Read the CONNECT, admit it, then resume or replace the session its client id names."""
        peer = f"{remote_address}:{remote_port}"
        try:
            handler, incoming = await asyncio.wait_for(
                BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager), CONNECT_DEADLINE)
        except (AMQTTError, MQTTError, NoDataError, TimeoutError) as exc:
            with contextlib.suppress(Exception):
                await writer.close()
            raise MQTTError(f"{peer} sent no valid CONNECT within {CONNECT_DEADLINE:.0f} s: {exc!r}") from None
        tls = writer._writer.get_extra_info("ssl_object") if hasattr(writer, "_writer") else None
        incoming.oak_source = remote_address
        incoming.oak_tls = tls is not None
        presented = tls.getpeercert() if tls is not None else None
        incoming.oak_certified = certified_name(presented)
        incoming.oak_serial = str((presented or {}).get("serialNumber", "")).lstrip("0")
        who = incoming.username or incoming.oak_certified
        if incoming.client_id.startswith(GENERATED_ID) and incoming.clean_session and who:
            identity = Identity.of(who)  # a user's empty client id becomes one of its own
            if identity.kind == USER:
                incoming.client_id = f"{identity.name}-{secrets.token_hex(6)}"
        incoming.oak_admitted = await super()._authenticate(incoming, None)
        if not incoming.oak_admitted:
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await writer.close()
            raise MQTTError(f"{peer} refused (client id {incoming.client_id!r}, user {incoming.username!r})")
        connection = writer._writer.get_extra_info("socket") if hasattr(writer, "_writer") else None
        for gate in self.gates:
            gate.admitted(remote_address, connection.fileno() if connection is not None else -1)
        session, current = self._sessions.get(incoming.client_id, (None, None))
        if session is not None and current is not None and session.transitions.is_connected():
            # MQTT-3.1.4-2: the earlier connection is closed (amqtt 0.12 left it open but deaf after a clean
            # CONNECT: the displaced client never noticed and never heard anything again).
            log.warning("%s at %s takes over client id %r: closing its earlier connection",
                        incoming.username, peer, incoming.client_id)
            await _close(current)
        if session is None or incoming.clean_session:
            await self._delete_session(incoming.client_id)
            session, session.parent = incoming, 0
        else:  # a persistent session resumed: the new CONNECT's will, keepalive and login replace the old
            for field in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                          "username", "password", "oak_admitted"):
                setattr(session, field, getattr(incoming, field))
            session.parent = 1
        if session.keep_alive > 0:
            session.keep_alive += self.config.get("timeout-disconnect-delay", 0) or 0
        return handler, session

    async def _create_server_instance(self, listener_name: str, listener_type: Any, address: str | None, port: int,
                                      ssl_context: ssl.SSLContext | None) -> Any:
        """amqtt's TCP listeners on a :class:`broker.gate.GatedSocket` (a per-source limit on connections
        not yet admitted), with the TLS handshake bounded by :data:`CONNECT_DEADLINE` (asyncio's default
        waits a minute)."""
        if listener_type != ListenerType.TCP:
            return await super()._create_server_instance(listener_name, listener_type, address, port, ssl_context)
        gate = GatedSocket.listen_on(address or "0.0.0.0", port, self.pending_per_source)
        self.gates.append(gate)
        return await asyncio.start_server(functools.partial(self.stream_connected, listener_name=listener_name),
                                          sock=gate, ssl=ssl_context,
                                          ssl_handshake_timeout=CONNECT_DEADLINE if ssl_context else None)

    async def _authenticate(self, session: Any, listener: Any) -> bool:
        """Answered once, in :meth:`_initialize_client_session`, before any session is touched."""
        return bool(getattr(session, "oak_admitted", False))

    def may_receive(self, session: Any, topic: str) -> bool | None:
        """Oak's topic rule, asked directly (no task per delivery)."""
        return permitted(session, topic, acl.RECEIVE)

    async def _topic_filtering(self, session: Any, topic: str, action: Action) -> bool:
        """Oak's topic rule, asked directly: amqtt runs every topic plugin as a task and waits for them,
        several turns of the event loop for every message published, which a loop busy with a burst made
        tens of milliseconds before a user's request even reached its subscriber."""
        return permitted(session, topic, ACTIONS[action])

    async def _handle_client_session(self, reader: Any, writer: Any, client_session: Any,
                                     handler: BrokerProtocolHandler, *args: Any) -> None:
        handler.__class__ = _Handler  # amqtt makes its own handler class in a classmethod; ours only adds a method
        await super()._handle_client_session(reader, writer, client_session, handler, *args)

    async def _handle_disconnect(self, client_session: Any, handler: BrokerProtocolHandler,
                                 disconnect_waiter: asyncio.Future[Any]) -> None:
        """Kept (on this connection's handler) for :meth:`_client_message_loop` to handle once the client's
        last messages are delivered."""
        handler.oak_left = disconnect_waiter  # type: ignore[attr-defined]

    async def _client_message_loop(self, client_session: Any, handler: BrokerProtocolHandler) -> None:
        """amqtt's loop, then the messages the client published before it left, then its leaving (the will).

        amqtt 0.12 stops reading a client's received messages the moment it disconnects: a script that
        publishes a burst and exits (``mosquitto_pub -l``) lost whatever was still queued, QoS 1 included,
        though every one had been acknowledged.
        """
        await super()._client_message_loop(client_session, handler)
        loop = asyncio.get_running_loop()
        queue = client_session.delivered_message_queue
        while not queue.empty():
            received: asyncio.Future[Any] = loop.create_future()
            received.set_result(queue.get_nowait())
            if not await self._handle_message_delivery(client_session, handler, received):
                break
        left = getattr(handler, "oak_left", None)
        if left is None:
            return
        handler.oak_left = None  # type: ignore[attr-defined]
        current = self._sessions.get(client_session.client_id)
        if current is not None and current[0] is client_session and current[1] is not handler:
            # This connection was taken over and its session lives on with the new one: only the connection
            # ends. Ending the session here (amqtt marks it disconnected) left the new connection deaf, and
            # the will said offline after the client had said online again.
            await self._stop_handler(handler)
            return
        await super()._handle_disconnect(client_session, handler, left)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Any) -> None:
        subscribers = self._subscriptions.get(subscription[0], ())
        if any(subscriber is session for subscriber, _ in subscribers):
            await super()._publish_retained_messages_for_subscription(subscription, session)


class EmbeddedBroker:
    """An amqtt broker with Oakling's authentication and topic rules; no anonymous access.

    ``async with EmbeddedBroker(Listeners(port=0), credentials) as broker: broker.port``
    """

    def __init__(self, listeners: Listeners, credentials: Credentials, keepalive_grace: int = KEEPALIVE_GRACE) -> None:
        self.listeners = listeners
        self.credentials = credentials
        self.keepalive_grace = keepalive_grace
        self._broker: _Broker | None = None
        self.port = listeners.port
        self.tls_port = listeners.tls_port

    def _config(self) -> dict[str, Any]:
        lst = self.listeners
        listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": f"{lst.plain_host or lst.host}:{lst.port}"}}
        if lst.tls_port is not None:
            listeners["tls"] = {
                "type": "tcp",
                "bind": f"{lst.host}:{lst.tls_port}",
                "ssl": True,
                "certfile": lst.certfile,
                "keyfile": lst.keyfile,
                "cafile": lst.cafile,
            }
        if lst.ws_port is not None:
            listeners["ws"] = {"type": "ws", "bind": f"{lst.plain_host or lst.host}:{lst.ws_port}"}  # plain, too
        return {
            "listeners": listeners,
            "timeout_disconnect_delay": self.keepalive_grace,
            "plugins": {
                "broker.plugins.OakAuthPlugin": {"credentials": self.credentials, "plain_admits": lst.plain_admits},
            },
        }

    async def __aenter__(self) -> EmbeddedBroker:
        self._broker = _Broker(self._config(), self.listeners.pending_per_source)
        await self._broker.start()
        self.port = self._bound("default")
        if self.listeners.tls_port is not None:
            self.tls_port = self._bound("tls")
        return self

    async def cut_off(self, username: str) -> int:
        """Close every connection logged in as *username* (revoked: its will goes out); how many."""
        assert self._broker is not None
        connected = [handler for session, handler in list(self._broker._sessions.values())
                     if session.username == username and session.transitions.is_connected()]
        for handler in connected:
            await _close(handler)
        return len(connected)

    def connected(self) -> int:
        """How many clients are connected now."""
        if self._broker is None:
            return 0
        return sum(1 for session, _ in list(self._broker._sessions.values()) if session.transitions.is_connected())

    def _bound(self, listener: str) -> int:
        assert self._broker is not None
        return int(self._broker._servers[listener].instance.sockets[0].getsockname()[1])

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
