"""Joining: a new cluster (at the root) or worker (at a cluster) obtains an identity of its own.

Where the parent runs a CA (every tier oak runs itself) the identity is a certificate:

1. **Discovery.** The newcomer connects with TLS it cannot verify yet, as ``join.discover`` (which may
   read nothing but ``oak/join/ca``), and reads the fleet's CA from that retained topic. It checks the
   CA's fingerprint against the one in its join command (``sha256:...``) and stops if they differ: a
   man in the middle learns nothing, not even the token.
2. **Join.** It connects again, now verifying the parent's server certificate against that CA, as
   ``join.newcomer`` with client id ``<nonce>`` and the join token as password (``-`` when joining is
   open), publishes ``{"kind": "node", "name": "w1", "csr": <PEM>}`` on ``oak/join/request/<nonce>``
   and reads ``{"ok": true, "username", "cert", "ca"}`` from ``oak/join/response/<nonce>`` (a cluster
   also sends ``ca_csr``, its own CA's key, and receives ``ca_cert``, that CA signed by the root).
3. It keeps ``identity.json`` and ``tls/{key,cert,ca}.pem`` (0600) in its data dir and logs in with
   its certificate from then on.

Where the parent has no CA (a broker you operate yourself, plain ``mqtt://``) the desk answers a
username and password instead, and no discovery happens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker import ca
from broker.credentials import Credentials, new_password
from broker.identity import CLUSTER, DISCOVER, NEWCOMER, OPEN_JOIN_PASSWORD, Identity
from broker.tokens import JoinPolicy, JoinTokens
from services.common import channels, topics
from services.common.inbox import Received
from services.common.mqtt import BrokerUrl, MqttError, MqttSession, tls_context
from services.common.private import private_dir, write_private, write_secret

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
TLS_DIR = "tls"
NONCE_FILE = "join-nonce.json"  # the nonce of a join under way: a retry after a timeout asks again with it
RESEND_FIRST, RESEND_MAX = 3.0, 30.0  # a newcomer re-sends its request after 3 s, then backs off to 30 s
ANSWERS_KEPT, ANSWER_TTL = 10_000, 600.0  # join answers kept to answer a repeated request the same way
REFUSED_GRACE = 30.0  # a newcomer refused by the broker tries again for this long before giving up
DISCOVERY_TIMEOUT = 10.0


@dataclass(frozen=True)
class Login:
    """How a cluster or worker logs in to its parent: a certificate (with the fleet's CA to verify the
    parent by), or, with a parent that runs no CA, a password."""

    username: str
    password: str = ""
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    port: int | None = None  # the parent's port for certificate logins, when not the one joined on

    def expired(self) -> bool:
        """True when this login's certificate has ended."""
        if self.cert is None:
            return False
        end = ca.load_certs(self.cert.read_bytes())[0].not_valid_after_utc.timestamp()
        return end < time.time()

    def at(self, url: BrokerUrl) -> BrokerUrl:
        """Where to log in with this login at the parent reached at *url*."""
        return BrokerUrl(url.host, self.port, url.tls) if self.port else url

    def tls(self) -> Any:
        """The TLS context of this login (None for a password login)."""
        return tls_context(self.ca, self.cert, self.key) if self.cert is not None else None

    @classmethod
    def load(cls, data_dir: Path) -> Login | None:
        """The login kept in *data_dir*, if it has one."""
        path = data_dir / IDENTITY_FILE
        if not path.exists():
            return None
        saved = json.loads(path.read_text())
        if not saved.get("password"):
            tls = data_dir / TLS_DIR
            return cls(saved["username"], "", tls / "ca.pem", tls / "cert.pem", tls / "key.pem", saved.get("port"))
        return cls(saved["username"], saved["password"])


