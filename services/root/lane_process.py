"""The users' lane in a process of its own, beside a broker that runs outside the root's process.

With ``--broker mosquitto`` (or a broker you run) a user's message passes through the root's process only
when the root must answer it. A lane on a thread of the root would still share the interpreter with the
busy orchestrator: on CPUs busy with other work, a thread descheduled while it holds the interpreter holds
the lane up with it (BENCHMARKS.md, issue 15). So there the lane (services/root/lane.py) runs as a child:
``python -m services.root.lane_process FD``, talking to the root over a socket pair. :class:`LaneProcess`
is the root's side: it starts the child, hands it the broker login, every publication of the services'
states and the :class:`Api`'s answers, takes the requests the lane hands over, and starts another child
a second after one dies. The child ends when the root's end of the socket closes (the root stopped or
died); it ignores SIGINT and SIGTERM, which the root acts on for both.

Each frame is two big-endian 32-bit lengths, a JSON head (``"t"`` says what it is) and a body of bytes:

root to lane: ``login`` (``url``, ``username``, ``password``; first, once); ``state`` (``sid``; the body is
the service's state, the JSON published on its topic), then ``states`` (``taken_at``, ``lists``, ``whole``) to
apply them; ``answer`` (``topic``, ``at``; the body is the answer's payload).
lane to root: ``ready`` (subscribed); ``applied`` (``taken_at``: a ``states`` taken in); ``request``
(``topic``, ``backlog``; the body is the request's payload); ``counts`` (the connection's traffic, every
second, for the root's metrics).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from services.common import channels
from services.common.channels import Channel
from services.common.inbox import Received
from services.common.lifecycle import setup_logging
from services.common.mqtt import BrokerUrl, Message
from services.root.lane import StatesChange, TakesRequests, UsersLane

log = logging.getLogger(__name__)
LENGTHS = struct.Struct(">II")
MAX_HEAD = 1 << 20  # bytes: a head is a few names and numbers, or one user's list of service ids
MAX_BODY = 1 << 28  # bytes: a payload, at most what an MQTT message may carry
READY_TIMEOUT = 30.0  # seconds a new lane may take to connect and subscribe
RESTART_DELAY = 1.0  # seconds between a lane's death and the next one's start
COUNTS_EVERY = 1.0  # seconds between two reports of the lane's traffic
Head = dict[str, Any]


class FrameError(Exception):
    """A frame that cannot be read: the other side is not a lane (or root) speaking this protocol."""


def frame(head: Head, body: bytes = b"") -> bytes:
    """One frame, as written."""
    encoded = json.dumps(head, separators=(",", ":")).encode()
    return LENGTHS.pack(len(encoded), len(body)) + encoded + body


async def read_frame(reader: asyncio.StreamReader) -> tuple[Head, bytes] | None:
    """The next frame; None when the other side closed its end between frames (or the socket broke)."""
    try:
        lengths = await reader.readexactly(LENGTHS.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise FrameError("the stream ended within a frame") from None
        return None
    except ConnectionError:
        return None
    head_size, body_size = LENGTHS.unpack(lengths)
    if head_size > MAX_HEAD or body_size > MAX_BODY:
        raise FrameError(f"a frame of {head_size} + {body_size} bytes is over the limits")
    try:
        head = json.loads(await reader.readexactly(head_size))
        body = await reader.readexactly(body_size)
    except (asyncio.IncompleteReadError, ConnectionError):
        raise FrameError("the stream ended within a frame") from None
    except ValueError:
        raise FrameError("a frame's head is not JSON") from None
    if not isinstance(head, dict) or not isinstance(head.get("t"), str):
        raise FrameError("a frame's head has no type")
    return head, body


def states_frames(change: StatesChange) -> bytes:
    """*change* as frames: each state put, then the ``states`` frame that applies them."""
    parts = [frame({"t": "state", "sid": sid}, state) for sid, state in change.put.items()]
    lists = {owner: list(sids) for owner, sids in change.lists.items()}
    parts.append(frame({"t": "states", "taken_at": change.taken_at, "lists": lists, "whole": change.whole}))
    return b"".join(parts)


# ---- the root's side ------------------------------------------------------------------------------------


class LaneProcess:
    """The users' lane as a child process: the root's side of it, where the :class:`Api` sends its answers
    (:class:`~services.root.api.Replies`) and the orchestrator its states, and what counts its traffic."""

    def __init__(self, url: BrokerUrl, username: str, password: str, api: TakesRequests,
                 states_now: Callable[[], StatesChange]) -> None:
        self.api = api
        self.states_now = states_now
        self._login = {"url": str(url), "username": username, "password": password}
        self._life: _Life | None = None
        self.received_count = self.sent_count = self.unacknowledged = 0  # the lane's connection, as reported
        self._reported_backlog = 0
        self.applied = float("-inf")  # the last publication of the states the lane took in (its taken_at)

    async def __aenter__(self) -> LaneProcess:
        self._life = await self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._life is not None:
            await self._life.stop()

    async def run(self) -> None:
        """Serve the lane; start another a second after one dies, until cancelled."""
        while True:
            if self._life is None:
                try:
                    self._life = await self._start()
                except LaneFailed as exc:
                    log.warning("%s; trying again in %.0f s", exc, RESTART_DELAY)
                    await asyncio.sleep(RESTART_DELAY)
                    continue
            code = await self._life.ended()
            log.warning("the users' lane (pid %d) exited with code %s; starting another in %.0f s",
                        self._life.pid, code, RESTART_DELAY)
            self._life = None
            await asyncio.sleep(RESTART_DELAY)

    async def _start(self) -> _Life:
        """Start a lane process, wait until it serves, and hand it the states as now published."""
        ours, theirs = socket.socketpair()
        try:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (_SOURCE, os.environ.get("PYTHONPATH"))))}
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", __name__, str(theirs.fileno()), pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        life = _Life(self, process, *await asyncio.open_unix_connection(sock=ours))
        life.writer.write(frame({"t": "login", **self._login}))
        try:
            await life.serving(READY_TIMEOUT)
        except asyncio.CancelledError:  # the root stops meanwhile: so does this lane
            await life.stop()
            raise
        life.writer.write(states_frames(self.states_now()))
        log.info("the users' lane serves from a process of its own (pid %d)", life.pid)
        return life

    def publish(self, change: StatesChange) -> None:
        """The root published its services' states (a lane being started gets them in :meth:`states_now`)."""
        if self._life is not None:
            self._life.writer.write(states_frames(change))

    @property
    def pid(self) -> int | None:
        """The lane process's (None while another is being started)."""
        return self._life.pid if self._life else None

    @property
    def traffic(self) -> LaneProcess:
        """The lane's connection's counts, as it last reported them (for the root's metrics)."""
        return self

    @property
    def backlog(self) -> int:
        """Requests the lane received and had not read when it last handed one over (for ``busy`` answers)."""
        return self._reported_backlog

    def send(self, channel: Channel[Any], data: Mapping[str, Any] | bytes, src: str = "", **names: str) -> None:
        """Have the lane send the Api's answer (only answers come here; one to a lane since dead is dropped)."""
        assert channel is channels.API_RESPONSE
        if self._life is not None:
            self._life.answer(channel, data, names)


