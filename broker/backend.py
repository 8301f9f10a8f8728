"""Which broker a root or cluster runs on: embedded amqtt, a mosquitto it runs, or an existing one.

``--broker embedded`` (the default) runs amqtt in the tier's process; ``--broker mosquitto`` runs
mosquitto as a child process fed by :mod:`broker.mosquitto`; ``--broker mqtt://host:port`` starts no
broker. There, with ``--broker-files DIR --broker-reload CMD``, oak keeps that mosquitto's password and
ACL files (:mod:`broker.external`) and its services log in with accounts of their own; without them it
connects with ``--broker-user``/``--broker-password``, a login that may do everything there, and the
broker's accounts and topic rules are its operator's job.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from broker.credentials import Credentials
from broker.external import ExternalFiles
from broker.identity import SERVICE, Identity
from broker.mosquitto import MosquittoBroker, MosquittoCredentials
from broker.mosquitto_files import NativeBridge
from broker.server import EmbeddedBroker, Listeners
from broker.tier_ca import TierCa
from services.common.loop_thread import LoopThread
from services.common.mqtt import BrokerUrl
from services.common.store import Store

log = logging.getLogger(__name__)
EMBEDDED, MOSQUITTO, EXTERNAL = "embedded", "mosquitto", "external"


@dataclass(frozen=True)
class BrokerSpec:
    """The ``--broker`` choice."""

    kind: str = EMBEDDED
    url: BrokerUrl | None = None
    username: str = ""
    password: str = ""
    files: Path | None = None  # an existing mosquitto's password and ACL files, kept by oak
    reload: str = ""  # the shell command that has that mosquitto re-read them

    @classmethod
    def parse(cls, value: str, username: str = "", password: str = "", files: str = "",
              reload: str = "") -> BrokerSpec:
        """``embedded``, ``mosquitto`` or ``mqtt://host:port`` (with oak's files there, or a login)."""
        if value in (EMBEDDED, MOSQUITTO):
            if files:
                raise ValueError("--broker-files is for a broker you run: --broker mqtt://HOST:PORT")
            return cls(value)
        url = BrokerUrl.parse(value)
        if files:
            if not reload:
                raise ValueError("--broker-files needs --broker-reload, the command that has the broker re-read "
                                 "them (e.g. 'kill -HUP $(cat /run/mosquitto/mosquitto.pid)')")
            return cls(EXTERNAL, url, files=Path(files), reload=reload)
        if not username or not password:
            raise ValueError(f"--broker {value} needs --broker-files and --broker-reload (oak keeps the broker's "
                             "accounts), or --broker-user and --broker-password (you keep them; also "
                             "$OAK_BROKER_USER and $OAK_BROKER_PASSWORD)")
        return cls(EXTERNAL, url, username, password)

    @property
    def runs_listeners(self) -> bool:
        """True when oak runs the broker (embedded or mosquitto) and so its listeners, TLS and CA."""
        return self.kind != EXTERNAL

    @property
    def oak_accounts(self) -> bool:
        """True when the broker holds oak's accounts (so its services log in with their own)."""
        return self.kind != EXTERNAL or self.files is not None


async def _nobody(username: str) -> int:
    """A broker someone else runs: its operator disconnects revoked identities."""
    log.warning("revoked %s: this broker is not oak's, so its operator must disconnect it", username)
    return 0


@dataclass(frozen=True)
class RunningBroker:
    """Where the tier's own services connect, and with which login."""

    url: BrokerUrl
    credentials: Credentials
    spec: BrokerSpec
    tls_port: int | None = None  # where users and machines connect, when the tier runs TLS
    cert_port: int | None = None  # where machines log in with certificates, when not on tls_port (mosquitto)
    cut_off: Callable[[str], Awaitable[int]] = _nobody  # disconnect a revoked identity at once
    restart: Callable[[], Awaitable[None]] | None = None  # the mosquitto oak runs, started again
    clients: Callable[[], int] | None = None  # how many clients are connected (the embedded broker knows)

    @property
    def port(self) -> int:
        """The port users and machines connect to (TLS where the tier runs it)."""
        return self.tls_port if self.tls_port is not None else self.url.port

    async def revoke(self, username: str, tier: TierCa | None) -> bool:
        """Refuse *username* from now on (its account and certificate) and disconnect it; False if unknown."""
        if not await self.credentials.revoke(username):
            return False
        if tier is not None:
            tier.write_crl(await self.credentials.revoked())
        await self.cut_off(username)
        log.warning("revoked %s: disconnected, and refused from now on", username)
        return True

    def login(self, service: str) -> tuple[str, str]:
        """Username and password of the in-process service *service* (``root``, ``cluster``...)."""
        if not self.spec.oak_accounts:
            return self.spec.username, self.spec.password
        username = Identity(SERVICE, service).username
        return username, self.credentials.service_password(username)


def make_credentials(spec: BrokerSpec, store: Store) -> Credentials:
    """The credentials object the broker of *spec* needs."""
    mosquitto = spec.kind == MOSQUITTO or (spec.kind == EXTERNAL and spec.files is not None)
    return MosquittoCredentials(store) if mosquitto else Credentials(store)


@contextlib.asynccontextmanager
async def open_broker(
    spec: BrokerSpec,
    listeners: Listeners,
    credentials: Credentials,
    data_dir: Path,
    services: tuple[str, ...],
    bridge: NativeBridge | None = None,
    own_loop: bool = False,
) -> AsyncIterator[RunningBroker]:
    """Start (or just reach) the tier's broker; *services* are the in-process services that log in. An
    embedded broker runs on the tier's event loop, or with *own_loop* on one of its own
    (:mod:`services.common.loop_thread`)."""
    for service in services:
        credentials.service_password(Identity(SERVICE, service).username)
    if spec.kind == EXTERNAL and spec.files is not None:
        assert spec.url is not None
        assert isinstance(credentials, MosquittoCredentials)
        async with ExternalFiles(credentials, spec.url, spec.files, spec.reload):
            yield RunningBroker(spec.url, credentials, spec)
    elif spec.kind == EXTERNAL:
        assert spec.url is not None
        yield RunningBroker(spec.url, credentials, spec)
    elif spec.kind == MOSQUITTO:
        assert isinstance(credentials, MosquittoCredentials)
        async with MosquittoBroker(listeners, credentials, data_dir / "mosquitto", bridge) as mosquitto:
            yield RunningBroker(BrokerUrl(mosquitto.local_host, mosquitto.port), credentials, spec, mosquitto.tls_port,
                                mosquitto.cert_port, mosquitto.cut_off, mosquitto.restart)
    else:
        embedded = EmbeddedBroker(listeners, credentials)
        thread = LoopThread("broker", lambda: embedded) if own_loop else None
        async with thread or embedded:
            cut_off = (lambda username: thread.run(embedded.cut_off(username))) if thread else embedded.cut_off
            yield RunningBroker(BrokerUrl("127.0.0.1", embedded.port), credentials, spec, embedded.tls_port,
                                cut_off=cut_off, clients=embedded.connected)
