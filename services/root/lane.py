"""The users' lane: their requests come in on a thread of their own, and ``services/list`` is answered there.

The root's event loop places instances, takes in the clusters' states and serves every write; during a burst
of ten thousand instances it is busy for seconds at a time, and a user's request that waited for it waited
that long. The lane is the users' connection on an event loop of its own (:class:`LoopThread`): it answers
``services/list`` from the services' states the root last published (the documents of
``oak/api/<user>/state/services/<job>``, which the root hands over whole after each publication), and hands
every other request to the root's loop (:class:`Api`), whose answer it sends.

A user reads their own writes: while one of their requests waits for the root, and until the root has
published its states again after it answered their last one, their ``services/list`` goes to the root too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from services.common import channels
from services.common.channels import Channel
from services.common.inbox import Inbox, Received
from services.common.loop_thread import LoopThread
from services.common.mqtt import BrokerUrl, MqttSession
from services.root.api import Api, ApiError, one_less, request_body, stamped, transaction_of
from services.root.views import PublishedStates

ANSWERED_HERE = frozenset({("services", "list")})  # what the lane answers from the published states


class UsersLane:
    """The users' connection (client id ``root-api``), on a thread of its own."""

    def __init__(self, url: BrokerUrl, username: str, password: str, api: Api) -> None:
        self.api = api
        self._login = (url, username, password)
        self.session: MqttSession | None = None  # made on the lane's loop, which it belongs to
        self.thread = LoopThread("users", self._serving)
        self.states: PublishedStates | None = None  # replaced by the root's loop (publish)
        self._root: asyncio.AbstractEventLoop | None = None
        self._waiting: Counter[str] = Counter()  # each user's requests handed to the root and not answered
        self._answered: dict[str, float] = {}  # when the root's last answer to each user was sent (monotonic)
        self._handed = 0  # requests handed to the root (counted here) ...
        self._begun = 0  # ... and begun there (counted there): the difference waits for the root's loop

    async def __aenter__(self) -> UsersLane:
        self._root = asyncio.get_running_loop()
        await self.thread.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.thread.__aexit__(None, None, None)

    def publish(self, states: PublishedStates) -> None:
        """The root published its services' states (called on the root's loop)."""
        self.states = states

    @property
    def backlog(self) -> int:
        """Requests received and not yet begun by the root (for its ``busy`` answers)."""
        return (self.session.backlog if self.session else 0) + self._handed - self._begun

    @contextlib.asynccontextmanager
    async def _serving(self) -> AsyncIterator[None]:
        inbox = Inbox()
        inbox.on(channels.API_REQUEST, self._take)
        url, username, password = self._login
        async with MqttSession(url, "root-api", username, password) as session:
            self.session = session
            await inbox.subscribe(session)
            async with asyncio.TaskGroup() as tasks:
                reading = tasks.create_task(inbox.run(session))
                yield
                reading.cancel()

    async def _take(self, request: Received[bytes]) -> None:
        names = request.names
        user = names["user"]
        data = self._listed(user, request) if (names["resource"], names["action"]) in ANSWERED_HERE else None
        if data is None:
            self._waiting[user] += 1
            self._handed += 1
            assert self._root is not None
            asyncio.run_coroutine_threadsafe(self._hand_over(_Answers(self, user), request), self._root)
            return
        answer, transaction = data
        assert self.session is not None
        self.session.send(channels.API_RESPONSE, stamped({"ok": True, "data": answer}, transaction), **names)

    def _listed(self, user: str, request: Received[bytes]) -> tuple[list[Any], str | None] | None:
        """The answer to *user*'s ``services/list``, and its transaction, from the published states; None
        when the root must answer it (it filters, is not fresh enough for this user, or is malformed)."""
        states = self.states
        if states is None or self._waiting[user] or self._answered.get(user, -1.0) >= states.taken_at:
            return None
        try:
            body = request_body(request.message.payload)
        except ApiError:
            return None
        if not isinstance(body, dict) or body.get("app") is not None:
            return None
        return list(states.by_user.get(user, ())), transaction_of(body)

    async def _hand_over(self, answers: _Answers, request: Received[bytes]) -> None:
        """On the root's loop: queue the request for the :class:`Api`."""
        self._begun += 1
        await self.api.take(answers, request)

    def _sent(self, user: str, names: dict[str, str], data: Mapping[str, Any] | bytes) -> None:
        """On the lane's loop: the root answered one of *user*'s requests; send it."""
        one_less(self._waiting, user)
        self._answered[user] = time.monotonic()
        assert self.session is not None
        self.session.send(channels.API_RESPONSE, data, **names)


@dataclass(frozen=True)
class _Answers:
    """Where the :class:`Api` sends the answer to a request the lane handed over: back to the lane."""

    lane: UsersLane
    user: str

    @property
    def backlog(self) -> int:
        """See :attr:`UsersLane.backlog`."""
        return self.lane.backlog

    def send(self, channel: Channel[Any], data: Mapping[str, Any] | bytes, src: str = "", **names: str) -> None:
        """Send the answer on the lane's connection (only answers come here)."""
        assert channel is channels.API_RESPONSE
        self.lane.thread.call(self.lane._sent, self.user, names, data)
