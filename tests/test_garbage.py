"""Garbage on every channel a worker, a cluster or a user may publish on stops no tier (issue 15, point 1).

As a worker (its certificate), garbage on every channel the table lets a worker publish at its cluster;
as a cluster that joined the root with a token but runs nothing (a broken or hostile one: its own
certificate, so the real cluster's bridge session is left alone), on every channel a cluster publishes
at the root; as the admin, on every API request topic.

The corpus: not JSON, JSON of the wrong shape, envelopes with wrong kinds and null data, numbers
where strings belong and strings where numbers belong, nesting past json's recursion limit, a lone
surrogate, a long string. Afterwards the root still answers, both workers are still online, and a new
service reaches RUNNING, on either broker; and every tier said what was wrong in one line each, with no
traceback (a traceback is for bugs).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import ca
from broker.join import obtain_login
from services.common import channels
from services.common.mqtt import BrokerUrl, MqttSession, tls_context
from tests.conftest import Stack, dumps, either_broker, eventually, fleet, sla, sleeper
from tests.test_three_tiers import running

# every channel a worker publishes, from the table (its topics as worker w2), and a cluster (as c9)
WORKER_TOPICS = [c.topic(node="w2", verb="logs") for c in channels.CLUSTER_BROKER if c.publisher == channels.NODE]
CLUSTER_TOPICS = [c.topic(cluster="c9", verb="logs") for c in channels.ROOT_BROKER if c.publisher == channels.CLUSTER]
API_VERBS = ("apps/create", "apps/list", "apps/delete", "services/list", "services/inspect", "services/deploy",
             "services/scale", "services/undeploy", "services/logs", "clusters/list", "nodes/list",
             "users/create", "users/list", "tokens/create", "clusters/revoke", "nodes/revoke")


def corpus() -> list[str]:
    """One payload a line."""
    envelope = {"v": 1, "kind": "node.state", "ts": 0, "src": "x"}
    return [
        "not json", "[]", "null", "1e999", '"a string"', "{}", '{"v": 1}',
        json.dumps({**envelope, "data": None}), json.dumps({**envelope, "kind": "desired", "data": {}}),
        json.dumps({**envelope, "data": {"cpu_cores": "x", "runtimes": None, "labels": 5, "instances": "all"}}),
        json.dumps({**envelope, "kind": "node.info", "data": {"cpu_cores": "x", "runtimes": None, "labels": 5}}),
        json.dumps({**envelope, "kind": "cluster.state", "data": {"nodes": {"w": {"cpu_free": "lots"}},
                                                                   "instances": 7}}),
        json.dumps({**envelope, "kind": "cluster.state.delta", "data": {"epoch": 5, "seq": "x", "put": []}}),
        json.dumps({"service": 5, "replicas": "many", "app": [], "username": {}, "password": 1, "tail": -1}),
        '{"a": ' + "[" * 10_000 + "]" * 10_000 + "}",
        '{"s": "\\ud800"}',
        json.dumps({"s": "x" * 100_000}),
    ]


@pytest.fixture(params=["embedded", "mosquitto"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """A stack on either broker."""
    yield from either_broker(request.param, tmp_path)


def _flood(login: list[str], topics: list[str], payloads: Path) -> None:
    for topic in topics:
        subprocess.run(["mosquitto_pub", *login, "-q", "1", "-t", topic, "-l"], stdin=payloads.open("rb"),
                       check=True, timeout=30)


async def _join_as_cluster(stack: Stack, admin: Any, name: str) -> None:
    """Join the root as cluster *name* with a token (a certificate of its own), running nothing."""
    token = await admin.request("tokens", "create", {"cluster": True, "uses": 1})
    await obtain_login(stack.base / name, BrokerUrl("127.0.0.1", stack.root_port, tls=True), "cluster", name,
                       token["token"], timeout=30, fingerprint=token["fingerprint"], ca_key=ca.new_key())


async def _flood_as_machine(stack: Stack, machine: str, port: int, topics: list[str]) -> None:
    """Publish the corpus on *topics* as *machine*, with its certificate, over one connection: a machine's
    client id is its own, so each connection takes its session over once (and it comes back)."""
    saved = json.loads((stack.base / machine / "identity.json").read_text())
    tls = stack.base / machine / "tls"
    url = BrokerUrl("127.0.0.1", int(saved.get("port", port)), tls=True)
    context = tls_context(tls / "ca.pem", tls / "cert.pem", tls / "key.pem")
    async with MqttSession(url, saved["username"], saved["username"], "", tls=context,
                           retry_first_connect=False) as session:
        payloads = [payload.encode(errors="surrogatepass") for payload in corpus()]
        for topic in topics:
            for payload in payloads:
                session.publish(topic, payload)
        await eventually(lambda: session.unacknowledged == 0, 30, 0.05,
                         what="the broker acknowledged every message (QoS 1) before leaving")


@pytest.mark.timeout(180)
async def test_garbage_on_every_channel_stops_no_tier(stack: Stack, api: Any, tmp_path: Path) -> None:
    admin = await fleet(stack, api, {"c1": ("w1", "w2")})
    payloads = tmp_path / "garbage.txt"
    payloads.write_text("\n".join(corpus()) + "\n")
    cluster = stack.cluster_ports["c1"]
    await _flood_as_machine(stack, "w2", cluster, WORKER_TOPICS)
    await _join_as_cluster(stack, admin, "c9")
    await _flood_as_machine(stack, "c9", stack.root_port, CLUSTER_TOPICS)
    saved = json.loads((stack.base / "root" / "credentials.json").read_text())
    user = ["-V", "mqttv311", "-h", "127.0.0.1", "-p", str(stack.root_port), "--cafile", saved["ca"],
            "-u", saved["username"], "-P", saved["password"], "-i", f"{saved['username']}-garbage"]
    _flood(user, [channels.API_REQUEST.topic(user=saved["username"], resource=verb.split("/")[0],
                                             action=verb.split("/")[1]) for verb in API_VERBS], payloads)

    await admin.request("services", "list")
    await admin.request("apps", "create", raw=dumps(sla(sleeper("after", 6091), app="gb")))
    await admin.request("services", "deploy", {"service": "gb.test.after.test", "replicas": 2})
    await running(admin, "gb.test.after.test", 2, timeout=60)

    async def both_online() -> bool:
        nodes = await admin.request("nodes", "list")
        return sorted(n["name"] for n in nodes if n["online"]) == ["w1", "w2"]

    await eventually(both_online, 30, what="w1 and w2 online (w2 sends its good info and state again)")
    for name in ("root", "c1", "w1", "w2"):
        popen = stack.procs[name].popen
        assert popen is not None
        assert popen.poll() is None, f"{name} stopped"
        log = stack.procs[name].log.read_text(errors="replace")
        assert "Traceback" not in log, f"{name}: bad input is one log line, not a traceback:\n{log[-3000:]}"
