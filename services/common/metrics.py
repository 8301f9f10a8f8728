"""Prometheus metrics of one tier (root, cluster or worker), served in the text format on ``--metrics-port``.

Each tier has its own registry (``oak up`` runs all three in one process, on three ports). What a tier does
as it works is counted as it happens (:class:`TierMetrics` counters and histograms: placements, their
duration, reconcile passes, submit-to-RUNNING); what it holds is read only when Prometheus scrapes
(:meth:`TierMetrics.read`: instances by status, workers online, per-instance usage, the MQTT sessions'
traffic and the store's journal), so an idle tier pays nothing between scrapes. Every name is listed in
docs/metrics.md. prometheus-client's own HTTP server runs in a thread; :func:`serve` is its async adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from services.common.store import Store

log = logging.getLogger(__name__)
disable_created_metrics()  # no ``*_created`` series beside each counter and histogram: they only add cardinality
#: The default ``--metrics-port`` of each tier (0 turns the endpoint off).
PORTS = {"root": 10010, "cluster": 10013, "worker": 10110}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Placement refusals by their reason's first words, as the scheduling framework and the tiers write them.
REASON_CODES = (("no worker online", "no_worker"), ("no cluster", "no_cluster"), ("offline", "offline"),
                ("runtime", "runtime"), ("gpus", "gpus"), ("memory", "memory"), ("cpu", "cpu"),
                ("arch", "arch"), ("direct", "direct"), ("already runs a replica", "anti_affinity"),
                ("latency", "latency"), ("km", "geo"), ("needs", "labels"))


def reason_code(reason: str) -> str:
    """A short, bounded label for a placement *reason* (``"a: memory 512 < 1024; b: ..."`` -> ``memory``)."""
    text = reason.lower()
    return next((code for words, code in REASON_CODES if words in text), "other")


def broker_clients(clients: Callable[[], int]) -> GaugeMetricFamily:
    """``oak_broker_clients``: the clients connected to a tier's embedded broker now."""
    return GaugeMetricFamily("oak_broker_clients", "Clients connected to this tier's broker", value=clients())


def by_state(name: str, documentation: str, counts: dict[str, int]) -> GaugeMetricFamily:
    """A gauge with one sample per state (``{"online": 3, "offline": 1}``): clusters, workers, GPUs."""
    family = GaugeMetricFamily(name, documentation, labels=["state"])
    for state, count in counts.items():
        family.add_metric([state], count)
    return family


def instance_families(statuses: Iterable[tuple[str, str]]) -> GaugeMetricFamily:
    """``oak_instances`` by (service, status) from *statuses*, one pair per instance."""
    counts: dict[tuple[str, str], int] = {}
    for pair in statuses:
        counts[pair] = counts.get(pair, 0) + 1
    family = GaugeMetricFamily("oak_instances", "Instances by service and status", labels=["service", "status"])
    for (service, status), count in sorted(counts.items()):
        family.add_metric([service, status], count)
    return family


@dataclass(frozen=True)
class Endpoint:
    """Where a tier serves its metrics (``--metrics-host``, ``--metrics-port``; port 0: nowhere)."""

    host: str = "127.0.0.1"
    port: int = 0


