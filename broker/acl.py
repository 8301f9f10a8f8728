"""Topic rules: who may publish, subscribe to and receive what. Pure functions, no broker needed.

* a service (the root or cluster orchestrator itself, the bridge's local side): everything;
* user ``U``: publish under ``oak/api/U/request/``, read ``oak/api/U/#`` and ``oak/root/avail``;
* cluster ``C`` (root broker): publish under ``oak/clusters/C/up/``, read ``oak/clusters/C/down/#``
  and ``oak/root/avail``;
* node ``N`` (cluster broker): publish under ``oak/nodes/N/up/``, read ``oak/nodes/N/down/#`` and
  ``oak/cluster/avail``;
* a newcomer ``join:X``: publish ``oak/join/request/X``, read ``oak/join/response/X`` and ``oak/join/ca``
  (``join.discover``, before it has checked the CA, reads only the latter: broker.plugins).

Client ids are bound to identities too (:func:`client_id_allowed`): a CONNECT with another's client
id is refused before it can touch that client's session.

A subscription is allowed only when its filter is *confined* to an allowed subtree: the subtree's
levels appear literally at the start of the filter, so ``+`` or ``#`` can never reach past it.
"""

from __future__ import annotations

from broker.identity import CLUSTER, GENERATED_PREFIX, JOIN, NODE, SERVICE, USER, Identity, client_id_owner
from services.common import topics

PUBLISH, SUBSCRIBE, RECEIVE = "publish", "subscribe", "receive"


def _under(topic: str, prefix: str) -> bool:
    """True when *topic* (or filter) lies in the subtree *prefix* without wildcards reaching above it."""
    want = prefix.strip("/").split("/")
    got = topic.split("/")
    return len(got) > len(want) and got[: len(want)] == want


def rules(identity: Identity) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(publish subtrees, readable subtrees, readable exact topics) of *identity*."""
    name = identity.name
    if identity.kind == USER:
        return (f"oak/api/{name}/request",), (f"oak/api/{name}",), (topics.ROOT_AVAIL,)
    if identity.kind == CLUSTER:
        return (f"oak/clusters/{name}/up",), (f"oak/clusters/{name}/down",), (topics.ROOT_AVAIL,)
    if identity.kind == NODE:
        return (f"oak/nodes/{name}/up",), (f"oak/nodes/{name}/down",), (topics.CLUSTER_AVAIL,)
    return (), (), ()


def allowed(identity: Identity, action: str, topic: str) -> bool:
    """Return True when *identity* may do *action* (publish/subscribe/receive) on *topic*."""
    if identity.kind == SERVICE:
        return True
    if not topics.is_valid_id(identity.name):
        return False
    if identity.kind == JOIN:
        mine = topics.join_request(identity.name) if action == PUBLISH else topics.join_response(identity.name)
        return topic == mine or (action != PUBLISH and topic == topics.JOIN_CA)
    publish, readable, exact = rules(identity)
    if action == PUBLISH:
        return "+" not in topic and "#" not in topic and any(_under(topic, p) for p in publish)
    return topic in exact or any(_under(topic, p) for p in readable)


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
