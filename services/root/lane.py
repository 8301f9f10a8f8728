"""The users' lane: their requests come in on a connection and an event loop of their own, and
``services/list`` is answered there.

The root's event loop places instances, takes in the clusters' states and serves every write; during a burst
of ten thousand instances it is busy for seconds at a time, and a user's request that waited for it waited
that long. The lane is the users' connection (client id ``root-api``) on an event loop of its own: it
answers ``services/list`` from the services' states the root last published (the documents of
``oak/api/<user>/state/services/<job>``, which the root hands it as :class:`StatesChange` after each
publication), and hands every other request to the root's :class:`~services.root.api.Api`, whose answer
it sends.

A user reads their own writes: while one of their requests waits for the root, and until the root has
published its states again after it answered their last one, their ``services/list`` goes to the root too.

Where it runs depends on where the broker runs. With the embedded broker every message passes through the
root's process anyway, so the lane is a thread there (:class:`LaneThread`, no second interpreter to pay
for). With a broker in a process of its own (``--broker mosquitto``, or one you run) the lane is a process
of its own too (services/root/lane_process.py), and a user's ``services/list`` then never waits for the
root's interpreter at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from services.common import channels
from services.common.channels import Channel
from services.common.inbox import Inbox, Received
from services.common.loop_thread import LoopThread
from services.common.mqtt import BrokerUrl, MqttSession
from services.root.answers import ApiError, listing, one_less, request_body, transaction_of

if TYPE_CHECKING:
    from services.root.api import Replies

ANSWERED_HERE = frozenset({("services", "list")})  # what the lane answers from the published states
CLIENT_ID = "root-api"


@dataclass(frozen=True)
class StatesChange:
    """What one publication of the services' states changed, for a lane's :class:`StatesBook`.

    *put*: the states published, by service id, as JSON (the ``data`` of what went on their topics: the
    lane answers with it as it is, never decoding it). *lists*: each owner whose services
    changed, with their ids in listing order (by job name; an owner with none left has an empty tuple).
    *taken_at*: when the root began the publication (monotonic): a request it answered before then is in it.
    *whole*: everything, not a change (a lane that starts begins with it)."""

    taken_at: float
    put: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))
    lists: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    whole: bool = False


class StatesBook:
    """Every user's services as the root last published them: what the lane answers ``services/list`` with."""

    def __init__(self) -> None:
        self.taken_at = float("-inf")  # the last publication applied (the root's monotonic clock)
        self.ready = False  # a whole publication was applied
        self._states: dict[str, bytes] = {}
        self._lists: dict[str, tuple[str, ...]] = {}

    def apply(self, change: StatesChange) -> None:
        """Take in one publication."""
        if change.whole:
            self._states.clear()
            self._lists.clear()
            self.ready = True
        self._states.update(change.put)
        for owner, sids in change.lists.items():
            for gone in set(self._lists.get(owner, ())) - set(sids):
                self._states.pop(gone, None)
            if sids:
                self._lists[owner] = sids
            else:
                self._lists.pop(owner, None)
        self.taken_at = change.taken_at

    def listed(self, user: str) -> list[bytes]:
        """*user*'s services' states (JSON), by job name, as last published (one never published is left out)."""
        return [self._states[sid] for sid in self._lists.get(user, ()) if sid in self._states]


class ToRoot(Protocol):
    """Where the lane hands the requests it does not answer itself (the root's :class:`Api`), and through
    which the root's answers come back to :meth:`UsersLane.answered`."""

    def hand_over(self, request: Received[bytes]) -> None:
        """Have the root answer *request* (called on the lane's loop)."""


