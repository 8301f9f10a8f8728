"""What makes an embedded amqtt broker Oakling's: the authentication plugin, and the topic rule the broker
asks directly for every publish, subscribe and delivery (:func:`permitted`, see :mod:`broker.server`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from broker import acl
from broker.identity import CLUSTER, DISCOVER, JOIN, NODE, SERVICE, Identity
from broker.login_guard import LoginGuard
from services.common import channels

log = logging.getLogger(__name__)

WRONG_PASSWORD = "wrong password"
BACKING_OFF = "too many failed logins"
ACTIONS = {Action.PUBLISH: acl.PUBLISH, Action.SUBSCRIBE: acl.SUBSCRIBE, Action.RECEIVE: acl.RECEIVE}


class OakAuthPlugin(BaseAuthPlugin):
    """Admits a client with a certificate of the tier's CA or the right password for its identity, and a
    client id of its own.

    No anonymous access. A certificate's common name is the identity, which must still be known (a revoked
    one is not); clusters and workers log in only that way where the tier runs a CA. The plain listener
    admits only the kinds of identity it is configured for (a tier: its own services, and users with
    ``--plain-loopback``). The broker asks this before it looks up the session the client id names
    (:class:`broker.server.EmbeddedBroker`), so a refused CONNECT never touches another's session.
    Passwords are checked off the event loop (:meth:`Credentials.check`), and failed ones slow down their
    source address and user name (:mod:`broker.login_guard`).
    """

    @dataclass
    class Config:
        """``credentials``: the :class:`broker.credentials.Credentials` to check against; ``plain_admits``:
        the kinds of identity the plain listener lets in (None: all); ``guard``: the failed logins'
        backoff, one per broker."""

        credentials: Any = None
        plain_admits: frozenset[str] | None = None
        guard: LoginGuard = field(default_factory=LoginGuard)

    async def authenticate(self, *, session: Session) -> bool | None:
        """Check the session's certificate or password, its listener and its client id."""
        refusal, identity = await self._identify(session)
        session.is_anonymous = identity is None
        if identity is not None and not acl.client_id_allowed(identity, session.client_id or ""):
            refusal = f"client id {session.client_id!r} is not its own"
        if refusal:
            # a flood is logged once, by the guard: its single attempts are details
            level = logging.DEBUG if refusal.startswith(BACKING_OFF) else \
                logging.INFO if refusal == WRONG_PASSWORD else logging.WARNING
            log.log(level, "refused %s (client id %r): %s", session.username or "a client", session.client_id,
                    refusal)
            return False
        return True

    async def _identify(self, session: Session) -> tuple[str, Identity | None]:
        """(why it is refused or "", the identity)."""
        credentials = self.config.credentials
        certified = getattr(session, "oak_certified", "")
        if certified:
            identity = Identity.of(certified)
            if session.username and session.username != certified:
                return f"its certificate is {certified}'s", None
            current = credentials.certificate(certified)
            if identity.kind == SERVICE or not credentials.exists(certified) or (
                    current is not None and current[0] != getattr(session, "oak_serial", "")):
                return f"the certificate of {certified} is not (or no longer) valid here", None
            session.username = certified
            return "", identity
        refusal, proven = await self._check_password(session)
        if proven is None:
            return refusal, None
        if proven.kind in (CLUSTER, NODE) and credentials.machines_by_certificate:
            return "clusters and workers log in with their certificate", None
        admits = self.config.plain_admits
        if not getattr(session, "oak_tls", False) and admits is not None and proven.kind not in admits:
            return "plain TCP is for this tier's own services (a user needs TLS, or --plain-loopback)", None
        return "", proven

    async def _check_password(self, session: Session) -> tuple[str, Identity | None]:
        """(why it is refused or "", the identity its password proves), within :mod:`broker.login_guard`'s
        backoff for the session's source address and user name."""
        credentials, guard = self.config.credentials, self.config.guard
        source, name = getattr(session, "oak_source", ""), session.username or ""
        if not credentials.remembers(name, session.password):
            wait = guard.refused_for(source, name)
            if wait > 0:
                return f"{BACKING_OFF} from {source} or for {name!r}: {wait:.1f} s left", None
        identity = await credentials.check(name, session.password)
        if identity is None:
            note = guard.failed(source, name)
            if note:
                log.warning("%s (the last from %s)", note, source)
            return WRONG_PASSWORD, None
        guard.succeeded(source, name)
        return "", identity


def permitted(session: Session, topic: str, action: str) -> bool:
    """Whether the session's identity may do *action* (:mod:`broker.acl`'s words) on *topic*."""
    if not session.username:
        return False
    identity = Identity.of(session.username)
    if session.username == DISCOVER:
        return action != acl.PUBLISH and topic == channels.JOIN_CA.topic()
    if identity.kind == JOIN:  # a newcomer's nonce is its client id (see broker.identity.NEWCOMER)
        identity = Identity(JOIN, session.client_id or "")
    return acl.allowed(identity, action, topic)