async def obtain_login(
    data_dir: Path, url: BrokerUrl, kind: str, name: str, token: str | None, timeout: float = 30.0,
    fingerprint: str | None = None, ca_key: ca.PrivateKey | None = None,
) -> Login:
    """Return this cluster's or worker's login, joining the parent first if it has none yet.

    *url* with TLS (``mqtts://``) joins for a certificate, pinning the fleet's CA to *fingerprint*
    (without one the CA is trusted on first use, with a warning); a cluster passes its own CA's key as
    *ca_key*, for the root to sign.
    """
    saved = Login.load(data_dir)
    username = Identity(kind, name).username
    if saved is not None and saved.username != username:
        raise ValueError(f"{data_dir / IDENTITY_FILE} is {saved.username}'s, not {username}'s: each cluster and "
                         f"worker needs a data directory of its own (for instance --data-dir {data_dir / name})")
    if saved is not None and not saved.expired():
        return saved
    if saved is not None:
        log.warning("the certificate of %s has ended (it was away too long): joining again, with a token",
                    saved.username)
    pending = data_dir / NONCE_FILE
    state = json.loads(pending.read_text()) if pending.exists() else {"nonce": secrets.token_hex(16)}
    key = ca.load_key(state["key"].encode()) if "key" in state else ca.new_key()
    write_secret(pending, {"nonce": state["nonce"], "key": ca.key_pem(key).decode()})
    nonce = state["nonce"]
    body: dict[str, Any] = {"kind": kind, "name": name, **({"token": token} if token else {})}
    trusted: str | None = None
    if url.tls:
        trusted = await discover(url, nonce, fingerprint)
        body["csr"] = ca.request(key, username).decode()
        if ca_key is not None:
            body["ca_csr"] = ca.request(ca_key, ca.cluster_ca_name(name)).decode()
    answer = await _ask_until_answered(url, nonce, json.dumps(body).encode(), timeout, f"{kind} {name!r}", trusted)
    if not answer.get("ok"):
        pending.unlink(missing_ok=True)
        raise MqttError(f"{url} refused to let {kind} {name!r} join: {answer.get('error') or answer}")
    login = _keep(data_dir, answer, key, trusted)
    pending.unlink(missing_ok=True)
    log.info("joined %s as %s; %s kept in %s", url, login.username,
             "its certificate" if login.cert else "its password", data_dir)
    return login


def _keep(data_dir: Path, answer: dict[str, Any], key: ca.PrivateKey, trusted: str | None) -> Login:
    """Write the identity the desk gave; return it as a :class:`Login`."""
    if "cert" not in answer:
        write_secret(data_dir / IDENTITY_FILE, {"username": answer["username"], "password": answer["password"]})
        return Login(answer["username"], answer["password"])
    tls = private_dir(data_dir / TLS_DIR)
    ca.load_certs(answer["cert"])  # refuse to keep anything that is not a certificate
    write_private(tls / "key.pem", ca.key_pem(key).decode())
    write_private(tls / "cert.pem", answer["cert"])
    write_private(tls / "ca.pem", trusted or answer["ca"])
    if answer.get("ca_cert"):
        write_private(tls / "ca-cross.pem", answer["ca_cert"])
    port = answer.get("port")
    write_secret(data_dir / IDENTITY_FILE, {"username": answer["username"],
                                            **({"port": port} if isinstance(port, int) else {})})
    return Login.load(data_dir) or Login(answer["username"])


async def discover(url: BrokerUrl, nonce: str, fingerprint: str | None) -> str:
    """The fleet's CA (PEM) as the parent at *url* presents it, checked against *fingerprint*."""
    try:
        async with MqttSession(url, nonce, DISCOVER, OPEN_JOIN_PASSWORD, tls=tls_context(None)) as session:
            await session.subscribe_confirmed(channels.JOIN_CA.topic())
            message = await session.get(DISCOVERY_TIMEOUT)
    except TimeoutError:
        raise MqttError(f"{url} published no CA on {channels.JOIN_CA.topic()} within {DISCOVERY_TIMEOUT:.0f} s"
                        ) from None
    try:
        pem = json.loads(message.payload)["ca"]
        authority = ca.load_certs(pem)[0]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise MqttError(f"{url} published no usable CA: {exc}") from None
    seen = ca.fingerprint(authority)
    if fingerprint is None:
        log.warning("NO CA FINGERPRINT: trusting the CA %s that %s presents; give the fingerprint from "
                    "`oak token create` to make sure it is the real one", seen, url)
    elif seen != fingerprint.strip().lower():
        raise MqttError(f"{url} presents the CA {seen}, not the {fingerprint} you were given: "
                        "not joining (a wrong address, or someone in between)")
    return str(pem)


