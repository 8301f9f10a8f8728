"""Wires the root orchestrator: its broker, store, credentials, scheduler, API and placement."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from broker.backend import BrokerSpec, make_credentials, open_broker
from broker.credentials import Credentials, new_password
from broker.join import JoinDesk
from broker.server import Listeners
from services.common import plugins, profile, topics
from services.common.mqtt import MqttSession, serve
from services.common.private import private_dir, write_secret
from services.common.store import Store
from services.root.api import Api
from services.root.catalog import Catalog
from services.root.network import RootNetwork
from services.root.orchestrator import RootOrchestrator
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
    join_token: str | None = None
    advertise: str = "127.0.0.1"
    broker: BrokerSpec = BrokerSpec()


async def ensure_admin(cfg: RootConfig, credentials: Credentials, port: int) -> None:
    """Create the admin user on first start and keep its credentials in ``credentials.json`` (0600)."""
    path = cfg.data_dir / CREDENTIALS_FILE
    url = f"mqtt://{cfg.advertise}:{port}"
    if credentials.exists(ADMIN) and path.exists():
        saved = json.loads(path.read_text())
        if saved.get("root") != url:  # the port may differ from the last run (e.g. --port 0)
            write_secret(path, {**saved, "root": url})
        return
    password = new_password()
    await credentials.set_password(ADMIN, password, admin=True)
    write_secret(path, {"username": ADMIN, "password": password, "root": url})
    log.info("created user %r; its credentials are in %s", ADMIN, path)


async def run_root(cfg: RootConfig, ready: asyncio.Event | None = None) -> None:
    """Run the root orchestrator until cancelled; set *ready* once it serves requests."""
    scheduling = profile.load(plugins.make_manager(), cfg.scheduler, cfg.scheduler_profile)
    private_dir(cfg.data_dir)
    store = Store(cfg.data_dir / "root.db.json")
    credentials = make_credentials(cfg.broker, store, cfg.join_token)
    await credentials.load()
    catalog = Catalog(store)
    await catalog.load()
    try:
        async with open_broker(cfg.broker, cfg.listen, credentials, cfg.data_dir, ("root",)) as broker:
            session = MqttSession(broker.url, "root", *broker.login("root"),
                                  avail_topic=topics.ROOT_AVAIL, announce=False)
            async with session:
                network = RootNetwork(store, session)
                await network.load()
                orchestrator = RootOrchestrator(catalog, scheduling, session, credentials.users, network)
                streams = LogStreams(session)
                api = Api(catalog, orchestrator, credentials, streams)
                desk = JoinDesk(credentials, "cluster")
                orchestrator.start()
                await session.subscribe_confirmed(topics.API_REQUESTS, topics.JOIN_REQUESTS)
                session.announce()  # oak/root/avail online: clients wait for it before their first request
                await ensure_admin(cfg, credentials, broker.port)
                log.info("root serving on port %d (scheduling: %s)", broker.port, ", ".join(scheduling.names))
                if ready:
                    ready.set()
                await serve(session, {
                    topics.JOIN_REQUESTS: lambda m: desk.handle(session, m),
                    topics.API_REQUESTS: lambda m: api.handle(session, m),
                    topics.up_filter(topics.CLUSTERS, "res/+"): streams.answer,
                    topics.up_filter(topics.CLUSTERS, "#"): orchestrator.handle_cluster,
                }, orchestrator.run())
    finally:
        store.close()
