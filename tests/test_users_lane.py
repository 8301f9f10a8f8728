"""The users' lane (services/root/lane.py): ``services/list`` is answered on a loop of its own, never
behind the root's busy event loop, and a user still reads their own writes (issue 15, point 4). Each test
runs the lane both ways the root runs it: on a thread of its process (:class:`LaneThread`, with the
embedded broker) and as a process of its own (:class:`LaneProcess`, with mosquitto or a broker you run).

Real parts: the embedded broker on a loop of its own, the lane's thread or process, mosquitto clients. The
root's Api is a stand-in that holds its answers, so a test decides when the root's loop answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from broker.backend import BrokerSpec, open_broker
from broker.credentials import Credentials
from broker.server import Listeners
from services.common import channels
from services.common.inbox import Received
from services.common.loop_thread import LoopThread
from services.common.mqtt import BrokerUrl, MqttSession
from services.common.store import Store
from services.root.answers import listing, stamped
from services.root.lane import LaneThread, StatesBook, StatesChange
from services.root.lane_process import LENGTHS, MAX_HEAD, FrameError, LaneFailed, LaneProcess, frame, read_frame
from tests.conftest import messages, need_binary, subscribed
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


Lane = LaneThread | LaneProcess
NOTHING = StatesChange(float("-inf"), whole=True)  # what the root has published when it starts


@pytest.fixture(params=[LaneThread, LaneProcess], ids=["thread", "process"])
def lane_kind(request: pytest.FixtureRequest) -> type[Lane]:
    return request.param  # type: ignore[no-any-return]


@asynccontextmanager
async def lane_on_a_broker(tmp_path: Path, kind: type[Lane], published: StatesChange = NOTHING,
                           ) -> AsyncIterator[tuple[Lane, HeldApi, BrokerUrl]]:
    """A broker on its own loop with the user alice, and a lane of *kind* on it serving a :class:`HeldApi`."""
    credentials = Credentials(Store(tmp_path / "root.json"))
    await credentials.load()
    await credentials.set_password(*ALICE)
    api = HeldApi()
    async with open_broker(BrokerSpec(), Listeners(), credentials, tmp_path, ("root",), own_loop=True) as broker, \
            kind(broker.url, *broker.login("root"), api, lambda: published) as lane:
        yield lane, api, broker.url


async def publish(lane: Lane, *states: dict[str, Any]) -> None:
    """Have the root publish alice's *states*, and wait until the lane took them in."""
    change = StatesChange(time.monotonic(), {state["job_name"]: json.dumps(state).encode() for state in states},
                          {"alice": tuple(state["job_name"] for state in states)})
    lane.publish(change)
    await eventually(lambda: lane.applied >= change.taken_at)


async def test_services_list_is_answered_while_the_roots_loop_is_busy(tmp_path: Path, lane_kind: type[Lane]) -> None:
    """mosquitto_pub asks services/list while the root's loop is held for 3 s: the answer, the published
    states, arrives before the hold ends, and the root's Api never sees the request."""
    for binary in ("mosquitto_sub", "mosquitto_pub"):
        need_binary(binary)
    async with lane_on_a_broker(tmp_path, lane_kind) as (lane, api, url):
        await publish(lane, WEB)
        login = ["-V", "mqttv311", "-h", "127.0.0.1", "-p", str(url.port), "-u", ALICE[0], "-P", ALICE[1], "-q", "1"]
        answers = subscribed(["mosquitto_sub", *login, "-i", "alice-sub", "-C", "1", "-W", "30", "-F", "%U %p",
                              "-t", "oak/api/alice/response/services/list"])
        try:
            subprocess.run(["mosquitto_pub", *login, "-i", "alice-pub", "-t", "oak/api/alice/request/services/list",
                            "-m", json.dumps({"transaction": "t1"})], check=True, timeout=10)
            time.sleep(3)  # the root's loop (this one) is busy: nothing of it runs meanwhile
            held_until = time.time()
            [out] = messages(answers, 30)
        finally:
            end(answers)
    at, payload = out.split(" ", 1)
    answer = json.loads(payload)
    assert float(at) < held_until, "answered while the root's loop was held"
    assert answer["ok"]
    assert answer["data"] == [WEB]
    assert answer["transaction"] == "t1"
    assert api.taken == [], "the root's loop was not asked"


async def test_a_user_reads_their_own_writes(tmp_path: Path, lane_kind: type[Lane]) -> None:
    """A services/list behind a user's write waits for the root with it, in order; after the root
    answered, it goes to the root until the root has published its states again, then the lane answers."""
    async with lane_on_a_broker(tmp_path, lane_kind) as (lane, api, url):
        await publish(lane, WEB)
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

                await publish(lane, {**WEB, "job_name": "db"}, WEB)
                alice.publish("oak/api/alice/request/services/list", b"{}")
                await eventually(lambda: len(got) == 4)
                assert got[3] == ("services", [{**WEB, "job_name": "db"}, WEB]), "answered by the lane"
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