async def _ask_until_answered(url: BrokerUrl, nonce: str, request: bytes, timeout: float, who: str,
                              trusted: str | None) -> Any:
    """:func:`_ask` again while the parent refuses newcomers, for a while (it may not have started yet)."""
    refused_until, pause = time.monotonic() + REFUSED_GRACE, 0.5
    while True:
        try:
            return await _ask(url, nonce, request, timeout, who, trusted)
        except MqttError as exc:
            # A broker oak does not run refuses newcomers until the parent's tier has written its
            # accounts: a refusal is final only after a while (a wrong join token, then).
            if time.monotonic() + pause > refused_until:
                raise
            log.warning("%s; the parent may not have started yet: asking again", exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)


async def _ask(url: BrokerUrl, nonce: str, request: bytes, timeout: float, who: str, trusted: str | None) -> Any:
    """Send the join request (again and again, backing off) until the desk answers; its answer."""
    tls = tls_context(ca_pem=trusted) if trusted is not None else None  # the parent must prove it is the CA's
    async with MqttSession(url, nonce, NEWCOMER, OPEN_JOIN_PASSWORD, tls=tls) as session:
        await session.subscribe_confirmed(channels.JOIN_RESPONSE.topic(join=nonce))
        wait = RESEND_FIRST
        async with asyncio.timeout(timeout):
            while True:
                # The same nonce each time: the desk answers a repeated request as it did the first one.
                session.send(channels.JOIN_REQUEST, request, join=nonce)
                try:
                    return json.loads((await session.get(wait)).payload)
                except TimeoutError:
                    log.info("waiting for %s to answer the join request of %s", url, who)
                    wait = min(wait * 2, RESEND_MAX)


@dataclass(frozen=True)
class Issuer:
    """What a desk signs newcomers' certificates with: this tier's CA, and the fleet's CA they keep.

    At the root both are the root's CA, and a joining cluster's own CA is signed too (``ca_csr``); at a
    cluster the cluster's CA signs its workers.
    """

    authority: ca.Authority
    fleet_ca: str  # PEM
    port: int | None = None  # where certificates log in, when not on the port the newcomer joined on
    days: float = ca.CERT_DAYS  # how long the certificates it signs last

    def answer(self, kind: str, name: str, request: dict[str, Any]) -> dict[str, Any]:
        """The certificate part of an answer; :class:`ca.CertificateError` for a bad request."""
        csr = request.get("csr")
        if not isinstance(csr, str):
            raise ca.CertificateError("the join request has no certificate signing request (csr)")
        cert = self.authority.issue(ca.requested_key(csr), Identity(kind, name).username, days=self.days)
        out: dict[str, Any] = {"cert": ca.cert_pem(cert).decode(), "ca": self.fleet_ca,
                               **({"port": self.port} if self.port else {})}
        if kind == CLUSTER:
            ca_csr = request.get("ca_csr")
            if not isinstance(ca_csr, str):
                raise ca.CertificateError("a cluster's join request needs its CA's signing request (ca_csr)")
            cross = self.authority.cross_sign(ca.requested_key(ca_csr), ca.cluster_ca_name(name))
            out["ca_cert"] = ca.cert_pem(cross).decode()
        return out


