"""Wires a cluster orchestrator: its broker, the bridge to the root, its store and scheduler."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker import ca
from broker.backend import MOSQUITTO, BrokerSpec, RunningBroker, make_credentials, open_broker
from broker.bridge import Bridge
from broker.credentials import Credentials
from broker.identity import NODE, Identity
from broker.join import TLS_DIR, Issuer, JoinDesk, Login, obtain_login
from broker.mosquitto_files import NativeBridge
from broker.renewal import Renewal, Renewer
from broker.server import Listeners
from broker.tier_ca import TierCa
from broker.tokens import JoinPolicy, JoinTokens
from services.cluster import metrics as cluster_metrics
from services.cluster.orchestrator import STUCK_AFTER, ClusterOrchestrator
from services.cluster.relay import Relay
from services.cluster.secrets import SecretRelay
from services.common import channels, metrics, models, plugins, profile, topics
from services.common.heap import Heap
from services.common.inbox import Inbox, Received, serve
from services.common.metrics import Endpoint, TierMetrics
from services.common.models import ClusterInfo
from services.common.mqtt import BrokerUrl, MqttSession
from services.common.private import private_dir
from services.common.store import Store
from services.common.version import VERSION

log = logging.getLogger(__name__)
RESTART_GRACE = 15.0  # seconds workers have to come back after this cluster restarts its own mosquitto


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
    join_token: str | None = None  # a fixed token workers may join with (besides the root's)
    root_join_token: str | None = None
    broker: BrokerSpec = BrokerSpec()
    native_bridge: bool = False  # mosquitto's own bridge to the root (with broker kind mosquitto)
    root_ca_fingerprint: str | None = None  # the fleet CA a first join pins (from `oak token create`)
    cert_days: float = ca.CERT_DAYS  # how long the workers' certificates last
    plain_loopback: bool = False
    plain_port: int = 0
    open_join: bool = False  # workers may join without a token
    stuck_after: float = STUCK_AFTER  # an instance accepted and not progressing this long moves (its worker: SUSPECT)
    metrics: Endpoint = Endpoint()  # where Prometheus scrapes this cluster (port 0: nowhere)


async def run_cluster(cfg: ClusterConfig, ready: asyncio.Event | None = None) -> None:
    """Run a cluster orchestrator until cancelled; set *ready* once workers can connect.

    A cluster that runs its own broker joins the root first (on its first start), so that its broker
    presents workers a certificate chain up to the root's CA from the start.
    """
    if not topics.is_valid_id(cfg.name):
        raise ValueError(f"bad cluster name {cfg.name!r}: use letters, digits, '-' and '_' (at most 63)")
    scheduling = profile.load(plugins.make_manager(), cfg.scheduler, cfg.scheduler_profile)
    private_dir(cfg.data_dir)
    tier = TierCa.cluster(cfg.data_dir, cfg.name) if cfg.broker.runs_listeners else None
    login = await obtain_login(cfg.data_dir, cfg.root, "cluster", cfg.name, cfg.root_join_token, timeout=3600,
                               fingerprint=cfg.root_ca_fingerprint, ca_key=tier.authority.key if tier else None)
    if tier is not None and login.cert is not None:
        tier = tier.joined(login.ca or Path(), cfg.data_dir / TLS_DIR / "ca-cross.pem")
    store = Store(cfg.data_dir / "cluster.db.json")
    credentials = make_credentials(cfg.broker, store)
    await credentials.load()
    credentials.machines_by_certificate = tier is not None
    listen = (tier.listeners(cfg.listen, await credentials.revoked(), cfg.plain_loopback, cfg.plain_port)
              if tier else cfg.listen)
    try:
        native = _native_bridge(cfg, login)
        async with open_broker(cfg.broker, listen, credentials, cfg.data_dir, ("cluster",), native) as broker:
            session = MqttSession(broker.url, "cluster", *broker.login("cluster"),
                                  avail_topic=channels.CLUSTER_SELF_AVAIL.topic())
            tokens = JoinTokens()  # the root's tokens for workers (down/tokens)
            issuer = Issuer(tier.authority, tier.fleet_ca, broker.cert_port, cfg.cert_days) if tier else None
            renewer = Renewer(credentials, tier.authority, NODE, cfg.cert_days) if tier else None
            bridge_tls = login.tls()
            renewal = (Renewal(session, bridge_tls, cfg.data_dir / TLS_DIR,
                               channels.upstream(channels.CLUSTER_CSR).topic(),
                               on_renewed=(lambda: _restart_native_bridge(broker, orchestrator)) if native else None)
                       if bridge_tls else None)
            desk = JoinDesk(credentials, "node", issuer, JoinPolicy(tokens, cfg.join_token, cfg.open_join),
                            on_token_used=lambda token_id: session.send(
                                channels.upstream(channels.CLUSTER_TOKEN_USED), {"id": token_id}))
            if cfg.open_join:
                log.warning("OPEN JOIN: any worker that reaches port %d may join (--open-join)", broker.port)
            bridge = None if native else Bridge(cfg.name, _root_side(cfg, login, bridge_tls), session)
            async with session:
                orchestrator = ClusterOrchestrator(cfg.name, store, scheduling, session, cfg.location,
                                                   lambda node: _expiry(credentials, Identity(NODE, node).username),
                                                   stuck_after=cfg.stuck_after)
                await orchestrator.restore()
                measured = orchestrator.metrics = TierMetrics("cluster")
                measured.watch_session("workers", session)
                if bridge:
                    measured.watch_session("root", bridge.root)
                measured.watch_store("cluster", store)
                measured.read(cluster_metrics.reader(orchestrator, broker.clients))
                relay = Relay(orchestrator.assigned, session, lambda: list(orchestrator.nodes))
                inbox = Inbox()
                orchestrator.listen(inbox)
                inbox.on(channels.JOIN_REQUEST, lambda m: desk.handle(session, m))
                inbox.on(channels.downstream(channels.CLUSTER_TOKENS), lambda m: _take_tokens(tokens, m))
                inbox.on(channels.downstream(channels.CLUSTER_COMMAND), lambda m: _revoke(broker, tier, m),
                         verb="revoke")
                inbox.on(channels.downstream(channels.CLUSTER_COMMAND), relay.command, verb="logs")
                inbox.on(channels.downstream(channels.CLUSTER_COMMAND), relay.delete_volumes, verb="volumes")
                inbox.on(channels.NODE_ANSWER, relay.answer)
                secrets = SecretRelay(session, orchestrator.assigned)
                inbox.on(channels.NODE_SECRETS_ASK, secrets.ask)
                inbox.on(channels.downstream(channels.CLUSTER_SECRETS), secrets.answer)
                if renewer:
                    inbox.on(renewer.requests, lambda m: renewer.answer(session, m))
                if renewal:
                    inbox.on(channels.downstream(channels.CLUSTER_CERT), renewal.take)
                await inbox.subscribe(session, elsewhere=bridge.delivers if bridge else "")
                if tier:
                    session.send(channels.JOIN_CA, tier.discovery())
                info = ClusterInfo(cfg.name, cfg.location, VERSION, ",".join(scheduling.names))
                session.send(channels.upstream(channels.CLUSTER_INFO), models.dump(info), f"cluster/{cfg.name}")
                log.info("cluster %s serving workers on port %d", cfg.name, broker.port)
                if ready:
                    ready.set()
                await serve(session, inbox, orchestrator.run(), metrics.serve(measured, cfg.metrics), Heap().run(),
                            *([renewal.run()] if renewal else []), *([bridge.run()] if bridge else []))
    finally:
        store.close()


async def _restart_native_bridge(broker: RunningBroker, orchestrator: ClusterOrchestrator) -> None:
    """mosquitto's own bridge reads its certificate only when mosquitto starts: restart it, telling the
    orchestrator first that the workers' last wills it is about to see mean nothing."""
    if broker.restart is None:
        return
    log.info("restarting mosquitto so that its bridge to the root uses the renewed certificate")
    orchestrator.hold_offline(RESTART_GRACE)
    await broker.restart()