async def test_a_lane_process_that_dies_is_replaced(tmp_path: Path) -> None:
    """kill -9 of the lane's process: the root starts another a second later, which begins with the
    states as the root last published them and answers services/list from them, not from the root."""
    published = StatesChange(time.monotonic(), {"web": json.dumps(WEB).encode()}, {"alice": ("web",)}, whole=True)
    async with lane_on_a_broker(tmp_path, LaneProcess, published) as (lane, api, url):
        assert isinstance(lane, LaneProcess)
        supervising = asyncio.create_task(lane.run())
        try:
            first = lane.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            await eventually(lambda: lane.pid not in (None, first) and lane.applied >= published.taken_at, 30)
            assert await ask_list(url) == [WEB]
            assert api.taken == [], "answered by the new lane, from the states it began with"
        finally:
            supervising.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervising


async def test_the_lane_process_ends_with_its_root(tmp_path: Path) -> None:
    """The lane's process outlives nothing: when the root's end of the socket closes (the root stopped, or
    was killed), it disconnects and exits 0."""
    async with lane_on_a_broker(tmp_path, LaneProcess) as (lane, api, url):
        assert isinstance(lane, LaneProcess)
        assert lane._life is not None
        life = lane._life
        life.writer.close()
        assert await asyncio.wait_for(life.process.wait(), 10) == 0


async def ask_list(url: BrokerUrl) -> Any:
    """alice's services/list, as a client asks it."""
    async with MqttSession(url, "alice-ask", *ALICE) as alice:
        await alice.subscribe_confirmed("oak/api/alice/response/services/list")
        alice.publish("oak/api/alice/request/services/list", b"{}")
        async for message in alice.messages():
            return json.loads(message.payload)["data"]


def test_a_states_book_keeps_what_each_publication_changed() -> None:
    """The lane's copy of the published states: a whole publication replaces it, a change puts states and
    replaces an owner's list (dropping the services no longer in it), and one never published is left out."""
    book = StatesBook()
    web, db, api, web2 = b'{"job_name":"web"}', b'{"job_name":"db"}', b'{"job_name":"api"}', b'{"job_name":"web2"}'
    book.apply(StatesChange(1.0, {"s1": web, "s2": db}, {"alice": ("s2", "s1"), "bob": ("s3",)}, whole=True))
    assert book.ready
    assert book.taken_at == 1.0
    assert book.listed("alice") == [db, web]
    assert book.listed("bob") == [], "s3 was never published"
    book.apply(StatesChange(2.0, {"s3": api, "s1": web2}, {"alice": ("s1",), "bob": ("s3",)}))
    assert book.listed("alice") == [web2], "db was deleted"
    assert book.listed("bob") == [api]
    book.apply(StatesChange(3.0, lists={"bob": ()}))
    assert book.listed("bob") == []
    assert book.listed("alice") == [web2]
    book.apply(StatesChange(4.0, {"s9": web}, {"carol": ("s9",)}, whole=True))
    assert book.listed("alice") == [], "a whole publication replaces all"
    assert book.listed("carol") == [web]


def test_a_listing_is_the_answer_the_root_would_give() -> None:
    """The lane joins the states' JSON into its answer: it reads as the root's own answer does."""
    states = [{"job_name": "web", "instances": [{"number": 0}]}, {"job_name": "db", "instances": []}]
    for transaction in ("t1", None):
        answer = json.loads(listing([json.dumps(s).encode() for s in states], transaction))
        expected = stamped({"ok": True, "data": states}, transaction)
        assert abs(answer.pop("ts") - expected.pop("ts")) < 5
        assert answer == expected
    assert json.loads(listing([], None))["data"] == []


async def test_frames_are_read_back_and_bad_ones_refused() -> None:
    """What the root and its lane process say to each other: a frame comes back as written; one over the
    limits, with a head that is not JSON or has no type, or cut short is a FrameError; a clean end is None."""

    async def read(data: bytes) -> Any:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_frame(reader)

    assert await read(frame({"t": "answer", "at": 1.5}, b"\x00payload")) == ({"t": "answer", "at": 1.5}, b"\x00payload")
    assert await read(b"") is None
    for bad in (LENGTHS.pack(MAX_HEAD + 1, 0), LENGTHS.pack(2, 0) + b"{x", LENGTHS.pack(2, 0) + b"[]",
                frame({"t": "ready"})[:-1], LENGTHS.pack(0, 0)[:3]):
        with pytest.raises(FrameError):
            await read(bad)


async def test_a_lane_process_that_cannot_serve_says_so(tmp_path: Path) -> None:
    """A lane process the broker refuses ends before it serves: starting it raises, pointing at its log."""
    credentials = Credentials(Store(tmp_path / "root.json"))
    await credentials.load()
    async with open_broker(BrokerSpec(), Listeners(), credentials, tmp_path, ("root",), own_loop=True) as broker:
        with pytest.raises(LaneFailed, match="did not start serving"):
            async with LaneProcess(broker.url, "root", "not-the-password", HeldApi(), lambda: NOTHING):
                pass
