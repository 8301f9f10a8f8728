"""Topic rules: who may publish, subscribe to and receive what. Pure functions, no broker needed.

The rules come from the channel table (:func:`services.common.channels.rules`):

* a service (the root or cluster orchestrator itself, the bridge's local side): everything;
* user ``U``, cluster ``C``, node ``N``: publish exactly the channels the table makes it the publisher
  of, under its own name (``oak/nodes/N/up/info``, never ``oak/nodes/N/up/anything``); read the subtree
  its readable channels share (``oak/api/U``, ``oak/clusters/C/down``, ``oak/nodes/N/down``) and the
  readable channels that name nobody (``oak/root/avail``, ``oak/cluster/avail``);
* a newcomer ``join:X``: publish ``oak/join/request/X``, read ``oak/join/response/X`` and ``oak/join/ca``
  (``join.discover``, before it has checked the CA, reads only the latter: broker.plugins).

Client ids are bound to identities too (:func:`client_id_allowed`): a CONNECT with another's client
id is refused before it can touch that client's session.

A subscription is allowed only when its filter is *confined* to a readable subtree: the subtree's
levels appear literally at the start of the filter, so ``+`` or ``#`` can never reach past it.
"""

from __future__ import annotations

from broker.identity import GENERATED_PREFIX, JOIN, SERVICE, USER, Identity, client_id_owner
from services.common import channels, topics
from services.common.channels import Rules

PUBLISH, SUBSCRIBE, RECEIVE = "publish", "subscribe", "receive"


def _under(topic: str, prefix: str) -> bool:
    """True when *topic* (or filter) lies in the subtree *prefix* without wildcards reaching above it."""
    want = prefix.strip("/").split("/")
    got = topic.split("/")
    return len(got) > len(want) and got[: len(want)] == want


def rules(identity: Identity) -> Rules:
    """What *identity* may publish and read (nothing for a service, which may do anything, or a newcomer)."""
    if identity.kind in (SERVICE, JOIN):
        return Rules()
    return channels.rules(identity.kind, identity.name)


def allowed(identity: Identity, action: str, topic: str) -> bool:
    """Return True when *identity* may do *action* (publish/subscribe/receive) on *topic*."""
    if identity.kind == SERVICE:
        return True
    if not topics.is_valid_id(identity.name):
        return False
    if identity.kind == JOIN:
        nonce = identity.name
        mine = (channels.JOIN_REQUEST if action == PUBLISH else channels.JOIN_RESPONSE).topic(join=nonce)
        return topic == mine or (action != PUBLISH and topic == channels.JOIN_CA.topic())
    granted = rules(identity)
    if action == PUBLISH:
        return "+" not in topic and "#" not in topic and any(topics.matches(f, topic) for f in granted.publish)
    return topic in granted.exact or any(_under(topic, p) for p in granted.subtrees)


def client_id_allowed(identity: Identity, client_id: str) -> bool:
    """True when *identity* may connect with *client_id* (see :mod:`broker.identity` for whose is whose).

    In-process services may use any id; every other identity only the ids it owns, and a user, besides,
    its own name and any id under it (``alice``, ``alice-cli-1f2e``) that no machine owns.
    """
    if identity.kind == SERVICE:
        return True
    owner = client_id_owner(client_id)
    if owner is not None:
        return owner == identity or owner.kind == identity.kind == JOIN  # nonces: newcomers and discovery
    if identity.kind != USER:
        return False
    return client_id == identity.name or client_id.startswith((identity.name + "-", GENERATED_PREFIX))
