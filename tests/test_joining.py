"""Joining over TLS with a pinned CA and join tokens, on a real embedded broker with the root's CA.

A newcomer checks the CA's fingerprint before it sends its token; tokens are kept hashed and refused
when wrong, expired, used up or for another kind; a joined worker logs in with its certificate, and
nothing else logs a machine in: not a password, not plain TCP, not a certificate of another CA.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker import ca
from broker.backend import EMBEDDED, MOSQUITTO, BrokerSpec, make_credentials, open_broker
from broker.credentials import Credentials
from broker.join import Issuer, JoinDesk, Login, obtain_login
from broker.server import Listeners
from broker.tier_ca import TierCa
from broker.tokens import JoinPolicy, JoinTokens
from services.common import channels
from services.common.inbox import Inbox
from services.common.mqtt import BrokerUrl, MqttError, MqttSession, tls_context
from services.common.store import Store


@dataclass
class Parent:
    """A tier's broker with its CA and join desk, as a cluster runs them."""

    url: BrokerUrl  # TLS: users and newcomers
    plain: BrokerUrl
    cert: BrokerUrl  # where certificates log in (mosquitto: a listener of its own)
    tier: TierCa
    tokens: JoinTokens
    credentials: Credentials
    store_path: Path


@pytest.fixture(params=[EMBEDDED, MOSQUITTO])
async def parent(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Parent]:
    """A broker (embedded, or mosquitto run by oak) that runs a CA and answers ``node`` join requests with
    tokens required, as a cluster does."""
    if request.param == MOSQUITTO and shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed (make test installs it when run as root)")
    spec = BrokerSpec(request.param)
    store = Store(tmp_path / "parent" / "db.json")
    credentials = make_credentials(spec, store)
    await credentials.load()
    credentials.machines_by_certificate = True
    tokens = JoinTokens(store)
    tier = TierCa.root(tmp_path / "parent")
    listeners = tier.listeners(Listeners("127.0.0.1", 0), [])
    async with open_broker(spec, listeners, credentials, tmp_path / "parent", ("desk",)) as broker:
        service = MqttSession(broker.url, "desk", *broker.login("desk"))
        async with service:
            issuer = Issuer(tier.authority, tier.fleet_ca, broker.cert_port)
            desk = JoinDesk(credentials, "node", issuer, JoinPolicy(tokens))
            service.send(channels.JOIN_CA, tier.discovery())
            inbox = Inbox()
            inbox.on(channels.JOIN_REQUEST, lambda m: desk.handle(service, m))
            await inbox.subscribe(service)
            serving = asyncio.create_task(inbox.run(service))
            tls = BrokerUrl("127.0.0.1", broker.port, tls=True)
            yield Parent(tls, broker.url, BrokerUrl("127.0.0.1", broker.cert_port or broker.port, tls=True), tier,
                         tokens, credentials, tmp_path / "parent" / "db.json")
            serving.cancel()
    store.close()


async def _join(parent: Parent, where: Path, token: str | None, fingerprint: str | None = None,
                name: str = "w1") -> Login:
    return await obtain_login(where, parent.url, "node", name, token, timeout=10,
                              fingerprint=fingerprint or parent.tier.fingerprint)


async def test_a_token_and_the_right_fingerprint_give_a_certificate_that_logs_in(parent: Parent,
                                                                               tmp_path: Path) -> None:
    """The worker's certificate logs it in as node.w1, verified against the fleet's CA; the token is
    stored hashed and allowed one use."""
    token, _ = await parent.tokens.create("node", 3600, 1)
    login = await _join(parent, tmp_path / "w1", token)
    assert login.username == "node.w1"
    assert login.cert is not None
    assert (tmp_path / "w1" / "tls" / "key.pem").stat().st_mode & 0o777 == 0o600
    cert = ca.load_certs((tmp_path / "w1" / "tls" / "cert.pem").read_bytes())[0]
    assert ca.common_name(cert) == "node.w1"
    assert login.at(parent.url) == parent.cert, "the join answer names where certificates log in"
    async with MqttSession(parent.cert, "node.w1", "node.w1", "", tls=login.tls(),
                           retry_first_connect=False) as session:
        await session.subscribe_confirmed(channels.NODE_DESIRED.topic(node="w1"))
    secret = token.split(".")[2]
    stored = "".join(p.read_text() for p in parent.store_path.parent.iterdir() if p.name.startswith("db.json"))
    assert token.split(".")[1] in stored, "the token's record is on disk"
    assert secret not in stored, "the token's secret is on disk in clear"
    with pytest.raises(MqttError, match="used up"):
        await _join(parent, tmp_path / "w2", token, name="w2")


