"""Log streams: a user's ``services/logs`` request fans out to the clusters holding the instances, and
the workers' chunks come back as further answers carrying the request's transaction."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from services.common import channels
from services.common.inbox import Received
from services.common.mqtt import MqttSession

log = logging.getLogger(__name__)


@dataclass
class Stream:
    """One open log request: who asked, and which instances (iid -> (number, cluster)) still stream."""

    user: str
    transaction: str | None
    instances: dict[str, tuple[int, str]] = field(default_factory=dict)


class LogStreams:
    """Open streams by id."""

    def __init__(self, session: MqttSession) -> None:
        self.session = session
        self.streams: dict[str, Stream] = {}

    def open(self, user: str, transaction: str | None, instances: dict[str, tuple[int, str]], tail: int,
             follow: float) -> str:
        """Ask every instance's cluster for its log; return the stream id."""
        stream_id = secrets.token_hex(6)
        self.streams[stream_id] = Stream(user, transaction, dict(instances))
        for iid, (_, cluster) in instances.items():
            body = {"id": stream_id, "iid": iid, "tail": tail, "follow": follow}
            self.session.send(channels.CLUSTER_COMMAND, body, cluster=cluster, verb="logs")
        return stream_id

    def stop(self, user: str, stream_id: str) -> bool:
        """End a following stream early; False when the user has no such stream."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.user != user:
            return False
        for iid, (_, cluster) in stream.instances.items():
            body = {"id": stream_id, "iid": iid, "stop": True}
            self.session.send(channels.CLUSTER_COMMAND, body, cluster=cluster, verb="logs")
        return True

    async def answer(self, chunk: Received[dict[str, Any]]) -> None:
        """A chunk from a worker (via its cluster): pass it to the user who asked."""
        body = chunk.body or {}
        try:
            stream = self.streams.get(str(body["id"]))
            iid = str(body["iid"])
        except KeyError:
            log.warning("ignoring an answer without id or iid from cluster %s", chunk.sender)
            return
        if stream is None or iid not in stream.instances:
            return
        number, cluster = stream.instances[iid]
        data = {"iid": iid, "number": number, "cluster": cluster, "node": body.get("node", ""),
                "lines": [str(line) for line in body.get("lines", [])], "done": bool(body.get("done"))}
        answer: dict[str, object] = {"ok": "error" not in body, "data": data}
        if "error" in body:
            answer["error"] = {"code": "no_logs", "message": str(body["error"])}
        if stream.transaction is not None:
            answer["transaction"] = stream.transaction
        self.session.send(channels.API_RESPONSE, answer, user=stream.user, resource="services", action="logs")
        if data["done"]:
            stream.instances.pop(iid, None)
            if not stream.instances:
                self.streams.pop(str(body["id"]), None)
