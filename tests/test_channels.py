"""The channel table (issue 15, point 1): topics round-trip, no two channels overlap, docs/topics.md shows
the table, and every channel's ACL lets exactly the identities the table names publish and read it: as
pure rules, and on both brokers with real clients."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from broker import acl
from broker.backend import EMBEDDED, MOSQUITTO, BrokerSpec, make_credentials, open_broker
from broker.identity import Identity
from broker.server import Listeners
from services.common import channels
from services.common.channels import CLUSTER, JOIN, NODE, USER, Channel
from services.common.mqtt import MqttSession
from services.common.store import Store
from services.common.topics import matches

REPO = Path(__file__).resolve().parent.parent
OWN = {USER: "alice", CLUSTER: "c1", NODE: "w1", JOIN: "0123abcd"}
OTHERS = {USER: "bob", CLUSTER: "c2", NODE: "w2", JOIN: "4567ef01"}
REST = {"verb": "logs", "resource": "apps", "action": "list", "job": "j"}


def topic_of(channel: Channel[Any], names: dict[str, str]) -> str:
    """*channel*'s topic with its owner filled from *names* and its other placeholders from REST."""
    return channel.topic(**{**REST, **{role: names[role] for role in OWN}})


def may_publish(channel: Channel[Any], role: str) -> bool:
    """What the table says: the channel's publisher, under its own name."""
    return channel.publisher == role and channel.owner == role


def may_read(channel: Channel[Any], role: str) -> bool:
    """What the table says: one of the channel's readers, under its own name (or a channel of nobody's)."""
    return role in channel.readers and channel.owner in (role, None)


def test_every_topic_parses_back_to_its_channel_and_names() -> None:
    for channel in channels.ALL:
        topic = topic_of(channel, OWN)
        assert channels.find(topic) == (channel, {n: {**REST, **OWN}[n] for n in channel.names}), topic
        assert matches(channel.filter(), topic)


def test_no_two_channels_share_a_topic() -> None:
    for channel in channels.ALL:
        topic = topic_of(channel, OWN)
        owners = [other.pattern for other in channels.ALL if other.parse(topic) is not None]
        assert owners == [channel.pattern], f"{topic} is on {owners}"


def test_the_bridge_carries_exactly_the_cluster_channels_with_their_retain_flag() -> None:
    for at_root in channels.CLUSTER_DOWN + (channels.CLUSTER_DESIRED_DELTA,):
        topic = at_root.topic(cluster="c1", verb="logs")
        assert channels.bridged(topic, "c1") == (channels.downstream(at_root).topic(verb="logs"), at_root.retained)
        assert channels.bridged(topic, "c2") is None, "another cluster's channel"
    for at_root in channels.CLUSTER_UP + (channels.CLUSTER_STATE_DELTA,):
        local = channels.upstream(at_root).topic(verb="logs")
        assert channels.bridged(local, "c1") == (at_root.topic(cluster="c1", verb="logs"), at_root.retained)
    assert channels.bridged("oak/clusters/c1/down/whatever", "c1") is None
    assert channels.bridged("oak/upstream/whatever", "c1") is None


def test_docs_show_the_table() -> None:
    """docs/topics.md holds what ``python -m services.common.channels`` prints."""
    docs = (REPO / "docs" / "topics.md").read_text()
    assert channels.markdown(channels.ROOT_BROKER) in docs
    assert channels.markdown(channels.CLUSTER_BROKER) in docs


@pytest.mark.parametrize("role", [USER, CLUSTER, NODE, JOIN])
def test_the_acl_allows_exactly_what_the_table_names(role: str) -> None:
    """For every channel: publish and read allowed to the identities the table names, under their own
    names only; never under another's."""
    me = Identity(role, OWN[role])
    for channel in channels.ALL:
        mine, theirs = topic_of(channel, OWN), topic_of(channel, OTHERS)
        assert acl.allowed(me, acl.PUBLISH, mine) == may_publish(channel, role), (role, "publish", mine)
        assert acl.allowed(me, acl.RECEIVE, mine) == may_read(channel, role), (role, "read", mine)
        assert acl.allowed(me, acl.SUBSCRIBE, mine) == may_read(channel, role), (role, "subscribe", mine)
        if channel.owner:
            assert not acl.allowed(me, acl.PUBLISH, theirs), (role, "publish", theirs)
            assert not acl.allowed(me, acl.RECEIVE, theirs), (role, "read", theirs)


async def _drain(session: MqttSession, seconds: float) -> set[tuple[str, bytes]]:
    got = set()
    try:
        while True:
            message = await session.get(seconds)
            got.add((message.topic, message.payload))
    except TimeoutError:
        return got


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", [EMBEDDED, MOSQUITTO])
async def test_each_broker_enforces_the_table(kind: str, tmp_path: Path) -> None:
    """A user, a cluster and a worker, logged in with passwords, publish on every channel's topic (their own
    and another's) and subscribe to each: what the broker lets through is exactly what the table names."""
    if kind == MOSQUITTO and shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed (make test installs it when run as root)")
    spec = BrokerSpec(kind)
    store = Store(tmp_path / "db.json")
    credentials = make_credentials(spec, store)
    await credentials.load()
    roles = (USER, CLUSTER, NODE)
    for role in roles:
        await credentials.set_password(Identity(role, OWN[role]).username, f"{role}-password")
    topics = [(channel, topic_of(channel, OWN)) for channel in channels.ALL]
    theirs = [topic_of(channel, OTHERS) for channel in channels.ALL if channel.owner in roles]
    try:
        async with open_broker(spec, Listeners("127.0.0.1", 0), credentials, tmp_path, ("observer",)) as broker:
            observer = MqttSession(broker.url, "observer", *broker.login("observer"))
            async with observer:
                await observer.subscribe_confirmed("#")
                for role in roles:
                    username = Identity(role, OWN[role]).username
                    client_id = username if role != USER else "alice-test"
                    async with MqttSession(broker.url, client_id, username, f"{role}-password") as me:
                        marker = role.encode()
                        for topic in [t for _, t in topics] + theirs:
                            me.publish(topic, marker)
                        published = {t for t, p in await _drain(observer, 1.0) if p == marker}
                        assert published == {t for c, t in topics if may_publish(c, role)}, role
                        await me.subscribe_confirmed(*[t for _, t in topics], *theirs)
                        for topic in [t for _, t in topics] + theirs:
                            observer.publish(topic, b"to-" + marker)
                        read = {t for t, p in await _drain(me, 1.0) if p == b"to-" + marker}
                        assert read == {t for c, t in topics if may_read(c, role)}, role
                        await _drain(observer, 0.2)
    finally:
        store.close()
