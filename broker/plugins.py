"""The amqtt plugins that make an embedded broker Oakling's: authentication and topic rules."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from broker import acl
from broker.identity import JOIN, Identity

log = logging.getLogger(__name__)

ACTIONS = {Action.PUBLISH: acl.PUBLISH, Action.SUBSCRIBE: acl.SUBSCRIBE, Action.RECEIVE: acl.RECEIVE}


class OakAuthPlugin(BaseAuthPlugin):
    """Admits a client only with the right password for its identity and a client id of its own.

    No anonymous access. The broker asks this before it looks up the session the client id names
    (:class:`broker.server.EmbeddedBroker`), so a refused CONNECT never touches another's session.
    Passwords are checked off the event loop (:meth:`Credentials.check`).
    """

    @dataclass
    class Config:
        """``credentials``: the :class:`broker.credentials.Credentials` to check against."""

        credentials: Any = None

    async def authenticate(self, *, session: Session) -> bool | None:
        """Check the session's username, password and client id."""
        identity = await self.config.credentials.check(session.username, session.password)
        session.is_anonymous = identity is None
        if identity is None:
            log.info("refused client id %r: wrong password for %r", session.client_id, session.username)
            return False
        if not acl.client_id_allowed(identity, session.client_id or ""):
            log.warning("refused %s: client id %r is not its own", identity.username, session.client_id)
            return False
        return True


class OakTopicPlugin(BaseTopicPlugin):
    """Applies :mod:`broker.acl` to every publish, subscribe and delivery."""

    @dataclass
    class Config:
        """No options: the rules follow from the identity in the username."""

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        """Allow or deny *action* on *topic* for the session's identity."""
        if session is None or topic is None or action is None:
            return False
        return permitted(session, topic, ACTIONS[action])


def permitted(session: Session, topic: str, action: str) -> bool:
    """Whether the session's identity may do *action* (:mod:`broker.acl`'s words) on *topic*."""
    if not session.username:
        return False
    identity = Identity.of(session.username)
    if identity.kind == JOIN:  # a newcomer's nonce is its client id (see broker.identity.NEWCOMER)
        identity = Identity(JOIN, session.client_id or "")
    return acl.allowed(identity, action, topic)
