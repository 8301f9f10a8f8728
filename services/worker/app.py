"""Wires a worker: its login, store, runtimes, collector, engine and MQTT session."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.join import TLS_DIR, obtain_login
from broker.renewal import Renewal
from plugins.runtimes.cgroups import instances_cgroup2
from services.common import channels, metrics, models, plugins, topics
from services.common.inbox import Inbox, Received, serve
from services.common.metrics import Endpoint, TierMetrics
from services.common.models import InstanceSpec, NodeInfo
from services.common.mqtt import BrokerUrl, MqttSession
from services.common.plugin_api import Closeable
from services.common.private import private_dir
from services.common.store import Store
from services.common.version import VERSION
from services.worker import gpus
from services.worker import metrics as worker_metrics
from services.worker.engine import Engine
from services.worker.fence import fence
from services.worker.kernel import Kernel
from services.worker.logs import LogServer
from services.worker.netcfg import DirectRouting
from services.worker.netmanager import RemoteNetwork
from services.worker.overlay import Network, Overlay
from services.worker.prober import Prober
from services.worker.reporter import Reporter
from services.worker.secrets import SecretFetcher
from services.worker.socklb import open_balancer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """How to run a worker."""

    data_dir: Path
    cluster: BrokerUrl
    name: str = field(default_factory=socket.gethostname)
    runtimes: tuple[str, ...] = ("process",)
    collector: str = "psutil"
    join_token: str | None = None
    location: str = ""
    labels: tuple[str, ...] = ()
    ca_fingerprint: str | None = None  # the fleet CA a first join pins (from `oak token create`)
    report_interval: float = 2.0
    stop_grace: float = 5.0
    probe_host: str = "127.0.0.1"
    probe_port: int = 0
    overlay: bool = False  # run the overlay in this process
    netmanager_port: int = 0  # or use the NetManager listening on this port
    public_address: str = "auto"  # VXLAN endpoint address (NodePublicAddress)
    vxlan_port: int = 50103  # NodePublicPort
    direct_routing: DirectRouting = "auto"  # DirectRouting: workers on the same link reached without VXLAN
    host_netns: str = ""  # the namespace playing this worker's host ("" = its own; tests use one per worker)
    oci_runtimes: tuple[str, ...] = ()  # --oci-runtime NAME=PATH [FLAGS]: more OCI runtimes for the container runtime
    spares: int = 2  # sandboxes the process runtime keeps ready for starts, as root (plugins/runtimes/spares.py)
    gpus: bool = True  # look for NVIDIA GPUs (--no-gpus: offer none; `oak sim` workers never look)
    metrics: Endpoint = Endpoint()  # where Prometheus scrapes this worker (port 0: nowhere)
    on_connected: Callable[[str], None] | None = None  # told this worker's name once it serves (`oak sim` counts)


async def make_network(cfg: WorkerConfig, store: Store) -> tuple[Network | None, Overlay | None]:
    """The overlay this worker uses, and the one it owns (to tear down when it stops), if any."""
    if cfg.netmanager_port:
        return RemoteNetwork(cfg.netmanager_port, cfg.name), None
    if not cfg.overlay:
        return None, None
    kernel = Kernel(cfg.host_netns or None, cfg.direct_routing)
    overlay = Overlay(cfg.name, kernel, store, cfg.public_address, cfg.vxlan_port,
                      open_balancer(instances_cgroup2()))
    await overlay.start()
    return overlay, overlay


RETRY_FIRST, RETRY_MAX = 5.0, 60.0


async def run_worker_retrying(cfg: WorkerConfig) -> None:
    """Run a worker until cancelled; when it fails (e.g. its join is not answered in time), log it and
    start it again later (backing off, with jitter), so one worker's failure ends no other (``oak sim``)."""
    delay = RETRY_FIRST
    while True:
        try:
            await run_worker(cfg)
            return
        except Exception as exc:  # noqa: BLE001 - whatever ended it, this worker alone is retried
            wait = delay * random.uniform(0.5, 1.5)
            log.warning("worker %s failed (%s); starting it again in %.0f s", cfg.name, exc, wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, RETRY_MAX)


