"""The typed inbox: decoding at the edge, bad input dropped with one line naming the sender."""

from __future__ import annotations

import pytest

from services.common import channels, envelope
from services.common.inbox import Inbox, Received
from services.common.models import NodeInfo
from services.common.mqtt import Message
from tests.fakes import FakeSession


async def test_bad_input_is_dropped_and_a_childs_bad_retained_message_cleared(caplog: pytest.LogCaptureFixture) -> None:
    """A worker's info with a string for a number is one log line naming the worker and the field; its
    retained copy is cleared; the next good message is handled."""
    got: list[NodeInfo] = []

    async def info(message: Received[NodeInfo]) -> None:
        assert message.body is not None
        got.append(message.body)

    topic = channels.NODE_INFO.topic(node="w1")
    bad = envelope.encode("node.info", {"name": "w1", "cpu_cores": "x", "memory_mb": 1, "runtimes": []}, "w")
    good = envelope.encode("node.info", {"name": "w1", "cpu_cores": 2, "memory_mb": 1, "runtimes": []}, "w")
    session = FakeSession()
    inbox = Inbox()
    inbox.on(channels.NODE_INFO, info)
    await inbox.deliver(session, Message(topic, bad, True, 1))  # type: ignore[arg-type]
    await inbox.deliver(session, Message(topic, good, True, 1))  # type: ignore[arg-type]
    assert [i.cpu_cores for i in got] == [2]
    assert session.published == [(topic, b"")], "the bad retained message is cleared"
    lines = [r.getMessage() for r in caplog.records if "dropped a bad message" in r.getMessage()]
    assert len(lines) == 1
    assert "from node w1" in lines[0]
    assert "NodeInfo.cpu_cores: expected a number" in lines[0]
