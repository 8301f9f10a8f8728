"""The one topic table of Oakling: every MQTT topic is built and parsed here, nowhere else.

Two kinds of broker carry the same shapes:

* the **root broker** (port 10000): users' API, clusters (through their bridge) and joins;
* each **cluster broker** (port 10003): its workers and the cluster's own side of the bridge.

A child of a tier (a cluster under the root, a worker under a cluster) owns two subtrees:
``oak/<kind>/<id>/up/<channel>`` (it publishes) and ``oak/<kind>/<id>/down/<channel>`` (it reads).
On a cluster broker the cluster orchestrator talks to the root through the bridge's mirror of its
own subtree: it publishes ``oak/upstream/<channel>`` and reads ``oak/downstream/<channel>``; the bridge
forwards them as ``oak/clusters/<cid>/up/<channel>`` and ``oak/clusters/<cid>/down/<channel>``.

Channels (``RETAINED`` says which are retained; their owner republishes them after every reconnect):

============= ========= ===========================================================================
channel       retained  payload
============= ========= ===========================================================================
avail         yes       ``{"state": "online"|"offline"}``; the offline body is the last will
info          yes       static facts: name, location, resources, runtimes, software version
state         yes       live facts: metrics and the status of every instance, every few seconds
desired       yes       the full map of instances the parent wants running there, ``{iid: spec}``
state/delta   no        (from clusters) each change of ``state`` at once, numbered; ``state`` follows once
                        changes settle and heals any gap (``services/common/delta.py``)
desired/delta no        (to clusters) each change of ``desired`` at once, the same way
peers         yes       (to workers) the other workers' probe addresses, for latency measurement
net           yes       (down) the overlay: a cluster's block / a worker's subnet, and the net table
cmd/<verb>    no        a one-shot request (``logs``), answered on ``res/<verb>``
res/<verb>    no        the answer, with the request's ``id``
evt/<kind>    no        events (placement failures, restarts) for feeds
tokens        yes       (to clusters) the join tokens for workers, hashed: ``{"tokens": {id: record}}``
tokens/used   no        (from clusters) a worker joined with token ``{"id": ...}``
csr           no        (up) a child's signing request for its key, to renew its certificate (broker.renewal)
cert          no        (down) the renewed certificate
============= ========= ===========================================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BASE = "oak"
CLUSTERS = "clusters"
NODES = "nodes"
RETAINED = frozenset({"avail", "info", "state", "desired", "peers", "net", "tokens"})
DELTA = "delta"

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


def is_valid_id(value: object) -> bool:
    """True when *value* may name a cluster, node, user or instance: the one rule for names everywhere.

    Printable ASCII letters, digits, ``-`` and ``_``, at most 63, starting with a letter or digit: no
    control characters, MQTT wildcards or separators, nothing mosquitto's files could misread. The
    whole string must match (``$`` alone would let a trailing newline through).
    """
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


def is_retained_channel(channel: str) -> bool:
    """True when messages on *channel* (``info``, ``cmd/logs``...) are published retained."""
    return channel in RETAINED


def matches(topic_filter: str, topic: str) -> bool:
    """True when *topic* matches the MQTT filter *topic_filter* (``+`` one level, ``#`` the rest)."""
    want, got = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(got) or (level != "+" and level != got[i]):
            return False
    return len(want) == len(got)


# ---- tier children: clusters at the root broker, nodes at a cluster broker -----------------------


def up(kind: str, child: str, channel: str) -> str:
    """Topic a child (*kind* = ``clusters``/``nodes``) publishes *channel* on."""
    return f"{BASE}/{kind}/{child}/up/{channel}"


def down(kind: str, child: str, channel: str) -> str:
    """Topic a parent publishes *channel* to its child on."""
    return f"{BASE}/{kind}/{child}/down/{channel}"


def delta_of(topic: str) -> str:
    """The non-retained topic carrying the changes of the retained whole-document *topic*
    (``.../down/desired`` -> ``.../down/desired/delta``; see ``services/common/delta.py``)."""
    return f"{topic}/{DELTA}"


def child_of(topic: str) -> str:
    """The child a ``oak/<kind>/<child>/...`` topic is about."""
    return topic.split("/")[2]


def up_filter(kind: str, channel: str) -> str:
    """Filter a parent subscribes with to hear *channel* from all its children."""
    return f"{BASE}/{kind}/+/up/{channel}"


@dataclass(frozen=True)
class ChildTopic:
    """A parsed ``oak/<kind>/<child>/<up|down>/<channel>`` topic."""

    kind: str
    child: str
    direction: str
    channel: str


def parse_child(topic: str) -> ChildTopic | None:
    """Parse a child topic, or return None if *topic* is not one."""
    parts = topic.split("/", 4)
    if len(parts) != 5 or parts[0] != BASE or parts[1] not in (CLUSTERS, NODES):
        return None
    if parts[3] not in ("up", "down"):
        return None
    return ChildTopic(parts[1], parts[2], parts[3], parts[4])


# ---- the cluster side of the bridge ---------------------------------------------------------------

UPSTREAM = f"{BASE}/upstream"
DOWNSTREAM = f"{BASE}/downstream"
ROOT_AVAIL = f"{BASE}/root/avail"
CLUSTER_AVAIL = f"{BASE}/cluster/avail"


def upstream(channel: str) -> str:
    """Topic the cluster orchestrator publishes for the root on its own broker."""
    return f"{UPSTREAM}/{channel}"


def downstream(channel: str) -> str:
    """Topic the bridge delivers the root's *channel* on, on the cluster broker."""
    return f"{DOWNSTREAM}/{channel}"


# ---- joining: a new cluster or worker asks for credentials ---------------------------------------


def join_request(nonce: str) -> str:
    """Topic a newcomer publishes its join request on."""
    return f"{BASE}/join/request/{nonce}"


def join_response(nonce: str) -> str:
    """Topic the newcomer reads its credentials (or refusal) from."""
    return f"{BASE}/join/response/{nonce}"


JOIN_REQUESTS = f"{BASE}/join/request/+"
# Retained by each tier that runs a CA: ``{"ca": <the fleet's CA, PEM>, "chain": [<PEM>, ...]}``. A
# newcomer reads it over a connection it cannot verify yet, checks the CA against the fingerprint it was
# given, and only then connects again, verified, to send its token (broker.join).
JOIN_CA = f"{BASE}/join/ca"
# Join tokens for workers, made at the root: sent (hashed, retained) to each cluster on ``down/tokens``;
# a cluster reports each use on ``up/tokens/used`` ``{"id": ...}`` (broker.tokens).
TOKENS = "tokens"
TOKENS_USED = "tokens/used"
REVOKE = "cmd/revoke"  # (to clusters) ``{"node": name}``: refuse that worker from now on and disconnect it



# ---- the user-facing API on the root broker (Zigbee2MQTT style) ----------------------------------

API_REQUESTS = f"{BASE}/api/+/request/#"



def api_request(user: str, resource: str, action: str) -> str:
    """Topic a user publishes a request on."""
    return f"{BASE}/api/{user}/request/{resource}/{action}"


def api_response(user: str, resource: str, action: str) -> str:
    """Topic the answer to a user's request is published on."""
    return f"{BASE}/api/{user}/response/{resource}/{action}"


def api_service_state(user: str, job_name: str) -> str:
    """Retained topic with a user's service: spec summary, status and every instance."""
    return f"{BASE}/api/{user}/state/services/{job_name}"


def api_infrastructure(user: str) -> str:
    """Retained topic with the clusters and workers as *user* may see them."""
    return f"{BASE}/api/{user}/state/infrastructure"


def api_state_filter(user: str) -> str:
    """Filter for every retained state topic of *user*."""
    return f"{BASE}/api/{user}/state/#"


@dataclass(frozen=True)
class ApiTopic:
    """A parsed ``oak/api/<user>/request/<resource>/<action>`` topic."""

    user: str
    resource: str
    action: str


def parse_api_request(topic: str) -> ApiTopic | None:
    """Parse a request topic, or None when it has another shape."""
    parts = topic.split("/")
    if len(parts) != 6 or parts[:2] != [BASE, "api"] or parts[3] != "request":
        return None
    return ApiTopic(parts[2], parts[4], parts[5])