def _expiry(credentials: Credentials, username: str) -> float:
    """When *username*'s certificate ends (0.0: it has none)."""
    certificate = credentials.certificate(username)
    return certificate[1] if certificate else 0.0


async def _revoke(broker: RunningBroker, tier: TierCa | None, revocation: Received[dict[str, Any]]) -> None:
    """The root asks to refuse a worker from now on: its account and certificate go, it is disconnected
    (its last will says offline, so its instances move)."""
    node = str((revocation.body or {}).get("node"))
    if not topics.is_valid_id(node) or not await broker.revoke(Identity(NODE, node).username, tier):
        log.warning("the root revoked worker %r, which has not joined here", node)


async def _take_tokens(tokens: JoinTokens, sent: Received[dict[str, Any]]) -> None:
    """The root's tokens for workers, as it last sent them."""
    try:
        records = (sent.body or {})["tokens"]
        if not isinstance(records, dict):
            raise TypeError("not an object")
        await tokens.replace(records)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("the root's join tokens: %s (the readable ones are used)", exc)


def _native_bridge(cfg: ClusterConfig, login: Login) -> NativeBridge | None:
    """mosquitto's own bridge to the root, when asked for."""
    if not cfg.native_bridge:
        return None
    if cfg.broker.kind != MOSQUITTO:
        raise ValueError("mosquitto's own bridge needs the cluster's broker to be mosquitto (--broker mosquitto)")
    return NativeBridge(cfg.name, login.at(cfg.root), login.username, login.password, login.ca, login.cert, login.key)


def _root_side(cfg: ClusterConfig, login: Login, tls: ssl.SSLContext | None) -> MqttSession:
    """The bridge's session on the root broker (logging in with *tls*, renewed in place): persistent, with the
    cluster's last will."""
    return MqttSession(login.at(cfg.root), login.username, login.username, login.password, tls=tls,
                       avail_topic=channels.CLUSTER_AVAIL.topic(cluster=cfg.name), clean_session=False)