class PassTiming:
    """The time a pass spends deciding, without the turns it gives the event loop between decisions."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.decisions = 0
        self.placed = 0
        self._began = time.perf_counter()

    def decided(self) -> None:
        """One decision made since :meth:`resume` (or the start)."""
        self.seconds += time.perf_counter() - self._began
        self.decisions += 1

    def resume(self) -> None:
        """Deciding goes on from now."""
        self._began = time.perf_counter()


class Traffic(Protocol):
    """What the metrics read of an MQTT connection (:class:`~services.common.mqtt.MqttSession` has it)."""

    @property
    def received_count(self) -> int:
        """Messages received."""

    @property
    def sent_count(self) -> int:
        """Messages published."""

    @property
    def unacknowledged(self) -> int:
        """QoS 1 messages published and not yet acknowledged."""

    @property
    def backlog(self) -> int:
        """Messages received and not yet handled."""


class TierMetrics:
    """The metrics of one tier: counters and histograms its code updates, and readers called at scrape time."""

    def __init__(self, tier: str) -> None:
        self.tier = tier
        self.registry = CollectorRegistry()
        self.placements = Counter("oak_placement_decisions", "Placement decisions by result and reason code",
                                  ["result", "reason"], registry=self.registry)
        self.placement_seconds = Histogram("oak_placement_duration_seconds", "Duration of one placement pass",
                                           buckets=LATENCY_BUCKETS, registry=self.registry)
        self.reconcile_seconds = Histogram("oak_reconcile_duration_seconds", "Duration of one reconcile pass",
                                           buckets=LATENCY_BUCKETS, registry=self.registry)
        self.submit_to_running = Histogram("oak_submit_to_running_seconds",
                                           "From an instance's creation to its first RUNNING (root only)",
                                           buckets=LATENCY_BUCKETS, registry=self.registry)
        self._readers: list[Callable[[], Iterable[Metric]]] = []
        self._sessions: dict[str, Traffic] = {}
        self._stores: dict[str, Store] = {}
        self.registry.register(_Reader(self))

    def read(self, reader: Callable[[], Iterable[Metric]]) -> None:
        """Have *reader* give metric families at every scrape (what the tier holds, read then)."""
        self._readers.append(reader)

    def watch_session(self, name: str, session: Traffic) -> None:
        """Count *session*'s MQTT traffic as connection *name*."""
        self._sessions[name] = session

    def watch_store(self, name: str, store: Store) -> None:
        """Count *store*'s journal writes and fsync time as database *name*."""
        self._stores[name] = store

    def placed(self, count: int, seconds: float) -> None:
        """A placement pass of *seconds* that placed *count* instances."""
        self.placement_seconds.observe(seconds)
        if count:
            self.placements.labels("placed", "").inc(count)

    def refused(self, reason: str) -> None:
        """One instance that could not be placed, for *reason*."""
        self.placements.labels("refused", reason_code(reason)).inc()

    def collect_live(self) -> Iterator[Metric]:
        """The families read at scrape time."""
        received = CounterMetricFamily("oak_mqtt_messages_received", "MQTT messages received", labels=["connection"])
        sent = CounterMetricFamily("oak_mqtt_messages_sent", "MQTT messages published", labels=["connection"])
        inflight = GaugeMetricFamily("oak_mqtt_unacknowledged_messages",
                                     "QoS 1 messages published and not yet acknowledged by the broker",
                                     labels=["connection"])
        backlog = GaugeMetricFamily("oak_mqtt_backlog_messages", "Messages received and not yet handled",
                                    labels=["connection"])
        for name, session in sorted(self._sessions.items()):
            received.add_metric([name], session.received_count)
            sent.add_metric([name], session.sent_count)
            inflight.add_metric([name], session.unacknowledged)
            backlog.add_metric([name], session.backlog)
        yield from (received, sent, inflight, backlog)
        writes = CounterMetricFamily("oak_store_writes", "Journal appends and snapshot rewrites, each fsynced",
                                     labels=["db"])
        written = CounterMetricFamily("oak_store_written_bytes", "Bytes those writes wrote", labels=["db"])
        fsync = CounterMetricFamily("oak_store_write_seconds", "Time those writes took, fsync included", labels=["db"])
        for name, store in sorted(self._stores.items()):
            writes.add_metric([name], store.file_writes)
            written.add_metric([name], store.bytes_written)
            fsync.add_metric([name], store.write_seconds)
        yield from (writes, written, fsync)
        for reader in self._readers:
            yield from reader()


class _Reader(Collector):
    """Adapts :meth:`TierMetrics.collect_live` to prometheus-client's collector interface."""

    def __init__(self, metrics: TierMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self.metrics.collect_live()
        except Exception:  # a scrape never takes a tier down: say so and give what there is
            log.exception("reading the %s's metrics failed", self.metrics.tier)


async def serve(metrics: TierMetrics, endpoint: Endpoint) -> None:
    """Serve *metrics* on http://host:port/metrics until cancelled (nothing with port 0). A port in use is
    logged, and the tier runs on without its endpoint."""
    host, port = endpoint.host, endpoint.port
    if not port:
        await asyncio.Event().wait()
        return
    try:
        server, thread = await asyncio.to_thread(start_http_server, port, host, metrics.registry)
    except OSError as exc:
        log.warning("cannot serve the %s's metrics on %s:%d (%s); running without them", metrics.tier, host, port,
                    exc.strerror or exc)
        await asyncio.Event().wait()
        return
    log.info("%s metrics on http://%s:%d/metrics", metrics.tier, host, server.server_port)
    try:
        await asyncio.Event().wait()
    finally:
        server.shutdown()
        server.server_close()
        with contextlib.suppress(RuntimeError):
            thread.join(2)

