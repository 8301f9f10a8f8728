"""The embedded broker with real gmqtt clients: credentials, topic rules, joining and the bridge."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.bridge import Bridge
from broker.credentials import Credentials
from broker.join import JoinDesk, obtain_login
from broker.probe import connect_packet
from broker.server import EmbeddedBroker, Listeners
from services.common import channels
from services.common.inbox import Inbox
from services.common.mqtt import BrokerUrl, MqttError, MqttSession
from services.common.store import Store
from tests.fakes import received
from tests.stack import eventually


@pytest.fixture
async def creds(tmp_path: Path) -> Credentials:
    """Credentials with one user, alice."""
    c = Credentials(Store(tmp_path / "db.json"))
    await c.load()
    await c.set_password("alice", "alice-password")
    return c


@pytest.fixture
async def broker(creds: Credentials) -> AsyncIterator[EmbeddedBroker]:
    """An embedded broker on an ephemeral loopback port."""
    async with EmbeddedBroker(Listeners(port=0), creds) as b:
        yield b


def url(b: EmbeddedBroker) -> BrokerUrl:
    return BrokerUrl("127.0.0.1", b.port)


async def nothing(session: MqttSession, wait: float = 0.4) -> bool:
    """True when *session* receives nothing for *wait* seconds."""
    try:
        await session.get(wait)
    except TimeoutError:
        return True
    return False


async def test_no_anonymous_and_no_wrong_password(broker: EmbeddedBroker) -> None:
    """Connections without the right password are refused."""
    for username, password in [("alice", "wrong"), ("nobody", "x"), ("svc:root", "guess"), ("", "")]:
        with pytest.raises(MqttError):
            async with MqttSession(url(broker), "x", username, password, retry_first_connect=False):
                pass


async def test_passwords_are_stored_hashed(tmp_path: Path, creds: Credentials) -> None:
    """The database (its file and its journal) never holds a password in clear."""
    stored = [path.read_text() for path in tmp_path.iterdir() if path.name.startswith("db.json")]
    assert any("alice" in text for text in stored), "the user is on disk"
    assert not any("alice-password" in text for text in stored)
    assert creds.verify("alice", "alice-password") is not None
    assert creds.verify("alice", "alice-passwort") is None


async def test_worker_cannot_publish_as_another_worker(broker: EmbeddedBroker, creds: Credentials) -> None:
    """node:w1 may publish its own state, not w2's; and cannot read w2's desired map."""
    await creds.set_password("node:w1", "pw1")
    observer = MqttSession(url(broker), "obs", "svc:test", creds.service_password("svc:test"))
    w1 = MqttSession(url(broker), "node.w1", "node:w1", "pw1")
    async with observer, w1:
        await observer.subscribe_confirmed("oak/nodes/#")
        await w1.subscribe_confirmed("oak/nodes/w2/down/desired", "oak/nodes/w1/down/desired")
        w1.publish("oak/nodes/w2/up/state", b"forged")
        assert await nothing(observer)
        w1.publish("oak/nodes/w1/up/state", b"mine")
        assert (await observer.get(2)).payload == b"mine"
        observer.publish("oak/nodes/w2/down/desired", b"for w2", retain=True)
        observer.publish("oak/nodes/w1/down/desired", b"for w1", retain=True)
        got = await w1.get(2)
        assert (got.topic, got.payload) == ("oak/nodes/w1/down/desired", b"for w1")
        assert await nothing(w1)


async def test_user_cannot_read_or_touch_another_users_api(broker: EmbeddedBroker, creds: Credentials) -> None:
    """alice sees only oak/api/alice/#, and cannot publish requests as bob."""
    await creds.set_password("bob", "bob-password")
    observer = MqttSession(url(broker), "obs", "svc:test", creds.service_password("svc:test"))
    alice = MqttSession(url(broker), "alice", "alice", "alice-password")
    async with observer, alice:
        observer.publish(channels.API_SERVICE_STATE.topic(user="bob", job="a.b.c.d"), b"bob's", retain=True)
        await observer.subscribe_confirmed(channels.API_REQUEST.filter())
        await alice.subscribe_confirmed("oak/#", "oak/api/+/state/#", "oak/api/bob/#", "oak/api/alice/state/#")
        assert await nothing(alice)
        alice.publish(channels.API_REQUEST.topic(user="bob", resource="apps", action="delete"), b"{}")
        assert await nothing(observer)
        mine = channels.API_REQUEST.topic(user="alice", resource="apps", action="list")
        alice.publish(mine, b"{}")
        assert (await observer.get(2)).topic == mine