class JoinDesk:
    """Answers join requests of one kind of newcomer (``cluster`` at the root, ``node`` at a cluster)."""

    def __init__(self, credentials: Credentials, kind: str, issuer: Issuer | None = None,
                 policy: JoinPolicy | None = None, on_token_used: Callable[[str], None] | None = None) -> None:
        self.credentials = credentials
        self.kind = kind
        self.issuer = issuer
        self.policy = policy or JoinPolicy(JoinTokens(), open=True)
        self.on_token_used = on_token_used  # a cluster tells the root, which counts the uses
        # nonce -> (name, when, the answer given): a newcomer that re-sends its request (it had no answer
        # in time) gets the same answer again instead of "already joined". Bounded in number and age.
        self._given: OrderedDict[str, tuple[str, float, asyncio.Future[dict[str, Any]]]] = OrderedDict()

    def _remember(self, nonce: str, name: str) -> asyncio.Future[dict[str, Any]]:
        now = time.monotonic()
        while self._given:
            _, when, _ = next(iter(self._given.values()))
            if len(self._given) < ANSWERS_KEPT and when >= now - ANSWER_TTL:
                break
            self._given.popitem(last=False)
        given: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._given[nonce] = (name, now, given)
        return given

    async def handle(self, session: MqttSession, received: Received[bytes]) -> str | None:
        """Answer one request; return the name that joined, if one did."""
        nonce = received.names["join"]
        try:
            request = json.loads(received.message.payload)
            kind, name = request["kind"], request["name"]
        except (ValueError, KeyError, TypeError, RecursionError):
            return self._answer(session, nonce, error="the join request must be {\"kind\": ..., \"name\": ...}")
        if kind != self.kind:
            return self._answer(session, nonce, error=f"only a {self.kind} can join here, not a {kind}")
        if not topics.is_valid_id(name):
            return self._answer(session, nonce, error=f"bad name {name!r}: use letters, digits, '-' and '_'")
        username = Identity(kind, name).username
        known = self._given.get(nonce)
        if known is not None and known[0] == name:
            try:
                earlier = await asyncio.shield(known[2])  # the first request may still be being answered
            except Exception:  # noqa: BLE001 - the first attempt failed: answer this one afresh
                self._given.pop(nonce, None)
            else:
                log.info("%s %r asked again with the same nonce: answered as before", kind, name)
                self._answer(session, nonce, given=earlier)
                return None
        token = request.get("token")
        refusal = self.policy.refusal(token, kind)
        if refusal:
            return self._answer(session, nonce, error=f"{kind} {name!r}: {refusal}")
        if self.credentials.exists(username) and not self._expired(username):
            return self._answer(
                session,
                nonce,
                error=f"a {kind} named {name!r} has already joined; restart it with its own data dir "
                f"(it keeps its identity in {IDENTITY_FILE}) or choose another name",
            )
        by_token = self.policy.by_token(token, kind)
        password = new_password()
        try:
            body = self.issuer.answer(kind, name, request) if self.issuer else {"password": password}
        except ca.CertificateError as exc:
            return self._answer(session, nonce, error=str(exc))
        body["username"] = username
        promise = self._remember(nonce, name)
        try:
            await self.credentials.set_password(username, password)
        except BaseException as exc:
            self._given.pop(nonce, None)
            promise.set_exception(exc if isinstance(exc, Exception) else RuntimeError("join cancelled"))
            promise.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        if "cert" in body:  # this certificate, and no other, logs the newcomer in
            issued = ca.load_certs(body["cert"])[0]
            await self.credentials.certify(username, issued.serial_number, issued.not_valid_after_utc.timestamp())
        promise.set_result(body)
        if not by_token:
            log.warning("OPEN JOIN: %s %r joined without a valid token (--open-join)", kind, name)
        token_id = await self.policy.tokens.use(token)
        if token_id is not None and self.on_token_used is not None:
            self.on_token_used(token_id)
        self._answer(session, nonce, given=body)
        return name

    def _expired(self, username: str) -> bool:
        """True when *username*'s certificate has ended (it may join again, with a token)."""
        certificate = self.credentials.certificate(username)
        return certificate is not None and certificate[1] < time.time()

    @staticmethod
    def _answer(session: MqttSession, nonce: str, *, error: str = "", given: dict[str, Any] | None = None) -> None:
        body = {"ok": True, **given} if given else {"ok": False, "error": error}
        session.send(channels.JOIN_RESPONSE, body, join=nonce)
        if error:
            log.warning("join refused: %s", error)
