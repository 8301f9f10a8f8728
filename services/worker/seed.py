"""The seed guide's commands, usable verbatim: ``NetManager -p 6000`` and ``NodeEngine -n 6000 -p 10100 -a HOST``.

Oakestra's NodeEngine registers over HTTP on the cluster's port 10100 and is then told the MQTT port
(10003). Oakling has no HTTP: ``-p 10100`` is therefore read as "the cluster's usual port" and the
worker connects to the cluster broker on ``ClusterMqttPort`` from netcfg.json (default 10003). Any
other ``-p`` is taken as the broker port itself.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from pathlib import Path

from plugins.runtimes.cgroups import instances_cgroup2
from services.cli.client import oak_home
from services.common.lifecycle import run_until_signalled, setup_logging
from services.common.mqtt import BrokerUrl
from services.common.private import private_dir
from services.common.store import Store
from services.worker import netmanager
from services.worker.app import WorkerConfig, run_worker
from services.worker.kernel import Kernel, overlay_unavailable
from services.worker.netcfg import DEFAULT_PATH, NetConfig, NetConfigError
from services.worker.overlay import Overlay
from services.worker.socklb import open_balancer

log = logging.getLogger("NodeEngine")
OAKESTRA_HTTP_PORT = 10100


def _flag(value: str) -> bool:
    return value.lstrip("=").lower() in ("", "true", "1", "yes", "on")


def node_engine_parser() -> argparse.ArgumentParser:
    """NodeEngine's flags (Oakestra's legacy ones plus Oakling's)."""
    p = argparse.ArgumentParser(prog="NodeEngine", description="Run an Oakling worker (seed-compatible).")
    p.add_argument("-a", "--clusterAddr", help="cluster orchestrator address (default: ClusterUrl of netcfg.json)")
    p.add_argument("-p", "--clusterPort", type=int, default=OAKESTRA_HTTP_PORT,
                   help="cluster port; 10100 (Oakestra's) means the cluster broker's ClusterMqttPort")
    p.add_argument("-n", "--netmanagerPort", type=int, help="port of the local NetManager")
    p.add_argument("-u", "--unikernel", nargs="?", const="true", default="false",
                   help="enable unikernels and microVMs (the vm runtime, QEMU)")
    p.add_argument("--netcfg", type=Path, default=DEFAULT_PATH, help=f"netcfg.json (default {DEFAULT_PATH})")
    p.add_argument("--data-dir", help="worker state (default: $OAK_HOME/worker or ~/.oak/worker)")
    p.add_argument("--name", default=socket.gethostname(), help="worker name (default: hostname)")
    p.add_argument("--join-token", help="the token of a first join (default: JoinToken of netcfg.json)")
    p.add_argument("--ca-fingerprint",
                   help="sha256:... of the fleet's CA, checked before joining (default: CaFingerprint of netcfg.json)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _check_netmanager(port: int, node: str) -> bool:
    """True when the NetManager on *port* answers and runs the overlay."""
    try:
        answer = asyncio.run(asyncio.wait_for(netmanager.RemoteNetwork(port, node).status(), 2))
    except (RuntimeError, ValueError, TimeoutError) as exc:
        log.warning("no NetManager on port %d (%s); running without the overlay", port, exc)
        return False
    if not answer.get("overlay"):
        log.warning("NetManager on port %d answers: ok, but without the overlay (%s)", port, answer.get("reason", ""))
        return False
    log.info("NetManager on port %d answers: ok, overlay endpoint %s", port, answer.get("endpoint"))
    return True


def node_engine_main(argv: list[str] | None = None) -> int:
    """Entry point of ``NodeEngine``."""
    args = node_engine_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        net = NetConfig.load(args.netcfg)
    except NetConfigError as exc:
        print(f"NodeEngine: {exc}", file=sys.stderr)
        return 1
    port = args.clusterPort
    if port == OAKESTRA_HTTP_PORT:
        port = net.cluster_mqtt_port
        log.info("port %d is Oakestra's HTTP port; using the cluster broker on port %d", OAKESTRA_HTTP_PORT, port)
    runtimes = ("process", "vm") if _flag(args.unikernel) else ("process",)  # vm: unikernels and microVMs
    overlay = bool(args.netmanagerPort) and _check_netmanager(args.netmanagerPort, args.name)
    cluster = BrokerUrl(args.clusterAddr or net.cluster_url, port, tls=True)
    cfg = WorkerConfig(Path(args.data_dir) if args.data_dir else oak_home(None) / "worker", cluster, args.name,
                       runtimes, join_token=args.join_token or net.join_token or None,
                       netmanager_port=args.netmanagerPort if overlay else 0,
                       ca_fingerprint=args.ca_fingerprint or net.ca_fingerprint or None)
    try:
        asyncio.run(run_until_signalled(lambda: run_worker(cfg)))
    except KeyboardInterrupt:
        return 130
    return 0


async def _serve_netmanager(args: argparse.Namespace, net: NetConfig) -> None:
    nm_log = logging.getLogger("NetManager")
    reason = overlay_unavailable()
    if reason:
        nm_log.warning("no overlay: %s; answering status only", reason)
        await netmanager.serve_status(args.port, reason)
        return
    data_dir = Path(args.data_dir) if args.data_dir else oak_home(None) / "netmanager"
    private_dir(data_dir)
    store = Store(data_dir / "netmanager.db.json")
    kernel = Kernel(args.host_netns or None, net.direct_routing)
    overlay = Overlay(socket.gethostname(), kernel, store, net.node_public_address, net.node_public_port,
                      open_balancer(instances_cgroup2()))
    try:
        await overlay.start()
        await netmanager.serve(overlay, args.port)
    finally:
        await overlay.close()
        store.close()


def net_manager_main(argv: list[str] | None = None) -> int:
    """Entry point of ``NetManager``."""
    p = argparse.ArgumentParser(prog="NetManager", description="The worker's network manager (seed-compatible).")
    p.add_argument("-p", "--port", type=int, default=6000, help="local API port (default 6000)")
    p.add_argument("--netcfg", type=Path, default=DEFAULT_PATH, help=f"netcfg.json (default {DEFAULT_PATH})")
    p.add_argument("--data-dir", help="NetManager state (default: $OAK_HOME/netmanager or ~/.oak/netmanager)")
    p.add_argument("--host-netns", default="", help="build the overlay in this network namespace (tests, demos)")
    args = p.parse_args(argv)
    setup_logging()
    try:
        net = NetConfig.load(args.netcfg)
    except NetConfigError as exc:
        print(f"NetManager: {exc}", file=sys.stderr)
        return 1
    try:
        asyncio.run(run_until_signalled(lambda: _serve_netmanager(args, net)))
    except KeyboardInterrupt:
        return 130
    return 0
