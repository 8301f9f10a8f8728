"""The root <-> cluster bridge: two MQTT sessions forwarding disjoint topic prefixes.

On the root broker, as ``cluster:<cid>`` with a persistent session (nothing is lost while it
reconnects) and a last will that marks the cluster offline at the root:

    root  ``oak/clusters/<cid>/down/<channel>``  ->  cluster  ``oak/downstream/<channel>``
    root  ``oak/clusters/<cid>/up/<channel>``    <-  cluster  ``oak/upstream/<channel>``

The prefixes never overlap, so no message loops. The retain flag is not carried by MQTT 3.1.1 on live
deliveries, so it is restored from the topic table (:func:`services.common.topics.is_retained_channel`);
QoS is kept.
"""

from __future__ import annotations

import asyncio
import logging

from services.common import topics
from services.common.mqtt import MqttSession

log = logging.getLogger(__name__)


class Bridge:
    """Forwards between the root broker (*root*) and the cluster's own broker (*local*)."""

    def __init__(self, cluster_id: str, root: MqttSession, local: MqttSession) -> None:
        self.cluster_id = cluster_id
        self.root = root
        self.local = local
        self._down_prefix = f"{topics.BASE}/{topics.CLUSTERS}/{cluster_id}/down/"
        self._up_prefix = topics.UPSTREAM + "/"

    async def run(self) -> None:
        """Forward both ways until cancelled."""
        self.root.subscribe(self._down_prefix + "#")
        self.local.subscribe(self._up_prefix + "#")
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._pump(self.root, self.local, self._down_prefix, topics.downstream))
            tasks.create_task(
                self._pump(
                    self.local,
                    self.root,
                    self._up_prefix,
                    lambda channel: topics.up(topics.CLUSTERS, self.cluster_id, channel),
                )
            )

    @staticmethod
    async def _pump(source: MqttSession, target: MqttSession, prefix: str, rename) -> None:  # type: ignore[no-untyped-def]
        async for message in source.messages():
            if not message.topic.startswith(prefix):
                continue
            channel = message.topic[len(prefix) :]
            target.publish(
                rename(channel),
                message.payload,
                retain=topics.is_retained_channel(channel),
                qos=message.qos,
            )
