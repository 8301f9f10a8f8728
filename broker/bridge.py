"""The root <-> cluster bridge: the cluster orchestrator's traffic with the root, carried in-process.

On the root broker, as ``cluster:<cid>`` with a persistent session (nothing is lost while it
reconnects) and a last will that marks the cluster offline at the root:

    root  ``oak/clusters/<cid>/down/<channel>``  ->  orchestrator  ``oak/downstream/<channel>``
    root  ``oak/clusters/<cid>/up/<channel>``    <-  orchestrator  ``oak/upstream/<channel>``

The orchestrator reads and writes its side of these channels on its own session, as if its broker
carried them, but they never pass through that broker: what the root sends joins the session's
incoming messages (:meth:`MqttSession.take_in`), and what it publishes upstream goes straight to the
root (:meth:`MqttSession.divert`). Forwarding through the cluster's broker cost two more passes
through a broker and a client, each way, on the cluster's event loop, for every message.

Only the channels of the table pass (anything else is dropped). QoS is kept; a message from the root is
marked retained as the root's broker marked it (a retained copy delivered as the bridge subscribed), and
one to the root is retained as the table says (:func:`services.common.channels.bridged`). mosquitto's own bridge
(:mod:`broker.mosquitto_files`) replaces this one with a mosquitto cluster broker when asked for; the
orchestrator's side of the channels is then on its broker.
"""

from __future__ import annotations

import logging

from services.common import channels
from services.common.mqtt import MqttSession

log = logging.getLogger(__name__)


class Bridge:
    """Carries the root's messages for the cluster *cluster_id* to the orchestrator's session *local*, and
    what *local* publishes upstream to the root (*root*, connected by :meth:`run`)."""

    delivers = channels.DOWNSTREAM_BASE + "/"  # what reaches *local* from here, not from its broker

    def __init__(self, cluster_id: str, root: MqttSession, local: MqttSession) -> None:
        self.cluster_id = cluster_id
        self.root = root
        self.local = local
        self._reached = False
        self._early: dict[str, bytes] = {}  # retained upstream topics published before the root was reached
        local.divert(channels.UPSTREAM_BASE + "/", self._up)

    async def run(self) -> None:
        """Reach the root, then carry messages both ways until cancelled."""
        async with self.root:
            log.info("cluster %s bridged to the root at %s", self.cluster_id, self.root.url)
            self.root.subscribe(channels.down_filter(self.cluster_id))
            self._reached = True
            for topic, payload in self._early.items():
                self.root.publish(topic, payload, retain=True)
            self._early.clear()
            try:
                async for message in self.root.messages():
                    self._down(message.topic, message.payload, message.retain, message.qos)
            finally:
                self._reached = False

    def _where(self, topic: str) -> tuple[str, bool] | None:
        """Where *topic* goes on the other side, and whether retained; None, with a warning, when it is no
        channel of the table."""
        where = channels.bridged(topic, self.cluster_id)
        if where is None:
            log.warning("not bridging %s: no such channel", topic)
        return where

    def _down(self, topic: str, payload: bytes, retain: bool, qos: int) -> None:
        if where := self._where(topic):
            self.local.take_in(where[0], payload, retain=retain, qos=qos)

    def _up(self, topic: str, payload: bytes, retain: bool, qos: int) -> None:
        where = self._where(topic)
        if where is None:
            return
        at_root, retained = where
        if self._reached:
            self.root.publish(at_root, payload, retain=retained, qos=qos)
        elif retained:  # the root gets it once reached (an update meanwhile replaces it)
            self._early[at_root] = payload
        else:  # nothing to deliver it to yet, as for any message published before its reader subscribed
            log.debug("not bridging %s: the root is not reached yet", topic)