async def test_join_gives_own_credentials_once(tmp_path: Path, broker: EmbeddedBroker, creds: Credentials) -> None:
    """A newcomer gets credentials of its own; a second node with the same name is refused, and so is a data
    dir that holds another identity (the worker beside its cluster in the same home)."""
    server = MqttSession(url(broker), "desk", "svc:desk", creds.service_password("svc:desk"))
    async with server:
        desk = JoinDesk(creds, "node")
        inbox = Inbox()
        inbox.on(channels.JOIN_REQUEST, lambda m: desk.handle(server, m))
        await inbox.subscribe(server)
        serving = asyncio.create_task(inbox.run(server))
        login = await obtain_login(tmp_path / "w1", url(broker), "node", "w1", None, timeout=10)
        assert login.username == "node.w1"
        assert (tmp_path / "w1" / "identity.json").stat().st_mode & 0o777 == 0o600
        assert await obtain_login(tmp_path / "w1", url(broker), "node", "w1", None) == login
        with pytest.raises(ValueError, match="node.w1's, not node.w2's: each cluster and worker needs a data"):
            await obtain_login(tmp_path / "w1", url(broker), "node", "w2", None, timeout=10)  # w1's home
        with pytest.raises(ValueError, match="node.w1's, not cluster.c1's"):
            await obtain_login(tmp_path / "w1", url(broker), "cluster", "c1", None, timeout=10)
        with pytest.raises(MqttError, match="already joined"):
            await obtain_login(tmp_path / "other", url(broker), "node", "w1", None, timeout=10)
        with pytest.raises(MqttError, match="only a node"):
            await obtain_login(tmp_path / "c", url(broker), "cluster", "c9", None, timeout=10)
        serving.cancel()


async def test_bridge_carries_the_orchestrators_traffic_both_ways_past_its_broker(tmp_path: Path) -> None:
    """Root down/* reaches the orchestrator's session as downstream/* (marked retained as the root's broker
    marked it), its upstream/* reaches the root as up/*, retained as the table says; none of it passes
    through the cluster's broker. A retained topic published up before the root is reached gets there once
    it is; a topic that is no channel is not carried."""
    root_creds = Credentials(Store(tmp_path / "root.json"))
    local_creds = Credentials(Store(tmp_path / "local.json"))
    await root_creds.load()
    await local_creds.load()
    await root_creds.set_password("cluster:c1", "c1pw")
    async with EmbeddedBroker(Listeners(port=0), root_creds) as root, \
            EmbeddedBroker(Listeners(port=0), local_creds) as local:
        root_side = MqttSession(url(root), "cluster.c1", "cluster:c1", "c1pw",
                                avail_topic=channels.CLUSTER_AVAIL.topic(cluster="c1"), clean_session=False)
        root_app = MqttSession(url(root), "root", "svc:root", root_creds.service_password("svc:root"))
        cluster_app = MqttSession(url(local), "cl", "svc:cl", local_creds.service_password("svc:cl"))
        watch_root = MqttSession(url(root), "watch", "svc:watch", root_creds.service_password("svc:watch"))
        watch_local = MqttSession(url(local), "watch", "svc:watch", local_creds.service_password("svc:watch"))
        async with root_app, cluster_app, watch_root, watch_local:
            await watch_root.subscribe_confirmed(channels.CLUSTER_STATE.topic(cluster="c1"))
            await watch_local.subscribe_confirmed("oak/#")
            bridge = Bridge("c1", root_side, cluster_app)
            cluster_app.send(channels.upstream(channels.CLUSTER_INFO), b"I")  # before the root is reached
            root_app.publish(channels.CLUSTER_DESIRED.topic(cluster="c1") + "/unknown", b"X", retain=True)
            root_app.publish(channels.CLUSTER_DESIRED.topic(cluster="c1"), b"D", retain=True)
            await asyncio.sleep(0.2)
            running = asyncio.create_task(bridge.run())
            downstream = channels.downstream(channels.CLUSTER_DESIRED).topic()
            got = await cluster_app.get(5)
            assert (got.topic, got.payload, got.retain) == (downstream, b"D", True), "the retained copy, down"
            root_app.publish(channels.CLUSTER_DESIRED.topic(cluster="c1"), b"D2", retain=True)
            got = await cluster_app.get(5)
            assert (got.topic, got.payload, got.retain) == (downstream, b"D2", False), "a live one, down"
            cluster_app.send(channels.upstream(channels.CLUSTER_STATE), b"S")
            assert (await watch_root.get(5)).payload == b"S", "carried up"
            # A late subscriber at the root sees retained copies: the retain flag was restored from the table.
            await root_app.subscribe_confirmed(channels.CLUSTER_STATE.topic(cluster="c1"),
                                               channels.CLUSTER_INFO.topic(cluster="c1"),
                                               channels.CLUSTER_AVAIL.topic(cluster="c1"))
            received = {(m.topic, m.payload) for m in [await root_app.get(2) for _ in range(3)]}
            assert received == {(channels.CLUSTER_STATE.topic(cluster="c1"), b"S"),
                                (channels.CLUSTER_INFO.topic(cluster="c1"), b"I"),
                                (channels.CLUSTER_AVAIL.topic(cluster="c1"), b'{"state":"online"}')}
            assert await nothing(cluster_app)  # a topic that is no channel is not carried
            assert await nothing(watch_local, 0.1)  # and the cluster's broker saw none of it
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running