async def test_a_wrong_fingerprint_stops_the_join_before_the_token_is_sent(parent: Parent, tmp_path: Path) -> None:
    """A newcomer given another CA's fingerprint learns the CA differs and sends nothing: the one-use
    token still works afterwards."""
    token, _ = await parent.tokens.create("node", 3600, 1)
    other = ca.Authority.create("someone else's CA")
    with pytest.raises(MqttError, match="not the sha256:"):
        await _join(parent, tmp_path / "w1", token, fingerprint=other.fingerprint)
    assert not (tmp_path / "w1" / "identity.json").exists()
    assert parent.tokens.refusal(token, "node") == "", "the token was spent by a join that stopped"
    assert (await _join(parent, tmp_path / "w1", token)).username == "node.w1"


@pytest.mark.parametrize(("kind", "ttl", "tamper", "why"), [
    ("node", 0.2, False, "expired"),
    ("cluster", 3600, False, "for a cluster"),
    ("node", 3600, True, "unknown join token"),
    (None, 0, False, "joining needs a token"),
])
async def test_bad_tokens_are_refused_with_a_reason(parent: Parent, tmp_path: Path, kind: str | None, ttl: float,
                                                    tamper: bool, why: str) -> None:
    """Expired, for another kind, tampered with, or missing: refused, saying why, and nothing kept."""
    token = None
    if kind is not None:
        token, _ = await parent.tokens.create(kind, ttl, None)
        await asyncio.sleep(0.3)  # past the short one's end
        if tamper:
            token = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    with pytest.raises(MqttError, match=why):
        await _join(parent, tmp_path / "w1", token)
    assert not (tmp_path / "w1" / "identity.json").exists()
    assert not parent.credentials.exists("node.w1")


async def test_only_a_certificate_of_this_ca_logs_a_machine_in(parent: Parent, tmp_path: Path) -> None:
    """A forged certificate (another CA, same name), a machine's password, a client without a certificate
    and plain TCP on the TLS port are all refused; the worker's real certificate is let in."""
    token, _ = await parent.tokens.create("node", 3600, None)
    login = await _join(parent, tmp_path / "w1", token)
    forger = ca.Authority.create("Oakling root CA")  # the same name as the real one, another key
    key = ca.new_key()
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "cert.pem").write_bytes(ca.cert_pem(forger.issue(key.public_key(), "node.w1")))
    (forged / "key.pem").write_bytes(ca.key_pem(key))
    fleet = tmp_path / "w1" / "tls" / "ca.pem"
    attempts = {
        "forged certificate": tls_context(fleet, forged / "cert.pem", forged / "key.pem"),
        "no certificate": tls_context(fleet),
    }
    for what, context in attempts.items():
        for url in {parent.url, parent.cert}:
            with pytest.raises((MqttError, ssl.SSLError, OSError)):  # noqa: PT012 - one attempt per context
                async with MqttSession(url, "node.w1", "node.w1", "x", tls=context, retry_first_connect=False):
                    pytest.fail(f"a {what} logged node.w1 in at {url}")
    with pytest.raises(MqttError):
        async with MqttSession(parent.plain, "node.w1", "node.w1", "x", retry_first_connect=False):
            pass
    plain_on_tls = MqttSession(BrokerUrl("127.0.0.1", parent.url.port), "node.w1", "node.w1", "x",
                               retry_first_connect=False)
    with pytest.raises((MqttError, TimeoutError)):
        await asyncio.wait_for(plain_on_tls.__aenter__(), 3)
    async with MqttSession(parent.cert, "node.w1", "node.w1", "", tls=login.tls(), retry_first_connect=False):
        pass
