"""Wires a cluster orchestrator: its broker, the bridge to the root, its store and scheduler."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from broker.backend import MOSQUITTO, BrokerSpec, make_credentials, open_broker
from broker.bridge import Bridge
from broker.join import JoinDesk, obtain_login
from broker.mosquitto_files import NativeBridge
from broker.server import Listeners
from services.cluster.orchestrator import ClusterOrchestrator
from services.cluster.relay import Relay
from services.common import envelope, models, plugins, profile, topics
from services.common.models import ClusterInfo
from services.common.mqtt import BrokerUrl, MqttSession, serve
from services.common.store import Store

log = logging.getLogger(__name__)
VERSION = "0.1.0"


@dataclass(frozen=True)
class ClusterConfig:
    """How to run a cluster orchestrator."""

    data_dir: Path
    name: str
    root: BrokerUrl
    location: str = ""
    listen: Listeners = Listeners("0.0.0.0", 10003)
    scheduler: str = profile.DEFAULT
    scheduler_profile: Path | None = None
    join_token: str | None = None
    root_join_token: str | None = None
    broker: BrokerSpec = BrokerSpec()
    native_bridge: bool = False  # mosquitto's own bridge to the root (with broker kind mosquitto)


async def run_cluster(cfg: ClusterConfig, ready: asyncio.Event | None = None) -> None:
    """Run a cluster orchestrator until cancelled; set *ready* once workers can connect."""
    if not topics.is_valid_id(cfg.name):
        raise ValueError(f"bad cluster name {cfg.name!r}: use letters, digits, '-' and '_' (at most 63)")
    scheduling = profile.load(plugins.make_manager(), cfg.scheduler, cfg.scheduler_profile)
    store = Store(cfg.data_dir / "cluster.db.json")
    credentials = make_credentials(cfg.broker, store, cfg.join_token)
    await credentials.load()
    desk = JoinDesk(credentials, "node")
    try:
        native = await _native_bridge(cfg)
        async with open_broker(cfg.broker, cfg.listen, credentials, cfg.data_dir, ("cluster", "bridge"),
                               native) as broker:
            session = MqttSession(broker.url, "cluster", *broker.login("cluster"), avail_topic=topics.CLUSTER_AVAIL)
            async with session:
                orchestrator = ClusterOrchestrator(cfg.name, store, scheduling, session, cfg.location)
                await orchestrator.restore()
                orchestrator.subscribe()
                relay = Relay(orchestrator, session)
                await session.subscribe_confirmed(topics.JOIN_REQUESTS)
                info = ClusterInfo(cfg.name, cfg.location, VERSION, ",".join(scheduling.names))
                session.publish(
                    topics.upstream("info"),
                    envelope.encode("cluster.info", models.dump(info), f"cluster/{cfg.name}"),
                    retain=True,
                )
                log.info("cluster %s serving workers on port %d", cfg.name, broker.port)
                if ready:
                    ready.set()
                await serve(session, {
                    topics.JOIN_REQUESTS: lambda m: desk.handle(session, m),
                    topics.downstream("cmd/+"): relay.command,
                    topics.up_filter(topics.NODES, "res/+"): relay.answer,
                    topics.BASE + "/#": orchestrator.handle,
                }, orchestrator.run(), *([] if native else [_bridge(cfg, broker.url, broker.login("bridge"))]))
    finally:
        store.close()


async def _native_bridge(cfg: ClusterConfig) -> NativeBridge | None:
    """mosquitto's own bridge to the root, when asked for: the cluster joins the root first."""
    if not cfg.native_bridge:
        return None
    if cfg.broker.kind != MOSQUITTO:
        raise ValueError("mosquitto's own bridge needs the cluster's broker to be mosquitto (--broker mosquitto)")
    login = await obtain_login(cfg.data_dir, cfg.root, "cluster", cfg.name, cfg.root_join_token, timeout=3600)
    return NativeBridge(cfg.name, cfg.root, login.username, login.password)


async def _bridge(cfg: ClusterConfig, local: BrokerUrl, service_login: tuple[str, str]) -> None:
    """Join the root if needed, then forward between the brokers for as long as the cluster runs."""
    login = await obtain_login(cfg.data_dir, cfg.root, "cluster", cfg.name, cfg.root_join_token, timeout=3600)
    root_side = MqttSession(
        cfg.root, login.username, login.username, login.password,
        avail_topic=topics.up(topics.CLUSTERS, cfg.name, "avail"), clean_session=False,
    )
    local_side = MqttSession(local, "bridge", *service_login)
    async with root_side, local_side:
        log.info("cluster %s bridged to the root at %s", cfg.name, cfg.root)
        await Bridge(cfg.name, root_side, local_side).run()
