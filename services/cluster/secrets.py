"""The cluster's part in handing out secrets: it passes a worker's question up to the root only for an
instance it placed on that worker, and the root's answer down to that worker only (see
services/root/secrets.py). It keeps nothing."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from services.common import channels
from services.common.inbox import Received
from services.common.mqtt import MqttSession

log = logging.getLogger(__name__)


class SecretRelay:
    """Relays questions for secrets up and their answers down, checking who asks and who gets them."""

    def __init__(self, session: MqttSession, assigned: Mapping[str, str]) -> None:
        self.session = session
        self.assigned = assigned  # iid -> worker (the orchestrator's own map)

    async def ask(self, asked: Received[dict[str, Any]]) -> None:
        """A worker's ``{"id", "iid"}``: up to the root when the instance is placed on it, else refused."""
        body, node = asked.body or {}, asked.sender
        iid, ask_id = str(body.get("iid", "")), str(body.get("id", ""))
        if self.assigned.get(iid) != node:
            log.warning("worker %s asked for the secrets of %r, which is not placed on it", node, iid)
            self.session.send(channels.NODE_SECRETS, {"id": ask_id, "iid": iid,
                                                      "error": f"instance {iid!r} is not placed on {node}"}, node=node)
            return
        self.session.send(channels.upstream(channels.CLUSTER_SECRETS_ASK), {"id": ask_id, "iid": iid, "node": node})

    async def answer(self, answered: Received[dict[str, Any]]) -> None:
        """The root's answer: to the worker it is for, if the instance is still placed there."""
        body = answered.body or {}
        iid, node = str(body.get("iid", "")), str(body.get("node", ""))
        if not node or self.assigned.get(iid) != node:
            log.warning("secrets for %r arrived, but it is no longer placed on %r: dropped", iid, node)
            return
        self.session.send(channels.NODE_SECRETS, {k: v for k, v in body.items() if k != "node"}, node=node)
