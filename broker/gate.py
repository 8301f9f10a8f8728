"""A listening socket that turns away a source address holding too many connections not yet admitted.

Before a client is admitted (its TLS handshake done and its CONNECT accepted) it is anonymous: a single
address could open thousands of such connections and hold the broker's file descriptors and memory
until the deadline closes them. The gate counts, per source address, the connections accepted and not
yet admitted and still open; over :data:`PENDING_PER_SOURCE` it closes a new one at once, before any
TLS or MQTT work, and logs that source once per burst. Admitted connections do not count: a thousand
workers behind one NAT address are fine once they are in.

asyncio calls ``accept()`` on the very socket object it is given, which makes this the one place
that sees a connection before the TLS handshake (:class:`broker.server.EmbeddedBroker`).
"""

from __future__ import annotations

import logging
import socket
from typing import Any

log = logging.getLogger(__name__)

PENDING_PER_SOURCE = 128
SWEEP_EVERY = 1024  # accepts between two sweeps of closed connections


class GatedSocket(socket.socket):
    """A listening TCP socket applying the per-source limit on connections not yet admitted."""

    def __init__(self, *args: Any, limit: int = PENDING_PER_SOURCE, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit = limit
        self._pending: dict[str, list[socket.socket]] = {}
        self._turned_away: set[str] = set()
        self._accepted = 0

    @classmethod
    def listen_on(cls, host: str, port: int, limit: int = PENDING_PER_SOURCE) -> GatedSocket:
        """A non-blocking listening socket bound to *host*:*port* (0: any free port)."""
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = cls(family, kind, proto, limit=limit)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(1024)
        listener.setblocking(False)
        return listener

    def accept(self) -> tuple[socket.socket, Any]:
        """The next connection; one over its source's limit is closed and the next one is tried."""
        while True:
            conn, address = super().accept()
            source = str(address[0])
            self._accepted += 1
            if self._accepted % SWEEP_EVERY == 0:
                self._sweep()
            pending = [c for c in self._pending.get(source, ()) if c.fileno() != -1]
            if len(pending) < self.limit:
                self._pending[source] = [*pending, conn]
                self._turned_away.discard(source)
                return conn, address
            self._pending[source] = pending
            if source not in self._turned_away:
                self._turned_away.add(source)
                log.warning("%s holds %d connections that are not logged in: closing its new ones until it "
                            "has fewer", source, len(pending))
            conn.close()

    def _sweep(self) -> None:
        """Forget the connections that are closed, and the sources left with none."""
        for source in list(self._pending):
            self._pending[source] = [c for c in self._pending[source] if c.fileno() != -1]
            if not self._pending[source]:
                del self._pending[source]

    def admitted(self, source: str, fileno: int) -> None:
        """The connection *fileno* from *source* logged in: it no longer counts."""
        kept = [c for c in self._pending.get(source, ()) if c.fileno() not in (-1, fileno)]
        if kept:
            self._pending[source] = kept
        else:
            self._pending.pop(source, None)
