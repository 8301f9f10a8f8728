"""Which broker a root or cluster runs on: embedded amqtt, a mosquitto it runs, or an existing one.

``--broker embedded`` (the default) runs amqtt in the tier's process; ``--broker mosquitto`` runs
mosquitto as a child process fed by :mod:`broker.mosquitto`; ``--broker mqtt://host:port`` starts no
broker and connects to that one with ``--broker-user``/``--broker-password``, a login that may do
everything there (that broker's accounts and topic rules are its operator's job).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from broker.credentials import Credentials
from broker.identity import SERVICE, Identity
from broker.mosquitto import MosquittoBroker, MosquittoCredentials
from broker.mosquitto_files import NativeBridge
from broker.server import EmbeddedBroker, Listeners
from services.common.mqtt import BrokerUrl
from services.common.store import Store

EMBEDDED, MOSQUITTO, EXTERNAL = "embedded", "mosquitto", "external"


@dataclass(frozen=True)
class BrokerSpec:
    """The ``--broker`` choice."""

    kind: str = EMBEDDED
    url: BrokerUrl | None = None
    username: str = ""
    password: str = ""

    @classmethod
    def parse(cls, value: str, username: str = "", password: str = "") -> BrokerSpec:
        """``embedded``, ``mosquitto`` or ``mqtt://host:port`` (with the login to use there)."""
        if value in (EMBEDDED, MOSQUITTO):
            return cls(value)
        url = BrokerUrl.parse(value)
        if not username or not password:
            raise ValueError(f"--broker {value} needs --broker-user and --broker-password "
                             "(or $OAK_BROKER_USER and $OAK_BROKER_PASSWORD)")
        return cls(EXTERNAL, url, username, password)


@dataclass(frozen=True)
class RunningBroker:
    """Where the tier's own services connect, and with which login."""

    url: BrokerUrl
    credentials: Credentials
    spec: BrokerSpec

    @property
    def port(self) -> int:
        """The broker's port."""
        return self.url.port

    def login(self, service: str) -> tuple[str, str]:
        """Username and password of the in-process service *service* (``root``, ``cluster``...)."""
        if self.spec.kind == EXTERNAL:
            return self.spec.username, self.spec.password
        username = Identity(SERVICE, service).username
        return username, self.credentials.service_password(username)


def make_credentials(spec: BrokerSpec, store: Store, join_token: str | None) -> Credentials:
    """The credentials object the broker of *spec* needs."""
    return MosquittoCredentials(store, join_token) if spec.kind == MOSQUITTO else Credentials(store, join_token)


@contextlib.asynccontextmanager
async def open_broker(
    spec: BrokerSpec,
    listeners: Listeners,
    credentials: Credentials,
    data_dir: Path,
    services: tuple[str, ...],
    bridge: NativeBridge | None = None,
) -> AsyncIterator[RunningBroker]:
    """Start (or just reach) the tier's broker; *services* are the in-process services that log in."""
    for service in services:
        credentials.service_password(Identity(SERVICE, service).username)
    if spec.kind == EXTERNAL:
        assert spec.url is not None
        yield RunningBroker(spec.url, credentials, spec)
    elif spec.kind == MOSQUITTO:
        assert isinstance(credentials, MosquittoCredentials)
        async with MosquittoBroker(listeners, credentials, data_dir / "mosquitto", bridge) as mosquitto:
            yield RunningBroker(BrokerUrl(mosquitto.local_host, mosquitto.port), credentials, spec)
    else:
        async with EmbeddedBroker(listeners, credentials) as embedded:
            yield RunningBroker(BrokerUrl("127.0.0.1", embedded.port), credentials, spec)
