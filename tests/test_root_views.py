"""The users' views of the fleet, from the root's cluster views (no broker)."""

from __future__ import annotations

from services.common.models import NodeSummary
from services.root.clusters import ClusterView
from services.root.views import node_rows


def _fleet() -> list[ClusterView]:
    shared = NodeSummary("w1", True, 4, 4096, 3, 4000, 1.0, ["process"], labels=["a"],
                         services={"alice/web.app.ns.web.ns": 2, "bob/db.app.ns.db.ns": 1})
    silent = NodeSummary("w2", True, 2, 2048, 2, 2048, 0.0, ["process"], silent_since=1000.0)
    return [ClusterView("c2", online=True, nodes={"w2": silent}), ClusterView("c1", online=False, nodes={"w1": shared})]


def test_each_user_sees_every_worker_and_only_their_own_services() -> None:
    fleet = _fleet()
    alice, bob, carol = (node_rows(fleet, user) for user in ("alice", "bob", "carol"))
    assert [(r["cluster"], r["name"]) for r in alice] == [("c1", "w1"), ("c2", "w2")]
    assert alice[0]["services"] == {"web.app.ns.web.ns": 2}
    assert bob[0]["services"] == {"db.app.ns.db.ns": 1}
    assert [row["services"] for row in carol] == [{}, {}]
    assert (alice[0]["online"], alice[0]["state"]) == (False, "offline")  # its cluster is offline
    assert (alice[1]["state"], alice[1]["silent_since"]) == ("LOST", 1000.0)
    assert (alice[0]["labels"], alice[0]["cpu_free"]) == (["a"], 3)


def test_a_users_rows_are_their_own_to_change() -> None:
    """The rows share each summary's JSON form, made once, but each list of services is the row's own."""
    fleet = _fleet()
    alice = node_rows(fleet, "alice")
    alice[0]["services"]["x"] = 9
    assert node_rows(fleet, "alice")[0]["services"] == {"web.app.ns.web.ns": 2}
