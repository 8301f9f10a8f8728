"""Passes the root's one-shot commands (``cmd/<verb>``, e.g. logs) to the worker holding the instance,
and the workers' answers (``res/<verb>``) back up. Payloads pass through untouched."""

from __future__ import annotations

import json
import logging

from services.cluster.orchestrator import ClusterOrchestrator
from services.common import topics
from services.common.mqtt import Message, MqttSession

log = logging.getLogger(__name__)


class Relay:
    """Commands down to workers, answers up to the root."""

    def __init__(self, orchestrator: ClusterOrchestrator, session: MqttSession) -> None:
        self.orchestrator = orchestrator
        self.session = session

    async def command(self, message: Message) -> None:
        """``oak/downstream/cmd/<verb>`` with ``{"id", "iid", ...}``: to the instance's worker."""
        verb = message.topic.rsplit("/", 1)[-1]
        try:
            body = json.loads(message.payload)
            iid = body["iid"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a bad %s command", verb)
            return
        node = self.orchestrator.assigned.get(iid)
        if node is None:
            answer = {"id": body.get("id"), "iid": iid, "error": "the instance is not on any worker", "done": True}
            self.session.publish(topics.upstream(f"res/{verb}"), json.dumps(answer).encode())
            return
        self.session.publish(topics.down(topics.NODES, node, f"cmd/{verb}"), message.payload)

    async def answer(self, message: Message) -> None:
        """``oak/nodes/<n>/up/res/<verb>``: up to the root."""
        verb = message.topic.rsplit("/", 1)[-1]
        self.session.publish(topics.upstream(f"res/{verb}"), message.payload)
