"""The root <-> cluster bridge: two MQTT sessions forwarding disjoint topic prefixes.

On the root broker, as ``cluster:<cid>`` with a persistent session (nothing is lost while it
reconnects) and a last will that marks the cluster offline at the root:

    root  ``oak/clusters/<cid>/down/<channel>``  ->  cluster  ``oak/downstream/<channel>``
    root  ``oak/clusters/<cid>/up/<channel>``    <-  cluster  ``oak/upstream/<channel>``

The prefixes never overlap, so no message loops. Only the channels of the table pass (anything else
is dropped); the retain flag is not carried by MQTT 3.1.1 on live deliveries, so it is restored from
the table (:func:`services.common.channels.bridged`). QoS is kept.
"""

from __future__ import annotations

import asyncio
import logging

from services.common import channels
from services.common.mqtt import MqttSession

log = logging.getLogger(__name__)


class Bridge:
    """Forwards between the root broker (*root*) and the cluster's own broker (*local*)."""

    def __init__(self, cluster_id: str, root: MqttSession, local: MqttSession) -> None:
        self.cluster_id = cluster_id
        self.root = root
        self.local = local

    async def run(self) -> None:
        """Forward both ways until cancelled."""
        self.root.subscribe(channels.down_filter(self.cluster_id))
        self.local.subscribe(channels.UPSTREAM_BASE + "/#")
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._pump(self.root, self.local))
            tasks.create_task(self._pump(self.local, self.root))

    async def _pump(self, source: MqttSession, target: MqttSession) -> None:
        async for message in source.messages():
            where = channels.bridged(message.topic, self.cluster_id)
            if where is None:
                log.warning("not bridging %s: no such channel", message.topic)
                continue
            topic, retained = where
            target.publish(topic, message.payload, retain=retained, qos=message.qos)
