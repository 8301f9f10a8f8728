"""Wires the root orchestrator: its broker, store, credentials, scheduler, API and placement."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from broker import ca
from broker.backend import EMBEDDED, BrokerSpec, make_credentials, open_broker
from broker.credentials import Credentials, new_password
from broker.identity import CLUSTER
from broker.join import Issuer, JoinDesk
from broker.renewal import Renewer
from broker.server import Listeners
from broker.tier_ca import TierCa
from broker.tokens import JoinPolicy, JoinTokens
from services.common import channels, metrics, plugins, profile
from services.common.heap import Heap
from services.common.inbox import Inbox, Received, serve
from services.common.metrics import Endpoint, TierMetrics
from services.common.mqtt import BrokerUrl, MqttSession
from services.common.private import private_dir, write_secret
from services.common.store import Store
from services.root import metrics as root_metrics
from services.root.api import BUSY_BACKLOG, Api
from services.root.catalog import Catalog
from services.root.events import Feed
from services.root.joining import RootJoining
from services.root.lane import LaneThread
from services.root.lane_process import LaneProcess
from services.root.network import RootNetwork
from services.root.orchestrator import RootOrchestrator
from services.root.secrets import SecretDesk, Secrets, key_at
from services.root.streams import LogStreams

log = logging.getLogger(__name__)
CREDENTIALS_FILE = "credentials.json"
ADMIN = "admin"


@dataclass(frozen=True)
class RootConfig:
    """How to run the root orchestrator."""

    data_dir: Path
    listen: Listeners = Listeners("0.0.0.0", 10000)
    scheduler: str = profile.DEFAULT
    scheduler_profile: Path | None = None
    join_token: str | None = None  # a fixed token clusters may join with (besides `oak token create`'s)
    advertise: str = "127.0.0.1"
    broker: BrokerSpec = BrokerSpec()
    plain_loopback: bool = False  # users may also connect without TLS, on 127.0.0.1:plain_port
    plain_port: int = 0
    open_join: bool = False  # clusters may join without a token
    cert_days: float = ca.CERT_DAYS  # how long the clusters' certificates last
    busy_backlog: int = BUSY_BACKLOG  # a user's requests waiting beyond which they are answered "busy"
    metrics: Endpoint = Endpoint()  # where Prometheus scrapes this root (port 0: nowhere)


async def ensure_admin(cfg: RootConfig, credentials: Credentials, url: BrokerUrl, cafile: Path | None) -> None:
    """Create the admin user on first start and keep its credentials in ``credentials.json`` (0600), with
    where the root listens (``mqtts://`` where it runs TLS) and the CA that proves it is the root."""
    path = cfg.data_dir / CREDENTIALS_FILE
    where = {"root": str(url), **({"ca": str(cafile)} if cafile else {})}
    if credentials.exists(ADMIN) and path.exists():
        saved = json.loads(path.read_text())
        if {k: saved.get(k) for k in where} != where:  # the port may differ from the last run (e.g. --port 0)
            write_secret(path, {**{k: v for k, v in saved.items() if k not in ("root", "ca")}, **where})
        return
    password = new_password()
    await credentials.set_password(ADMIN, password, admin=True)
    write_secret(path, {"username": ADMIN, "password": password, **where})
    log.info("created user %r; its credentials are in %s", ADMIN, path)


async def run_root(cfg: RootConfig, ready: asyncio.Event | None = None) -> None:
    """Run the root orchestrator until cancelled; set *ready* once it serves requests."""
    scheduling = profile.load(plugins.make_manager(), cfg.scheduler, cfg.scheduler_profile)
    private_dir(cfg.data_dir)
    store = Store(cfg.data_dir / "root.db.json")
    credentials = make_credentials(cfg.broker, store)
    await credentials.load()
    tokens = JoinTokens(store)
    await tokens.load()
    catalog = Catalog(store)
    await catalog.load()
    secrets = Secrets(store, key_at(cfg.data_dir))
    await secrets.load()
    tier = TierCa.root(cfg.data_dir) if cfg.broker.runs_listeners else None
    listen = (tier.listeners(cfg.listen, await credentials.revoked(), cfg.plain_loopback, cfg.plain_port)
              if tier else cfg.listen)
    credentials.machines_by_certificate = tier is not None
    try:
        async with open_broker(cfg.broker, listen, credentials, cfg.data_dir, ("root",), own_loop=True) as broker:
            session = MqttSession(broker.url, "root", *broker.login("root"),
                                  avail_topic=channels.ROOT_AVAIL.topic(), announce=False)
            async with session, contextlib.AsyncExitStack() as stack:
                network = RootNetwork(store, session)
                await network.load()
                orchestrator = RootOrchestrator(catalog, scheduling, session, credentials.users, network)
                feed = orchestrator.events = Feed(session, credentials.users)
                measured = orchestrator.metrics = TierMetrics("root")
                measured.watch_session("clusters", session)
                measured.watch_store("root", store)
                measured.read(root_metrics.reader(orchestrator, broker.clients))
                streams = LogStreams(session)
                public = BrokerUrl(cfg.advertise, broker.port, tls=tier is not None)
                issuer = Issuer(tier.authority, tier.fleet_ca, broker.cert_port, cfg.cert_days) if tier else None
                joining = RootJoining(tokens, session, credentials.usernames, public,
                                      tier.fingerprint if tier else None, lambda name: broker.revoke(name, tier),
                                      issuer)
                api = Api(catalog, orchestrator, credentials, streams, joining, cfg.busy_backlog, secrets)
                renewer = Renewer(credentials, tier.authority, CLUSTER, cfg.cert_days) if tier else None
                desk = JoinDesk(credentials, "cluster", issuer, JoinPolicy(tokens, cfg.join_token, cfg.open_join))
                if cfg.open_join:
                    log.warning("OPEN JOIN: any cluster that reaches port %d may join (--open-join)", broker.port)
                joining.publish()
                if tier:
                    session.send(channels.JOIN_CA, tier.discovery())
                orchestrator.start()

                async def join(request: Received[bytes]) -> None:
                    joined = await desk.handle(session, request)
                    if joined:
                        joining.publish(joined)

                inbox = Inbox()
                orchestrator.listen(inbox)
                inbox.on(channels.CLUSTER_ANSWER, streams.answer)
                inbox.on(channels.JOIN_REQUEST, join)
                inbox.on(channels.CLUSTER_TOKEN_USED, joining.used)
                inbox.on(channels.CLUSTER_SECRETS_ASK, SecretDesk(secrets, catalog, session).ask)
                if renewer:
                    inbox.on(renewer.requests, lambda m: renewer.answer(session, m))
                await inbox.subscribe(session)
                # The users' requests come on a connection of their own, on a loop of their own: they never
                # queue behind the clusters' traffic, nor (services/list) behind the root's work.
                # With the broker in a process of its own, so is the lane (services/root/lane_process.py).
                lane_kind: type[LaneThread | LaneProcess] = LaneThread if cfg.broker.kind == EMBEDDED else LaneProcess
                lane = lane_kind(broker.url, *broker.login("root"), api, orchestrator.states_now)
                await stack.enter_async_context(lane)
                orchestrator.on_states = lane.publish
                measured.watch_session("users", lane.traffic)
                session.announce()  # oak/root/avail online: clients wait for it before their first request
                await ensure_admin(cfg, credentials, public, tier.cafile if tier else None)
                log.info("root serving on %s (scheduling: %s)", public, ", ".join(scheduling.names))
                if tier:
                    log.info("the fleet's CA: %s, fingerprint %s", tier.cafile, tier.fingerprint)
                if ready:
                    ready.set()
                await serve(session, inbox, orchestrator.run(), lane.run(), api.run(),
                            metrics.serve(measured, cfg.metrics), feed.run(), Heap().run())
    finally:
        store.close()
