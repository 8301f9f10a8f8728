"""Serves instance logs on request: the last lines of an instance's log, then (when asked) new lines as
they are written, published on ``oak/nodes/<n>/up/res/logs`` in chunks; never a tail in every report."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from services.common import channels, topics
from services.common.inbox import Received
from services.common.mqtt import MqttSession

log = logging.getLogger(__name__)
POLL = 0.3
MAX_TAIL = 10_000
MAX_FOLLOW = 3600.0
CHUNK_LINES = 500
READ_BACK = 2 * 2**20


def tail_lines(path: Path, count: int) -> tuple[list[str], int]:
    """The last *count* lines of *path* and the file's size (where following starts)."""
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        handle.seek(max(0, size - READ_BACK))
        data = handle.read()
    lines = data.decode(errors="replace").splitlines()
    return (lines[-count:] if count else []), size


def read_range(path: Path, start: int, end: int) -> bytes:
    """Bytes *start*..*end* of *path*."""
    with open(path, "rb") as handle:
        handle.seek(start)
        return handle.read(end - start)


class LogServer:
    """Answers ``cmd/logs`` requests for the instances of this node."""

    def __init__(self, node: str, data_dir: Path, session: MqttSession) -> None:
        self.node = node
        self.logs = data_dir / "logs"
        self.session = session
        self._streams: dict[str, asyncio.Task[None]] = {}

    def _send(self, body: dict[str, Any]) -> None:
        self.session.send(channels.NODE_ANSWER, body, "", node=self.node, verb="logs")

    async def handle(self, command: Received[dict[str, Any]]) -> None:
        """Start, or stop, one log stream."""
        body = command.body or {}
        try:
            stream, iid = str(body["id"]), str(body["iid"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a bad logs command")
            return
        key = f"{stream}/{iid}"
        if body.get("stop"):
            task = self._streams.pop(key, None)
            if task:
                task.cancel()
            return
        if not topics.is_valid_id(iid) or key in self._streams:
            return
        tail = max(0, min(int(body.get("tail", 100) or 0), MAX_TAIL))
        follow = max(0.0, min(float(body.get("follow", 0) or 0), MAX_FOLLOW))
        task = asyncio.create_task(self._stream(stream, iid, tail, follow))
        self._streams[key] = task
        task.add_done_callback(lambda _: self._streams.pop(key, None))

    async def _stream(self, stream: str, iid: str, tail: int, follow: float) -> None:
        path = self.logs / f"{iid}.log"
        base = {"id": stream, "iid": iid, "node": self.node}
        try:
            lines, offset = await asyncio.to_thread(tail_lines, path, tail)
        except FileNotFoundError:
            self._send({**base, "lines": [], "error": f"no log for {iid} on {self.node}", "done": True})
            return
        for start in range(0, max(1, len(lines)), CHUNK_LINES):
            self._send({**base, "lines": lines[start:start + CHUNK_LINES], "done": False})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + follow
        partial = b""
        try:
            while loop.time() < deadline:
                await asyncio.sleep(POLL)
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    break
                if size < offset:  # rotated: start over at the new file
                    offset = 0
                if size == offset:
                    continue
                data = partial + await asyncio.to_thread(read_range, path, offset, size)
                offset = size
                *complete, partial = data.split(b"\n")
                if complete:
                    self._send({**base, "lines": [c.decode(errors="replace") for c in complete], "done": False})
        finally:
            self._send({**base, "lines": [], "done": True})
