"""Measures round-trip times to peer workers over UDP and keeps this worker's Vivaldi coordinate.

Every worker answers pings on its probe address (advertised in its node info) with its current
coordinate; once a second it pings one random peer (the cluster tells it who they are) and updates
its own coordinate from the measured RTT. The coordinate goes out in the node's state, so the
schedulers can estimate the latency between any two workers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import Any

from services.common.vivaldi import Coordinate, update

log = logging.getLogger(__name__)
INTERVAL = 1.0


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, prober: Prober) -> None:
        self.prober = prober
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            message = json.loads(data)
            if message.get("op") == "ping":
                reply = {"op": "pong", "t": message["t"], "coord": self.prober.coord.to_list()}
                if self.transport:
                    self.transport.sendto(json.dumps(reply).encode(), addr)
            elif message.get("op") == "pong":
                rtt = (time.monotonic() - float(message["t"])) * 1000
                self.prober.observe(Coordinate.from_list(message["coord"]), rtt)
        except (ValueError, KeyError, TypeError):
            log.debug("ignoring a bad probe from %s", addr)


class Prober:
    """This worker's end of latency measurement."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, interval: float = INTERVAL) -> None:
        self.host, self.port, self.interval = host, port, interval
        self.coord = Coordinate()
        self.peers: dict[str, tuple[str, int]] = {}
        self.samples = 0
        self._protocol: _Protocol | None = None

    @property
    def address(self) -> str:
        """``host:port`` peers reach this worker's prober at."""
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        """Bind the UDP socket (an ephemeral port when 0)."""
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(lambda: _Protocol(self),
                                                                  local_addr=(self.host, self.port))
        self._protocol = protocol
        self.port = transport.get_extra_info("sockname")[1]

    def set_peers(self, peers: list[Any]) -> None:
        """The other workers of the cluster: ``[{"name": ..., "probe": "host:port"}]``."""
        parsed = {}
        for peer in peers:
            if not isinstance(peer, dict):
                continue
            host, _, port = str(peer.get("probe", "")).rpartition(":")
            if host and port.isdigit():
                parsed[str(peer.get("name"))] = (host, int(port))
        self.peers = parsed

    def observe(self, remote: Coordinate, rtt_ms: float) -> None:
        """Learn from one RTT sample."""
        self.coord = update(self.coord, remote, max(rtt_ms, 0.001))
        self.samples += 1

    async def run(self) -> None:
        """Ping a random peer every interval, until cancelled."""
        if self._protocol is None:
            await self.start()
        while True:
            await asyncio.sleep(self.interval)
            if self.peers and self._protocol and self._protocol.transport:
                address = random.choice(list(self.peers.values()))
                ping = {"op": "ping", "t": time.monotonic()}
                self._protocol.transport.sendto(json.dumps(ping).encode(), address)

    def close(self) -> None:
        """Release the socket."""
        if self._protocol and self._protocol.transport:
            self._protocol.transport.close()
