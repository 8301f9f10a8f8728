"""The embedded broker's indexed routing: exact filters by look-up, wildcards matched, amqtt's delivery rules."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from amqtt.broker import Broker

from broker.credentials import Credentials
from broker.routing import IndexedRouting
from broker.server import EmbeddedBroker, Listeners
from services.common.mqtt import BrokerUrl, MqttSession
from services.common.store import Store


class Filters(IndexedRouting):
    """Just the filter index, over a plain dict of subscriptions."""

    _matches = Broker._matches
    logger = logging.getLogger(__name__)

    def __init__(self, filters: list[str]) -> None:
        self._subscriptions: dict[str, list[Any]] = {f: [] for f in filters}


@pytest.mark.parametrize(("topic", "want"), [
    ("oak/nodes/w1/down/desired", ["oak/nodes/w1/down/desired", "oak/nodes/+/down/desired", "oak/#"]),
    ("oak/nodes/w2/down/desired", ["oak/nodes/+/down/desired", "oak/#"]),
    ("oak/nodes/w1/down/cmd/logs", ["oak/nodes/w1/down/cmd/+", "oak/#"]),
    ("oak", ["oak/#"]),
    ("other/topic", []),
    ("$SYS/x", []),
])
def test_matching_filters(topic: str, want: list[str]) -> None:
    """Exactly the filters MQTT says match, exact ones first."""
    index = Filters(["oak/nodes/w1/down/desired", "oak/nodes/w1/down/cmd/+", "oak/nodes/+/down/desired",
                     "oak/#", "oak/nodes/w3/down/desired", "#/bad"])
    found = list(index.matching_filters(topic))
    assert sorted(found) == sorted(want)
    assert found[:1] == [f for f in want if f == topic][:1] or topic not in want, "the exact filter comes first"


def test_the_wildcard_index_is_rebuilt_when_invalidated() -> None:
    """A wildcard filter added after the index was built is found once the index is invalidated."""
    index = Filters(["a/b"])
    assert list(index.matching_filters("a/b")) == ["a/b"]
    index._subscriptions["a/+"] = []
    index._wild = None
    assert list(index.matching_filters("a/b")) == ["a/b", "a/+"]
    index._subscriptions["+/b"] = []
    assert list(index.matching_filters("a/b")) == ["a/b", "a/+"], "until invalidated"
    index._wild = None
    assert list(index.matching_filters("a/b")) == ["a/b", "+/b", "a/+"]


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[EmbeddedBroker]:
    """An embedded broker with one user, alice."""
    creds = Credentials(Store(tmp_path / "db.json"))
    await creds.load()
    await creds.set_password("alice", "pw")
    async with EmbeddedBroker(Listeners(port=0), creds) as b:
        yield b


async def test_delivery_through_exact_and_wildcard_filters(broker: EmbeddedBroker) -> None:
    """A subscriber gets a message once per matching filter; unrelated topics are not delivered; retained
    messages reach later subscribers of exact and wildcard filters; the counters count."""
    url = BrokerUrl("127.0.0.1", broker.port)
    async with MqttSession(url, "alice-a", "alice", "pw") as sub, MqttSession(url, "alice-b", "alice", "pw") as pub:
        await sub.subscribe_confirmed("oak/api/alice/request/apps/x", "oak/api/alice/request/apps/+")
        pub.publish("oak/api/alice/request/apps/r", b"retained", retain=True)
        pub.publish("oak/api/alice/request/apps/x", b"hello")
        got = [await sub.get(5) for _ in range(3)]
        assert sorted((m.topic, m.payload) for m in got) == [
            ("oak/api/alice/request/apps/r", b"retained"), ("oak/api/alice/request/apps/x", b"hello"),
            ("oak/api/alice/request/apps/x", b"hello")]
        with pytest.raises(TimeoutError):
            await sub.get(0.3)
        async with MqttSession(url, "alice-c", "alice", "pw") as late:
            await late.subscribe_confirmed("oak/api/alice/request/apps/r", "oak/api/alice/request/apps/+")
            got = [await late.get(5), await late.get(5)]
            assert {(m.topic, m.payload, m.retain) for m in got} == {
                ("oak/api/alice/request/apps/r", b"retained", True)}
            with pytest.raises(TimeoutError):
                await late.get(0.3)
    stats = broker._broker.stats()  # type: ignore[union-attr]
    assert stats["published"] >= 2
    assert stats["delivered"] >= 2


async def test_a_gone_session_takes_only_its_own_filters(broker: EmbeddedBroker) -> None:
    """When a clean session ends, its filters go (wildcards leave the index); others' stay."""
    url = BrokerUrl("127.0.0.1", broker.port)
    amqtt = broker._broker
    assert amqtt is not None
    async with MqttSession(url, "alice-stay", "alice", "pw") as stay:
        await stay.subscribe_confirmed("oak/api/alice/request/apps/shared")
        async with MqttSession(url, "alice-go", "alice", "pw") as go:
            await go.subscribe_confirmed("oak/api/alice/request/apps/shared", "oak/api/alice/request/apps/+")
            assert "oak/api/alice/request/apps/+" in amqtt._wildcards()[("oak", "api", "alice", "request", "apps")]
        for _ in range(40):  # amqtt drops ended clean sessions once a second
            await asyncio.sleep(0.1)
            if "oak/api/alice/request/apps/+" not in amqtt._subscriptions:
                break
        assert set(amqtt._subscriptions) >= {"oak/api/alice/request/apps/shared"}
        assert "oak/api/alice/request/apps/+" not in amqtt._subscriptions
        indexed = sorted(f for filters in amqtt._wildcards().values() for f in filters)
        assert indexed == sorted(f for f in amqtt._subscriptions if "+" in f or "#" in f)
        assert [s.client_id for s, _ in amqtt._subscriptions["oak/api/alice/request/apps/shared"]] == ["alice-stay"]


