"""Topic rules, table-driven: who may publish, subscribe to and receive what."""

from __future__ import annotations

import pytest

from broker.acl import PUBLISH, RECEIVE, SUBSCRIBE, allowed
from broker.identity import Identity

CASES = [
    # (username, action, topic, allowed)
    ("svc:root", PUBLISH, "oak/anything/at/all", True),
    ("alice", PUBLISH, "oak/api/alice/request/apps/create", True),
    ("alice", PUBLISH, "oak/api/alice/response/apps/create", False),
    ("alice", PUBLISH, "oak/api/bob/request/apps/create", False),
    ("alice", PUBLISH, "oak/api/alice/request/#", False),
    ("alice", SUBSCRIBE, "oak/api/alice/#", True),
    ("alice", SUBSCRIBE, "oak/api/alice/state/services/+", True),
    ("alice", SUBSCRIBE, "oak/api/+/state/#", False),
    ("alice", SUBSCRIBE, "oak/#", False),
    ("alice", SUBSCRIBE, "#", False),
    ("alice", SUBSCRIBE, "oak/api/alice", False),
    ("alice", RECEIVE, "oak/api/alice/state/services/x", True),
    ("alice", RECEIVE, "oak/api/bob/state/services/x", False),
    ("alice", SUBSCRIBE, "oak/clusters/c1/up/state", False),
    ("alice", SUBSCRIBE, "oak/root/avail", True),
    ("alice", PUBLISH, "oak/root/avail", False),
    ("cluster:c1", PUBLISH, "oak/clusters/c1/up/state", True),
    ("cluster:c1", PUBLISH, "oak/clusters/c2/up/state", False),
    ("cluster:c1", PUBLISH, "oak/clusters/c1/down/desired", False),
    ("cluster:c1", SUBSCRIBE, "oak/clusters/c1/down/#", True),
    ("cluster:c1", SUBSCRIBE, "oak/clusters/+/down/#", False),
    ("cluster:c1", SUBSCRIBE, "oak/root/avail", True),
    ("cluster:c1", SUBSCRIBE, "oak/api/#", False),
    ("node:w1", PUBLISH, "oak/nodes/w1/up/state", True),
    ("node:w1", PUBLISH, "oak/nodes/w2/up/state", False),
    ("node:w1", PUBLISH, "oak/nodes/w1/down/desired", False),
    ("node:w1", SUBSCRIBE, "oak/nodes/w1/down/desired", True),
    ("node:w1", SUBSCRIBE, "oak/nodes/w2/down/desired", False),
    ("node:w1", SUBSCRIBE, "oak/nodes/+/down/desired", False),
    ("node:w1", RECEIVE, "oak/cluster/avail", True),
    ("join:abc123", PUBLISH, "oak/join/request/abc123", True),
    ("join:abc123", PUBLISH, "oak/join/request/other", False),
    ("join:abc123", SUBSCRIBE, "oak/join/response/abc123", True),
    ("join:abc123", SUBSCRIBE, "oak/join/response/+", False),
    ("join:abc123", RECEIVE, "oak/join/response/other", False),
    ("node:bad/name", PUBLISH, "oak/nodes/bad/name/up/state", False),
]


@pytest.mark.parametrize(("username", "action", "topic", "expected"), CASES,
                         ids=[f"{u}-{a}-{t}" for u, a, t, _ in CASES])
def test_allowed(username: str, action: str, topic: str, expected: bool) -> None:
    """Each identity stays inside its own subtrees."""
    assert allowed(Identity.of(username), action, topic) is expected


@pytest.mark.parametrize(("username", "kind", "name"), [
    ("svc.root", "service", "root"), ("cluster.c1", "cluster", "c1"), ("node.w-1", "node", "w-1"),
    ("join.ab", "join", "ab"), ("Admin", "user", "Admin"), ("node", "user", "node"), ("nodes", "user", "nodes"),
])
def test_identity_round_trip(username: str, kind: str, name: str) -> None:
    """A username tells its identity, and the identity gives the username back."""
    identity = Identity.of(username)
    assert (identity.kind, identity.name, identity.username) == (kind, name, username)


@pytest.mark.parametrize("username", ["svc:root", "cluster:c1", "node:w-1", "join:ab"])
def test_identity_older_spelling_still_understood(username: str) -> None:
    """``kind:name`` (before mosquitto, which cannot hold ':' in a username) reads as ``kind.name``."""
    assert Identity.of(username) == Identity.of(username.replace(":", "."))
