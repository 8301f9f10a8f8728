"""The users' lane (services/root/lane.py): ``services/list`` is answered on a thread of its own, never
behind the root's busy event loop, and a user still reads their own writes (issue 15, point 4).

Real parts: the embedded broker on a loop of its own, the lane's thread, mosquitto clients. The root's Api
is a stand-in that holds its answers, so a test decides when the root's loop answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from broker.backend import BrokerSpec, open_broker
from broker.credentials import Credentials
from broker.server import Listeners
from services.common import channels
from services.common.inbox import Received
from services.common.loop_thread import LoopThread
from services.common.mqtt import MqttSession
from services.common.store import Store
from services.root.lane import UsersLane
from services.root.views import PublishedStates
from tests.conftest import need_binary
from tests.stack import end, eventually

ALICE = ("alice", "alice-password-1")
WEB = {"job_name": "web", "status": "RUNNING", "instances": []}


class HeldApi:
    """The root's Api, as the lane sees it: takes requests on the root's loop and answers when told."""

    def __init__(self) -> None:
        self.taken: list[tuple[str, Any]] = []
        self._held: list[tuple[Any, Received[bytes]]] = []
        self.arrived = asyncio.Event()

    async def take(self, answers: Any, request: Received[bytes]) -> None:
        self.taken.append((f"{request.names['resource']}/{request.names['action']}", answers.backlog))
        self._held.append((answers, request))
        self.arrived.set()

    def answer_all(self) -> None:
        for answers, request in self._held:
            answers.send(channels.API_RESPONSE, {"ok": True, "data": "from the root"}, **request.names)
        self._held.clear()


@asynccontextmanager
async def lane_on_a_broker(tmp_path: Path) -> AsyncIterator[tuple[UsersLane, HeldApi, int]]:
    """A broker on its own loop with the user alice, and a lane on it serving a :class:`HeldApi`."""
    credentials = Credentials(Store(tmp_path / "root.json"))
    await credentials.load()
    await credentials.set_password(*ALICE)
    api = HeldApi()
    async with open_broker(BrokerSpec(), Listeners(), credentials, tmp_path, ("root",), own_loop=True) as broker, \
            UsersLane(broker.url, *broker.login("root"), api) as lane:  # type: ignore[arg-type]
        yield lane, api, broker.url.port


def published(*states: dict[str, Any]) -> PublishedStates:
    return PublishedStates(time.monotonic(), MappingProxyType({"alice": states}))


async def test_services_list_is_answered_while_the_roots_loop_is_busy(tmp_path: Path) -> None:
    """mosquitto_pub asks services/list while the root's loop is held for 3 s: the answer, the published
    states, arrives before the hold ends, and the root's Api never sees the request."""
    for binary in ("mosquitto_sub", "mosquitto_pub"):
        need_binary(binary)
    async with lane_on_a_broker(tmp_path) as (lane, api, port):
        lane.publish(published(WEB))
        login = ["-V", "mqttv311", "-h", "127.0.0.1", "-p", str(port), "-u", ALICE[0], "-P", ALICE[1], "-q", "1"]
        answers = subprocess.Popen(["mosquitto_sub", *login, "-i", "alice-sub", "-C", "1", "-W", "30", "-F", "%U %p",
                                    "-t", "oak/api/alice/response/services/list"], stdout=subprocess.PIPE, text=True)
        try:
            await asyncio.sleep(1)  # subscribed
            subprocess.run(["mosquitto_pub", *login, "-i", "alice-pub", "-t", "oak/api/alice/request/services/list",
                            "-m", json.dumps({"transaction": "t1"})], check=True, timeout=10)
            time.sleep(3)  # the root's loop (this one) is busy: nothing of it runs meanwhile
            held_until = time.time()
            out, _ = answers.communicate(timeout=30)
        finally:
            end(answers)
    at, payload = out.strip().split(" ", 1)
    answer = json.loads(payload)
    assert float(at) < held_until, "answered while the root's loop was held"
    assert answer["ok"]
    assert answer["data"] == [WEB]
    assert answer["transaction"] == "t1"
    assert api.taken == [], "the root's loop was not asked"


async def test_a_user_reads_their_own_writes(tmp_path: Path) -> None:
    """A services/list behind a user's write waits for the root with it, in order; after the root
    answered, it goes to the root until the root has published its states again, then the lane answers."""
    async with lane_on_a_broker(tmp_path) as (lane, api, port):
        lane.publish(published(WEB))
        url = lane._login[0]
        async with MqttSession(url, "alice-test", *ALICE) as alice:
            await alice.subscribe_confirmed("oak/api/alice/response/#")
            got: list[tuple[str, Any]] = []

            async def read() -> None:
                async for message in alice.messages():
                    got.append((message.topic.rsplit("/", 2)[-2:][0], json.loads(message.payload)["data"]))

            reader = asyncio.create_task(read())
            try:
                alice.publish("oak/api/alice/request/apps/create", b"{}")
                alice.publish("oak/api/alice/request/services/list", b"{}")
                await asyncio.wait_for(_taken(api, 2), 10)
                assert [what for what, _ in api.taken] == ["apps/create", "services/list"], \
                    "the list waited for the root behind the write"
                assert got == [], "nothing answered before the root did"
                api.answer_all()
                await eventually(lambda: len(got) == 2)
                assert got == [("apps", "from the root"), ("services", "from the root")]

                alice.publish("oak/api/alice/request/services/list", b"{}")
                await asyncio.wait_for(_taken(api, 3), 10)  # the states were published before the root answered
                api.answer_all()
                await eventually(lambda: len(got) == 3)

                lane.publish(published(WEB, {**WEB, "job_name": "db"}))
                alice.publish("oak/api/alice/request/services/list", b"{}")
                await eventually(lambda: len(got) == 4)
                assert got[3] == ("services", [WEB, {**WEB, "job_name": "db"}]), "answered by the lane"
                alice.publish("oak/api/alice/request/services/list", dumps_app("a"))
                await asyncio.wait_for(_taken(api, 4), 10)
                assert api.taken[3][0] == "services/list", "a filtered list is the root's to answer"
            finally:
                reader.cancel()


def dumps_app(app: str) -> bytes:
    return json.dumps({"app": app}).encode()


async def _taken(api: HeldApi, count: int) -> None:
    while len(api.taken) < count:
        api.arrived.clear()
        await api.arrived.wait()


async def test_a_loop_thread_that_cannot_start_says_why() -> None:
    """What its thread's serving raises while starting is raised where it was started."""

    @asynccontextmanager
    async def failing() -> AsyncIterator[None]:
        raise OSError("port taken")
        yield

    with pytest.raises(OSError, match="port taken"):
        async with LoopThread("failing", failing):
            pass


async def test_a_loop_thread_stops_cleanly_after_its_watcher_was_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tier cancels what waits for :meth:`LoopThread.ended` before it stops the thread (as at Ctrl-C):
    the thread still ends without an error."""
    raised: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))

    @asynccontextmanager
    async def idle() -> AsyncIterator[None]:
        yield

    async with LoopThread("idle", idle) as thread:
        watcher = asyncio.create_task(thread.ended())
        await asyncio.sleep(0.05)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    assert raised == [], "the thread raised as it ended"