_SOURCE = str(Path(__file__).resolve().parents[2])  # where ``services`` is, for the child's imports


class LaneFailed(Exception):
    """A lane process that ended, or said nothing a frame could be read from, before it served."""


class _Life:
    """One lane process, from its start to its end."""

    def __init__(self, lane: LaneProcess, process: asyncio.subprocess.Process, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.lane = lane
        self.process = process
        self.pid = process.pid
        self.reader = reader
        self.writer = writer
        self._ready = asyncio.Event()
        self._reading = asyncio.create_task(self._read())

    async def serving(self, timeout: float) -> None:
        """Wait until the lane says it serves; raise :class:`LaneFailed` if it ends or does not in time."""
        ready = asyncio.create_task(self._ready.wait())
        try:
            await asyncio.wait((ready, self._reading), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not self._ready.is_set():
            await self.stop()
            raise LaneFailed(f"the users' lane (pid {self.pid}) did not start serving (its log says why)")

    async def ended(self) -> int | None:
        """Wait until the lane's end of the socket closes; its exit code."""
        await asyncio.wait((self._reading,))
        return await self._exit_code()

    def answer(self, channel: Channel[Any], data: Mapping[str, Any] | bytes, names: Mapping[str, str]) -> None:
        payload = data if isinstance(data, bytes) else channel.encode(data, "")
        self.writer.write(frame({"t": "answer", "topic": channel.topic(**names), "at": time.monotonic()}, payload))

    async def stop(self) -> None:
        """Close the root's end (the lane ends on it) and wait for the process; kill it if it lingers."""
        self.writer.close()
        self._reading.cancel()
        await self._exit_code()

    async def _exit_code(self) -> int | None:
        try:
            return await asyncio.wait_for(self.process.wait(), 5)
        except TimeoutError:
            log.warning("the users' lane (pid %d) did not end within 5 s of its socket closing; killing it", self.pid)
            self.process.kill()
            return await self.process.wait()

    async def _read(self) -> None:
        lane = self.lane
        try:
            while (got := await read_frame(self.reader)) is not None:
                head, body = got
                if head["t"] == "request":
                    names = channels.API_REQUEST.parse(str(head.get("topic")))
                    if names is None:
                        raise FrameError(f"not a request topic: {head.get('topic')!r}")
                    lane._reported_backlog = _count(head, "backlog")
                    message = Message(channels.API_REQUEST.topic(**names), body, False, 1, time.monotonic())
                    await lane.api.take(lane, Received(channels.API_REQUEST, names, body, message))
                elif head["t"] == "counts":
                    lane.received_count, lane.sent_count = _count(head, "received"), _count(head, "sent")
                    lane.unacknowledged = _count(head, "unacknowledged")
                    lane._reported_backlog = _count(head, "backlog")
                elif head["t"] == "applied" and isinstance(taken_at := head.get("taken_at"), (int, float)):
                    lane.applied = float(taken_at)
                elif head["t"] == "ready":
                    self._ready.set()
        except (FrameError, OSError) as exc:
            log.error("the users' lane (pid %d) broke its socket's protocol (%s); stopping it", self.pid, exc)
            self.process.kill()


def _count(head: Head, name: str) -> int:
    value = head.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FrameError(f"{head['t']}: {name!r} is not a count")
    return value


# ---- the lane's side ------------------------------------------------------------------------------------


class _ToRoot:
    """The lane's link to the root, over the socket (:class:`~services.root.lane.ToRoot`)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.lane: UsersLane | None = None

    def hand_over(self, request: Received[bytes]) -> None:
        backlog = self.lane.backlog if self.lane else 0
        self.writer.write(frame({"t": "request", "topic": request.message.topic, "backlog": backlog},
                                request.message.payload))


async def serve_lane(sock: socket.socket) -> None:
    """Log in as the root tells, serve the users until the root closes its end of *sock*."""
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    first = await read_frame(reader)
    if first is None or first[0]["t"] != "login":
        raise FrameError("the root sent no login")
    login = first[0]
    link = _ToRoot(writer)
    lane = link.lane = UsersLane(BrokerUrl.parse(str(login.get("url"))), str(login.get("username")),
                                 str(login.get("password")), link)
    async with lane.serving():
        writer.write(frame({"t": "ready"}))
        gc.freeze()  # what start-up loaded lives as long as the lane: no full collection walks it again
        counting = asyncio.create_task(_report_counts(lane, writer))
        try:
            await _take_from_root(reader, writer, lane)
        finally:
            counting.cancel()


async def _take_from_root(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lane: UsersLane) -> None:
    """Apply the root's states and send its answers, until it closes its end."""
    put: dict[str, bytes] = {}
    while (got := await read_frame(reader)) is not None:
        head, body = got
        if head["t"] == "answer":
            names = channels.API_RESPONSE.parse(str(head.get("topic")))
            at = head.get("at")
            if names is None or not isinstance(at, (int, float)):
                raise FrameError("answer: a response topic and a time")
            lane.answered(names, body, float(at))
        elif head["t"] == "state":
            put[str(head.get("sid"))] = body
        elif head["t"] == "states":
            lists, taken_at = head.get("lists"), head.get("taken_at")
            if not isinstance(lists, dict) or not isinstance(taken_at, (int, float)):
                raise FrameError("states: lists and a time")
            lane.publish(StatesChange(float(taken_at), put, {str(o): tuple(map(str, s)) for o, s in lists.items()},
                                      whole=bool(head.get("whole"))))
            put = {}
            writer.write(frame({"t": "applied", "taken_at": taken_at}))


async def _report_counts(lane: UsersLane, writer: asyncio.StreamWriter) -> None:
    """Tell the root the connection's traffic every second, for its metrics."""
    last: Head = {}
    while True:
        session = lane.session
        if session is not None:
            counts = {"t": "counts", "received": session.received_count, "sent": session.sent_count,
                      "unacknowledged": session.unacknowledged, "backlog": session.backlog}
            if counts != last:
                writer.write(frame(counts))
                last = counts
        await asyncio.sleep(COUNTS_EVERY)


def main(argv: list[str]) -> int:
    """The lane process: ``python -m services.root.lane_process FD`` (started by :class:`LaneProcess`)."""
    setup_logging()
    for sig in (signal.SIGINT, signal.SIGTERM):  # the root stops with these, and closes the socket: then this ends
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[1]))
    try:
        asyncio.run(serve_lane(sock))
    except FrameError as exc:
        log.error("users' lane: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