class UsersLane:
    """The users' connection, on the event loop :meth:`serving` is entered on."""

    def __init__(self, url: BrokerUrl, username: str, password: str, root: ToRoot) -> None:
        self.root = root
        self.url = url
        self._login = (username, password)
        self.session: MqttSession | None = None  # made on the lane's loop, which it belongs to
        self.book = StatesBook()
        self._waiting: Counter[str] = Counter()  # each user's requests handed to the root and not answered
        self._answered: dict[str, float] = {}  # when the root sent its last answer to each user (its monotonic)

    @property
    def backlog(self) -> int:
        """Requests received on the users' connection and not yet read."""
        return self.session.backlog if self.session else 0

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Connect, subscribe to the users' requests and answer them until the block ends."""
        inbox = Inbox()
        inbox.on(channels.API_REQUEST, self._take)
        async with MqttSession(self.url, CLIENT_ID, *self._login) as session:
            self.session = session
            await inbox.subscribe(session)
            async with asyncio.TaskGroup() as tasks:
                reading = tasks.create_task(inbox.run(session))
                yield
                reading.cancel()

    def publish(self, change: StatesChange) -> None:
        """The root published its services' states."""
        self.book.apply(change)

    def answered(self, names: dict[str, str], data: Mapping[str, Any] | bytes, at: float) -> None:
        """The root answered one of a user's requests at *at* (its monotonic clock): send the answer."""
        user = names["user"]
        if self._waiting[user]:
            one_less(self._waiting, user)
        self._answered[user] = max(at, self._answered.get(user, at))
        assert self.session is not None
        self.session.send(channels.API_RESPONSE, data, **names)

    async def _take(self, request: Received[bytes]) -> None:
        names = request.names
        user = names["user"]
        data = self._listed(user, request) if (names["resource"], names["action"]) in ANSWERED_HERE else None
        if data is None:
            self._waiting[user] += 1
            self.root.hand_over(request)
            return
        assert self.session is not None
        self.session.send(channels.API_RESPONSE, data, **names)

    def _listed(self, user: str, request: Received[bytes]) -> bytes | None:
        """The answer to *user*'s ``services/list`` from the published states; None when the root must
        answer it (it filters, is not fresh enough for this user, or is malformed)."""
        book = self.book
        if not book.ready or self._waiting[user] or self._answered.get(user, float("-inf")) >= book.taken_at:
            return None
        try:
            body = request_body(request.message.payload)
        except ApiError:
            return None
        if not isinstance(body, dict) or body.get("app") is not None:
            return None
        return listing(book.listed(user), transaction_of(body))


class TakesRequests(Protocol):
    """The root's :class:`~services.root.api.Api`, as a lane sees it."""

    async def take(self, replies: Replies, request: Received[bytes]) -> None:
        """Queue *request*; its answer goes to *replies*."""


class LaneThread:
    """The lane on a thread of the root's process (with the embedded broker): the root's side of it, where
    the :class:`Api` sends its answers (:class:`~services.root.api.Replies`) and the orchestrator its
    states."""

    def __init__(self, url: BrokerUrl, username: str, password: str, api: TakesRequests,
                 states_now: Callable[[], StatesChange]) -> None:
        self.api = api
        self.states_now = states_now
        self.lane = UsersLane(url, username, password, self)
        self.thread = LoopThread("users", self.lane.serving)
        self._root: asyncio.AbstractEventLoop | None = None
        self._handed = 0  # requests handed to the root (counted on the lane's loop) ...
        self._begun = 0  # ... and begun there (counted on the root's): the difference waits for the root's loop

    async def __aenter__(self) -> LaneThread:
        self._root = asyncio.get_running_loop()
        await self.thread.__aenter__()
        self.publish(self.states_now())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.thread.__aexit__(None, None, None)

    @property
    def traffic(self) -> MqttSession:
        """The users' connection (for the root's metrics)."""
        assert self.lane.session is not None
        return self.lane.session

    async def run(self) -> None:
        """Wait until the lane's thread ends (it failed: raised here)."""
        await self.thread.ended()

    def publish(self, change: StatesChange) -> None:
        """The root published its services' states (called on the root's loop)."""
        self.thread.call(self.lane.publish, change)

    @property
    def applied(self) -> float:
        """The last publication of the states the lane took in (its ``taken_at``)."""
        return self.lane.book.taken_at

    def hand_over(self, request: Received[bytes]) -> None:
        """See :meth:`ToRoot.hand_over`."""
        self._handed += 1
        assert self._root is not None
        asyncio.run_coroutine_threadsafe(self._begin(request), self._root)

    async def _begin(self, request: Received[bytes]) -> None:
        """On the root's loop: queue the request for the :class:`Api`."""
        self._begun += 1
        await self.api.take(self, request)

    @property
    def backlog(self) -> int:
        """Requests received and not yet begun by the root (for its ``busy`` answers)."""
        return self.lane.backlog + self._handed - self._begun

    def send(self, channel: Channel[Any], data: Mapping[str, Any] | bytes, src: str = "", **names: str) -> None:
        """Send the Api's answer on the lane's connection (only answers come here)."""
        assert channel is channels.API_RESPONSE
        self.thread.call(self.lane.answered, names, data, time.monotonic())