def _packet(kind: int, body: bytes) -> bytes:
    """An MQTT 3.1.1 packet: fixed header (remaining length under 128 bytes) and *body*."""
    assert len(body) < 128
    return bytes([kind, len(body)]) + body


def _text(value: str) -> bytes:
    raw = value.encode()
    return len(raw).to_bytes(2, "big") + raw


async def test_a_delivery_acknowledged_too_late_is_counted_not_logged(
        broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture) -> None:
    """A subscriber that never sends its PUBACK (as a busy loop sends it after amqtt's 5 s): the delivery
    is counted as late, and neither amqtt's traceback nor its warnings reach the log."""
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    login = _text("alice-mute") + _text("alice") + _text("pw")
    connect = _text("MQTT") + bytes([4, 0xC2]) + (60).to_bytes(2, "big") + login
    writer.write(_packet(0x10, connect))
    assert (await asyncio.wait_for(reader.readexactly(4), 5)) == b"\x20\x02\x00\x00"  # CONNACK, accepted
    writer.write(_packet(0x82, (1).to_bytes(2, "big") + _text("oak/api/alice/request/apps/x") + b"\x01"))
    assert (await asyncio.wait_for(reader.readexactly(5), 5))[:1] == b"\x90"  # SUBACK
    amqtt = broker._broker
    assert amqtt is not None
    caplog.set_level(logging.INFO)
    async with MqttSession(BrokerUrl("127.0.0.1", broker.port), "alice-b", "alice", "pw") as pub:
        pub.publish("oak/api/alice/request/apps/x", b"hello")
        first = await asyncio.wait_for(reader.read(1), 5)
        assert first[0] >> 4 == 3  # the PUBLISH arrived; no PUBACK is sent
        for _ in range(80):
            await asyncio.sleep(0.1)
            if amqtt.stats()["late_acks"]:
                break
    assert amqtt.stats()["late_acks"] == 1
    noisy = [r for r in caplog.records if r.name.startswith("amqtt") and r.levelno >= logging.WARNING]
    assert noisy == [], [r.getMessage() for r in noisy]
    writer.close()
