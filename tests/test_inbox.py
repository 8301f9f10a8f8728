"""The typed inbox: decoding at the edge, bad input dropped with one line, and lanes that take turns."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.common import channels, envelope
from services.common.inbox import Inbox, Received
from services.common.models import NodeInfo
from services.common.mqtt import Message
from tests.fakes import FakeSession


class Feed(FakeSession):
    """A session whose incoming messages are the ones given, then nothing."""

    def __init__(self, messages: list[Message]) -> None:
        super().__init__()
        self.incoming: asyncio.Queue[Message] = asyncio.Queue()
        for message in messages:
            self.incoming.put_nowait(message)

    async def subscribe_confirmed(self, *filters: str) -> None:
        pass

    async def messages(self) -> AsyncIterator[Message]:
        while True:
            yield await self.incoming.get()

    @property
    def backlog(self) -> int:  # type: ignore[override]
        return self.incoming.qsize()


async def test_a_users_request_does_not_wait_for_the_clusters_backlog() -> None:
    """200 cluster messages of 5 ms each are queued before one user request: in a lane of its own the
    request is handled after at most one of them, not after all 200 (one second)."""
    handled: list[str] = []
    answered = asyncio.Event()

    async def cluster_state(state: Received[Any]) -> None:
        time.sleep(0.005)  # handling a cluster's state holds the loop
        handled.append("state")

    async def request(request: Received[bytes]) -> None:
        handled.append("request")
        answered.set()

    state = envelope.encode("cluster.state", {"nodes": {}, "instances": {}}, "c")
    queued = [Message(channels.CLUSTER_STATE.topic(cluster="c1"), state, False, 1)] * 200
    session = Feed([*queued, Message(channels.API_REQUEST.topic(user="u", resource="apps", action="list"), b"{}",
                                     False, 1)])
    inbox = Inbox()
    inbox.on(channels.CLUSTER_STATE, cluster_state)
    inbox.on(channels.API_REQUEST, request, lane="users")
    running = asyncio.create_task(inbox.run(session))  # type: ignore[arg-type]
    await asyncio.wait_for(answered.wait(), 5)
    assert handled.index("request") <= 2, f"the request waited for {handled.index('request')} cluster messages"
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


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
