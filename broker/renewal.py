"""Certificates renewed over MQTT before they end, with no restart.

A cluster or worker whose certificate has less than a third of its life left publishes a signing
request for its own key on its ``up/csr`` channel (``{"csr": PEM}``); its parent issues a fresh
certificate, makes it the one that logs the child in, and answers on ``down/cert`` (``{"cert": PEM}``).
The child writes it and loads it into the TLS context its session reconnects with; the connection it
has stays up. Until the answer comes it asks again, more often as the end nears. A child that was away
past the end joins again with a token (broker.join).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from broker import ca
from broker.credentials import Credentials
from broker.identity import CLUSTER, Identity
from services.common import channels
from services.common.channels import Channel
from services.common.inbox import Received
from services.common.mqtt import MqttSession
from services.common.private import write_private

log = logging.getLogger(__name__)

RENEW_WHEN_LEFT = 1 / 3  # of the certificate's life
ASK_EVERY_MAX = 3600.0


@dataclass(frozen=True)
class Renewer:
    """A parent's side: certificates for its children of *kind*, signed by *authority*."""

    credentials: Credentials
    authority: ca.Authority
    kind: str
    days: float = ca.CERT_DAYS

    @property
    def requests(self) -> Channel[dict[str, object]]:
        """The channel of the children's requests."""
        return channels.CLUSTER_CSR if self.kind == CLUSTER else channels.NODE_CSR

    async def answer(self, session: MqttSession, request: Received[dict[str, object]]) -> None:
        """Answer a child's ``up/csr`` with a fresh certificate on its ``down/cert`` (a bad one is dropped)."""
        child = request.sender
        reply = (channels.CLUSTER_CERT.topic(cluster=child) if self.kind == CLUSTER
                 else channels.NODE_CERT.topic(node=child))
        username = Identity(self.kind, child).username
        try:
            key = ca.requested_key(str((request.body or {})["csr"]))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("dropped a bad certificate request from %s: %s", username, exc)
            return
        if not self.credentials.exists(username):
            log.warning("dropped a certificate request from %s, which is not (or no longer) known", username)
            return
        cert = self.authority.issue(key, username, days=self.days)
        await self.credentials.certify(username, cert.serial_number, cert.not_valid_after_utc.timestamp())
        session.publish(reply, json.dumps({"cert": ca.cert_pem(cert).decode()}).encode())
        log.info("renewed the certificate of %s until %s", username, cert.not_valid_after_utc.isoformat())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Renewal:
    """A child's side: keeps the certificate in *tls_dir* renewed and *context* loaded with it."""

    def __init__(self, session: MqttSession, context: ssl.SSLContext, tls_dir: Path, csr_topic: str,
                 on_renewed: Callable[[], Awaitable[None]] | None = None) -> None:
        self.session = session
        self.on_renewed = on_renewed  # what else must take the new certificate (mosquitto's own bridge)
        self.context = context
        self.cert, self.key = tls_dir / "cert.pem", tls_dir / "key.pem"
        self.csr_topic = csr_topic
        self.renewed = asyncio.Event()

    def _current(self) -> ca.x509.Certificate:
        return ca.load_certs(self.cert.read_bytes())[0]

    def wait(self) -> float:
        """Seconds until the certificate should be renewed (0: now), and then between requests."""
        cert = self._current()
        life = (cert.not_valid_after_utc - cert.not_valid_before_utc - ca.BACKDATE).total_seconds()
        left = (cert.not_valid_after_utc - _now()).total_seconds()
        if left > life * RENEW_WHEN_LEFT:
            return left - life * RENEW_WHEN_LEFT
        return 0.0

    async def run(self) -> None:
        """Ask for a new certificate whenever a third of the current one's life is left, forever."""
        while True:
            delay = self.wait()
            if delay > 0:
                await asyncio.sleep(min(delay, ASK_EVERY_MAX))
                continue
            self.renewed.clear()
            key = ca.load_key(self.key.read_bytes())
            request = ca.request(key, ca.common_name(self._current()))
            self.session.publish(self.csr_topic, json.dumps({"csr": request.decode()}).encode())
            left = (self._current().not_valid_after_utc - _now()).total_seconds()
            try:  # ask again after a tenth of what is left (at least a second, at most an hour)
                await asyncio.wait_for(self.renewed.wait(), min(max(left / 10, 1.0), ASK_EVERY_MAX))
            except TimeoutError:
                log.warning("no new certificate yet (the current one ends in %.0f s); asking again", left)

    async def take(self, answer: Received[dict[str, object]]) -> None:
        """The parent's answer: keep the certificate and log in with it from the next connection on."""
        try:
            pem = str((answer.body or {})["cert"])
            cert = ca.load_certs(pem)[0]
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            log.warning("dropped a bad certificate from the parent: %s", exc)
            return
        if ca.common_name(cert) != ca.common_name(self._current()):
            log.warning("dropped a certificate for %s, not for this identity", ca.common_name(cert))
            return
        write_private(self.cert, pem)
        self.context.load_cert_chain(str(self.cert), str(self.key))
        self.renewed.set()
        log.info("certificate renewed until %s", cert.not_valid_after_utc.isoformat())
        if self.on_renewed is not None:
            await self.on_renewed()