async def run_worker(cfg: WorkerConfig) -> None:
    """Run a worker until cancelled."""
    if not topics.is_valid_id(cfg.name):
        raise ValueError(f"bad worker name {cfg.name!r}: use letters, digits, '-' and '_' (at most 63)")
    private_dir(cfg.data_dir)
    pm = plugins.make_manager()
    runtimes = {}
    for name in cfg.runtimes:
        runtime = plugins.load_runtime(pm, name, {"data_dir": str(cfg.data_dir), "node": cfg.name,
                                                  "oci_runtimes": list(cfg.oci_runtimes), "spares": cfg.spares})
        for virtualization in runtime.virtualizations:
            runtimes[virtualization] = runtime
    collector = plugins.load_collector(pm, cfg.collector)
    devices = await asyncio.to_thread(gpus.discover) if cfg.gpus else []
    login = await obtain_login(cfg.data_dir, cfg.cluster, "node", cfg.name, cfg.join_token,
                               fingerprint=cfg.ca_fingerprint)
    store = Store(cfg.data_dir / "worker.db.json")
    network, owned = await make_network(cfg, store)
    reporter = Reporter(cfg.name, collector)
    engine = Engine(cfg.name, runtimes, store, cfg.data_dir, on_change=reporter.poke, stop_grace=cfg.stop_grace,
                    network=network, gpus=devices)
    reporter.engine = engine
    measured = engine.metrics = TierMetrics("worker")
    measured.watch_store("worker", store)
    measured.read(worker_metrics.reader(engine))
    prober = reporter.prober = Prober(cfg.probe_host, cfg.probe_port)
    await prober.start()
    tls = login.tls()
    session = MqttSession(
        login.at(cfg.cluster),
        login.username,
        login.username,
        login.password,
        avail_topic=channels.NODE_AVAIL.topic(node=cfg.name),
        clean_session=False,
        tls=tls,
    )
    renewal = Renewal(session, tls, cfg.data_dir / TLS_DIR, channels.NODE_CSR.topic(node=cfg.name)) if tls else None
    measured.watch_session("cluster", session)
    fetcher = SecretFetcher(session, cfg.name)
    engine.secrets = fetcher.fetch
    try:
        await engine.restore()  # inside the try: a stop from here on also stops the adopted instances
        async with session:
            facts = collector.info()
            gpu_count, gpu_model, gpu_memory = gpus.summary(devices)
            info = NodeInfo(
                name=cfg.name,
                cpu_cores=float(facts["cpu_cores"]),
                memory_mb=float(facts["memory_mb"]),
                runtimes=sorted(runtimes),
                arch=facts.get("arch", ""),
                os=facts.get("os", ""),
                hostname=facts.get("hostname", ""),
                location=cfg.location,
                version=VERSION,
                labels=list(cfg.labels) + plugins.runtime_labels(runtimes.values()),
                probe=prober.address,
                overlay=await network.endpoint() if network else "",
                report_every=cfg.report_interval,
                gpus=gpu_count,
                gpu_model=gpu_model,
                gpu_memory_mb=gpu_memory,
            )
            session.send(channels.NODE_INFO, models.dump(info), f"node/{cfg.name}", node=cfg.name)
            logs = LogServer(cfg.name, cfg.data_dir, session)
            inbox = Inbox()
            inbox.on(channels.NODE_PEERS, lambda m: _apply_peers(prober, m), node=cfg.name)
            inbox.on(channels.NODE_DESIRED, lambda m: _apply_desired(engine, m), node=cfg.name)
            inbox.on(channels.NODE_COMMAND, logs.handle, node=cfg.name, verb="logs")
            inbox.on(channels.NODE_NET, lambda m: _apply_net(network, m), node=cfg.name)
            inbox.on(channels.NODE_SECRETS, fetcher.answer, node=cfg.name)
            inbox.on(channels.NODE_COMMAND, lambda m: _delete_volumes(engine, m), node=cfg.name, verb="volumes")
            if renewal:
                inbox.on(channels.NODE_CERT, renewal.take, node=cfg.name)
            log.info("worker %s connected to its cluster at %s; runtimes: %s", cfg.name, cfg.cluster,
                     ", ".join(sorted(runtimes)))
            if cfg.on_connected:
                cfg.on_connected(cfg.name)
            await serve(session, inbox, reporter.run(session, cfg.report_interval), prober.run(),
                        fence(engine, session.quiet_for, cfg.report_interval), metrics.serve(measured, cfg.metrics),
                        *([renewal.run()] if renewal else []))
    finally:
        prober.close()
        await engine.close()
        for runtime in {id(r): r for r in runtimes.values()}.values():
            if isinstance(runtime, Closeable):  # e.g. stop the containerd it started
                try:
                    await runtime.close()
                except Exception:
                    log.exception("closing the %s runtime failed", runtime.name)
        if owned:
            await owned.close()
        store.close()


async def _apply_net(network: Network | None, net: Received[dict[str, Any]]) -> None:
    """Take this worker's subnet and the net table from the cluster."""
    if network is None or net.body is None:
        return
    try:
        data = net.body
        await network.update(str(data["subnet"]), str(data["cluster"]), dict(data["table"]))
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        log.warning("cannot apply the net table: %s", exc)


async def _delete_volumes(engine: Engine, command: Received[dict[str, Any]]) -> None:
    """The root's ``{"delete": [owner/job/volume...]}``: delete those no instance here uses."""
    keys = (command.body or {}).get("delete")
    if isinstance(keys, list) and all(isinstance(k, str) for k in keys):
        await engine.delete_volumes(keys)


async def _apply_peers(prober: Prober, peers: Received[dict[str, Any]]) -> None:
    """Take the cluster's list of the other workers to measure latency to."""
    listed = (peers.body or {}).get("peers", [])
    prober.set_peers(listed if isinstance(listed, list) else [])


async def _apply_desired(engine: Engine, desired: Received[dict[str, InstanceSpec]]) -> None:
    """Reconcile with a desired map from the cluster (empty payload = nothing wanted)."""
    await engine.apply(desired.body or {})
