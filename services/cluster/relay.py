"""Passes the root's one-shot commands (``cmd/<verb>``, e.g. logs) to the worker holding the instance,
and the workers' answers (``res/<verb>``) back up. Payloads pass through untouched."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from services.common import channels
from services.common.inbox import Received
from services.common.mqtt import MqttSession

log = logging.getLogger(__name__)


class Relay:
    """Commands down to workers, answers up to the root."""

    def __init__(self, assigned: Mapping[str, str], session: MqttSession,
                 nodes: Callable[[], Iterable[str]] = tuple) -> None:
        self.assigned = assigned  # which worker holds each instance (the orchestrator's, kept current)
        self.session = session
        self.nodes = nodes  # the workers of the cluster

    async def delete_volumes(self, command: Received[dict[str, Any]]) -> None:
        """``oak/downstream/cmd/volumes`` with ``{"delete": [owner/job/volume...]}``: to every worker (one
        may hold a volume it has not reported yet; the others have nothing to delete)."""
        keys = (command.body or {}).get("delete")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            log.warning("ignoring a volumes command without a list of volumes")
            return
        for node in self.nodes():
            self.session.send(channels.NODE_COMMAND, {"delete": keys}, node=node, verb="volumes")

    async def command(self, command: Received[dict[str, Any]]) -> None:
        """``oak/downstream/cmd/<verb>`` with ``{"id", "iid", ...}``: to the instance's worker."""
        verb, body = command.names["verb"], command.body or {}
        iid = body.get("iid")
        if not isinstance(iid, str):
            log.warning("ignoring a %s command without an instance", verb)
            return
        node = self.assigned.get(iid)
        if node is None:
            answer = {"id": body.get("id"), "iid": iid, "error": "the instance is not on any worker", "done": True}
            self.session.send(channels.upstream(channels.CLUSTER_ANSWER), answer, verb=verb)
            return
        self.session.send(channels.NODE_COMMAND, command.message.payload, node=node, verb=verb)

    async def answer(self, answer: Received[dict[str, Any]]) -> None:
        """``oak/nodes/<n>/up/res/<verb>``: up to the root."""
        self.session.send(channels.upstream(channels.CLUSTER_ANSWER), answer.message.payload,
                          verb=answer.names["verb"])
