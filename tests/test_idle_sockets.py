"""Idle sockets are closed: a connection that finishes no TLS handshake, or sends no CONNECT, within the
broker's deadline is dropped, and the broker keeps serving meanwhile (issue 20, embedded broker)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from broker import server
from broker.credentials import Credentials
from broker.server import EmbeddedBroker, Listeners
from broker.tier_ca import TierCa
from services.common.mqtt import BrokerUrl, MqttSession, tls_context
from services.common.store import Store

IDLE = 200  # per listener


async def _closed_by_peer(reader: asyncio.StreamReader, within: float) -> bool:
    """True when the broker closes the connection within *within* seconds."""
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def test_sockets_that_never_connect_are_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """200 sockets on the TLS port and 200 on the plain port send nothing: a user still logs in and is
    answered while they wait, and the broker closes every one of them after its deadline (1 s here)."""
    monkeypatch.setattr(server, "CONNECT_DEADLINE", 1.0)
    store = Store(tmp_path / "db.json")
    credentials = Credentials(store)
    await credentials.load()
    await credentials.set_password("alice", "alice-password")
    tier = TierCa.root(tmp_path)
    async with EmbeddedBroker(tier.listeners(Listeners("127.0.0.1", 0), [], plain_loopback=True), credentials) as b:
        assert b.tls_port is not None
        idle = [await asyncio.open_connection("127.0.0.1", port) for port in (b.tls_port, b.port)
                for _ in range(IDLE)]
        async with MqttSession(BrokerUrl("127.0.0.1", b.tls_port, tls=True), "alice-1", "alice", "alice-password",
                               tls=tls_context(tier.cafile), retry_first_connect=False) as alice:
            await alice.subscribe_confirmed("oak/api/alice/request/ping")
            alice.publish("oak/api/alice/request/ping", b"hello")
            assert (await alice.get(5)).payload == b"hello", "the broker serves while the idle sockets wait"
        closed = await asyncio.gather(*(_closed_by_peer(reader, 5.0) for reader, _ in idle))
        assert sum(closed) == len(idle), f"{len(idle) - sum(closed)} idle sockets still open"
        for _, writer in idle:
            writer.close()
    store.close()