async def test_connecting_client_gets_no_retained_messages_of_other_subscriptions(
        broker: EmbeddedBroker, creds: Credentials) -> None:
    """amqtt replays retained messages of every client's filters at CONNECT; ours only the client's own."""
    await creds.set_password("bob", "bob-password")
    owner = MqttSession(url(broker), "svc", "svc:test", creds.service_password("svc:test"))
    bob = MqttSession(url(broker), "bob", "bob", "bob-password")
    async with owner, bob:
        owner.publish(channels.API_SERVICE_STATE.topic(user="bob", job="a.b.c.d"), b"bob's secret", retain=True)
        bob.subscribe("oak/api/bob/state/#")
        assert (await bob.get(2)).payload == b"bob's secret"
        async with MqttSession(url(broker), "alice", "alice", "alice-password") as alice:
            assert await nothing(alice)


class _Answers:
    """Collects what a join desk publishes."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, object]] = []

    def publish(self, topic: str, payload: bytes, retain: bool = False, qos: int = 1) -> None:
        self.bodies.append(json.loads(payload))

    send = MqttSession.send


async def test_join_desk_answers_a_repeated_request_the_same_way(tmp_path: Path) -> None:
    """A newcomer that re-sends its request (same nonce) gets the same login again, even while the first
    is still being answered; another nonce asking for the same name is refused."""
    creds = Credentials(Store(tmp_path / "db.json"))
    await creds.load()
    desk, out = JoinDesk(creds, "node"), _Answers()
    request = json.dumps({"kind": "node", "name": "w1"}).encode()
    first = received(channels.JOIN_REQUEST, channels.JOIN_REQUEST.topic(join="n1"), request)
    await asyncio.gather(desk.handle(out, first), desk.handle(out, first))  # type: ignore[arg-type]
    await desk.handle(out, first)  # type: ignore[arg-type]
    assert [b["ok"] for b in out.bodies] == [True, True, True]
    assert len({b["password"] for b in out.bodies}) == 1
    assert creds.verify(str(out.bodies[0]["username"]), str(out.bodies[0]["password"])) is not None
    await desk.handle(out, received(channels.JOIN_REQUEST, channels.JOIN_REQUEST.topic(join="n2"), request))  # type: ignore[arg-type]
    assert out.bodies[-1]["ok"] is False
    assert "already joined" in str(out.bodies[-1]["error"])


async def test_a_client_that_falls_silent_is_disconnected_and_its_will_sent(creds: Credentials) -> None:
    """No packet within keepalive (+ grace): the broker closes the connection and publishes the last
    will (a worker whose machine vanished without closing its TCP connection is declared gone)."""
    await creds.set_password("node.w1", "w1-password")
    async with EmbeddedBroker(Listeners(port=0), creds, keepalive_grace=0) as b:
        watcher = MqttSession(url(b), "watcher", "svc.cluster", creds.service_password("svc.cluster"))
        async with watcher:
            await watcher.subscribe_confirmed("oak/nodes/w1/up/avail")
            reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
            writer.write(connect_packet("node.w1", "node.w1", "w1-password", keepalive=1,
                                        will=("oak/nodes/w1/up/avail", '{"state":"offline"}')))
            assert (await reader.readexactly(4))[3] == 0, "the silent client was not let in"
            message = await watcher.get(30)  # it sends nothing more, not even a ping
            assert (message.topic, message.payload) == ("oak/nodes/w1/up/avail", b'{"state":"offline"}')
            assert await reader.read() == b"", "the broker kept the connection open"
            writer.close()


async def test_a_client_taking_its_session_back_hears_everything_and_leaves_no_will(creds: Credentials) -> None:
    """A worker's persistent session is taken over by another connection with its client id (a clean one,
    as a duplicate worker or a stolen login makes), and the worker, reconnecting, takes it back while that
    connection is still open: the worker hears what is published to it afterwards (it used to stay deaf:
    the displaced connection's end ended the shared session), and no will says it is offline."""
    await creds.set_password("node.w1", "w1-password")
    async with EmbeddedBroker(Listeners(port=0), creds) as b:
        avail, desired = channels.NODE_AVAIL.topic(node="w1"), channels.NODE_DESIRED.topic(node="w1")
        cluster = MqttSession(url(b), "cluster", "svc.cluster", creds.service_password("svc.cluster"))
        worker = MqttSession(url(b), "node.w1", "node.w1", "w1-password", avail_topic=avail, clean_session=False)
        async with cluster, worker:
            await worker.subscribe_confirmed(desired)
            await cluster.subscribe_confirmed(avail)
            assert (await cluster.get(5)).payload == b'{"state":"online"}'
            reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
            writer.write(connect_packet("node.w1", "node.w1", "w1-password", keepalive=60))
            assert (await reader.readexactly(4))[3] == 0, "the second connection was not let in"
            assert await reader.read() == b"", "the worker took its session back and closed the other"
            writer.close()
            await eventually(lambda: worker.connected.is_set(), 10, 0.05, what="the worker reconnected")
            cluster.publish(desired, b"map", qos=1)
            assert (await worker.get(5)).payload == b"map", "the worker is deaf after taking its session back"
            seen = [await cluster.get(5) for _ in range(2)]  # the worker's will when displaced, then online
            assert seen[-1].payload == b'{"state":"online"}'
            assert await nothing(cluster, 1.0), "a will after the worker said online again"
