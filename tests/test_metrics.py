"""Prometheus metrics on every tier, scraped over HTTP and read with prometheus-client's own text parser."""

from __future__ import annotations

import json
import re
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common.metrics import Endpoint, TierMetrics, reason_code, serve
from tests.conftest import dumps, eventually, sla, sleeper
from tests.stack import REPO, Stack, free_port
from tests.test_three_tiers import _online_nodes, running

pytestmark = pytest.mark.timeout(120)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at http://127.0.0.1:*port*/metrics: (name, sorted labels) -> value, checking each family's
    name and type as it goes."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("oak_"), family.name
        assert family.type in ("counter", "gauge", "histogram"), (family.name, family.type)
        for sample in family.samples:
            if family.type == "counter" and not sample.name.endswith("_created"):
                assert sample.name.endswith("_total"), sample.name
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sample *name* with *labels* (0 when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    """The sum of every sample called *name*."""
    return sum(v for (n, _), v in samples.items() if n == name)


@pytest.mark.parametrize(("reason", "code"), [
    ("a: memory 512 < 1024; b: memory 256 < 1024", "memory"),
    ("w1: no wasm runtime (has process)", "runtime"),
    ("plain: gpus 0 < 1", "gpus"),
    ("no worker online", "no_worker"),
    ("no cluster has joined", "no_cluster"),
    ("no cluster can place it: c1 found no worker for it", "no_cluster"),
    ("something new", "other"),
])
def test_reason_codes_are_few_and_stable(reason: str, code: str) -> None:
    """A refusal's label is one of a few codes, whatever the text says about the candidates."""
    assert reason_code(reason) == code


async def test_an_endpoint_in_use_leaves_the_tier_running(caplog: pytest.LogCaptureFixture) -> None:
    """A second tier asking for a port already serving metrics logs why and runs on without its own."""
    import asyncio

    port = free_port()
    first = asyncio.create_task(serve(TierMetrics("root"), Endpoint("127.0.0.1", port)))
    await eventually(lambda: _answers(port), 10, what="the first endpoint")
    second = asyncio.create_task(serve(TierMetrics("cluster"), Endpoint("127.0.0.1", port)))
    await eventually(lambda: "cannot serve the cluster's metrics" in caplog.text, 10, what="the warning")
    assert not second.done()
    for task in (first, second):
        task.cancel()
    await asyncio.gather(first, second, return_exceptions=True)
    assert not _answers(port), "the endpoint stopped with its tier"


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2):
            return True
    except OSError:
        return False


async def test_every_tier_serves_its_metrics(stack: Stack, api: Any) -> None:
    """Root, cluster and worker each on their own port: instances by service and status, placements and
    refusals with reason codes and their duration, submit-to-RUNNING at the root, MQTT traffic, the store's
    writes, reconcile passes, per-instance usage, workers and clusters online, broker clients."""
    ports = {"root": free_port(), "c1": free_port(), "w1": free_port()}
    stack.root("--metrics-port", str(ports["root"]))
    stack.cluster("c1", "--metrics-port", str(ports["c1"]))
    stack.worker("w1", "c1", "--metrics-port", str(ports["w1"]))
    client = await api()
    await eventually(lambda: _online_nodes(client, 1), what="the worker online")
    doc = sla(sleeper("web"), sleeper("huge", memory=10**7), app="seen")
    await client.request("apps", "create", raw=dumps(doc))
    await client.request("services", "deploy", {"service": "seen.test.web.test", "replicas": 2})
    await client.request("services", "deploy", {"service": "seen.test.huge.test", "replicas": 1})
    await running(client, "seen.test.web.test", 2, "web")
    service = "admin/seen.test.web.test"

    def settled() -> dict[str, Any] | None:
        now = {tier: scrape(port) for tier, port in ports.items()}
        ready = all(value(now[t], "oak_instances", service=service, status="RUNNING") == 2 for t in now)
        ready = ready and value(now["root"], "oak_placement_decisions_total", result="refused", reason="memory") >= 1
        ready = ready and total(now["w1"], "oak_instance_memory_bytes") > 0
        return now if ready else None

    seen = await eventually(settled, 30, what="every tier counting both instances")
    root, cluster, worker = seen["root"], seen["c1"], seen["w1"]
    assert value(root, "oak_placement_decisions_total", result="placed", reason="") >= 2
    assert value(cluster, "oak_placement_decisions_total", result="placed", reason="") >= 2
    assert value(root, "oak_submit_to_running_seconds_count") >= 2
    assert 0 < value(root, "oak_submit_to_running_seconds_sum") < 60
    assert value(root, "oak_placement_duration_seconds_count") >= 1
    assert value(cluster, "oak_placement_duration_seconds_count") >= 1
    assert value(worker, "oak_reconcile_duration_seconds_count") >= 1
    assert (value(root, "oak_clusters", state="online"), value(root, "oak_workers", state="online")) == (1, 1)
    assert value(cluster, "oak_workers", state="online") == 1
    for samples, connection in ((root, "clusters"), (root, "users"), (cluster, "workers"), (cluster, "root"),
                                (worker, "cluster")):
        assert value(samples, "oak_mqtt_messages_received_total", connection=connection) > 0, connection
        assert value(samples, "oak_mqtt_messages_sent_total", connection=connection) > 0, connection
    for samples, db in ((root, "root"), (cluster, "cluster"), (worker, "worker")):
        assert value(samples, "oak_store_writes_total", db=db) > 0, db
        assert value(samples, "oak_store_write_seconds_total", db=db) > 0, db
    assert value(root, "oak_broker_clients") >= 3, "the root's sessions and the cluster's bridge"
    assert value(cluster, "oak_broker_clients") >= 2, "the cluster's sessions and the worker"
    running_ones = {dict(labels)["instance"] for name, labels in worker if name == "oak_instance_cpu_percent"}
    assert len(running_ones) == 2
    assert value(worker, "oak_gpus", state="free") == 0
    produced = {re.sub(r"_(bucket|sum|count)$", "", name) for samples in seen.values() for name, _ in samples}
    dashboard = json.loads((REPO / "etc" / "grafana-dashboard.json").read_text())
    used = {re.sub(r"_bucket$", "", name) for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"oak_[a-z0-9_]+", target["expr"])}
    assert used, "the dashboard queries oak's metrics"
    assert used <= produced, f"the dashboard asks for what no tier serves: {sorted(used - produced)}"
    documented = set(re.findall(r"`(oak_[a-z0-9_]+)", (REPO / "docs" / "metrics.md").read_text()))
    assert produced <= documented, f"served but not in docs/metrics.md: {sorted(produced - documented)}"
