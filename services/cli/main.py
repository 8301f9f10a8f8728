"""``oak``: run Oakling's services and drive them from a terminal."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from services.cli import commands, completion
from services.cli.client import CliError, oak_home
from services.cli.tables import table
from services.common import metrics
from services.common.lifecycle import run_until_signalled, setup_logging
from services.common.mqtt import BrokerUrl, MqttError
from services.common.plugins import PluginError, installed
from services.common.profile import DEFAULT as DEFAULT_PROFILE
from services.common.version import VERSION
from services.root.api import BUSY_BACKLOG
from services.worker.netcfg import DEFAULT_PATH as DEFAULT_NETCFG
from tui import cli as tui_cli


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="state, credentials and logs (default: $OAK_HOME or ~/.oak)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--root", help="the root broker, HOST:PORT (default: from credentials.json)")


def _add_service_flags(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--data-dir", help="state, credentials and logs (default: $OAK_HOME or ~/.oak)")
    p.add_argument("--host", default="0.0.0.0", help="address the broker listens on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=port,
                   help=f"broker port, TLS (default {port}; 0 = any free port)")
    p.add_argument("--plain-loopback", action="store_true",
                   help="also let users connect without TLS, on 127.0.0.1 only (port: --plain-port)")
    p.add_argument("--plain-port", type=int, default=port + 1,
                   help=f"the plain loopback port with --plain-loopback (default {port + 1})")
    p.add_argument("--ws-port", type=int,
                   help="also listen for MQTT over plain websockets on this port, on the plain TCP's terms "
                        "(loopback; users only with --plain-loopback)")
    p.add_argument("--scheduler", default=DEFAULT_PROFILE,
                   help=f"scheduler plugins with optional weights, e.g. 'least-loaded,anti-affinity=2' "
                        f"(default {DEFAULT_PROFILE})")
    p.add_argument("--scheduler-profile", type=Path, help="a TOML scheduling profile (see docs/plugins.md)")
    p.add_argument("--join-token", default=os.environ.get("OAK_JOIN_TOKEN"),
                   help="a fixed token clusters/workers may join with, besides those of `oak token create`")
    p.add_argument("--cert-days", type=float, default=90.0,
                   help="how long the certificates this tier gives its children last (default 90 days; "
                        "they are renewed when a third is left)")
    p.add_argument("--open-join", action="store_true",
                   help="let clusters/workers join without a token (logged loudly; for labs only)")
    p.add_argument("--broker", default="embedded",
                   help="'embedded' (amqtt in this process, the default), 'mosquitto' (run mosquitto as a child, "
                        "with password and ACL files made by oak) or mqtt://HOST:PORT (an existing broker; "
                        "see docs/brokers.md)")
    p.add_argument("--broker-user", default=os.environ.get("OAK_BROKER_USER"),
                   help="with --broker mqtt://...: a login allowed everything there ($OAK_BROKER_USER)")
    p.add_argument("--broker-password", default=os.environ.get("OAK_BROKER_PASSWORD"),
                   help="its password ($OAK_BROKER_PASSWORD)")
    p.add_argument("--broker-files", default=os.environ.get("OAK_BROKER_FILES", ""), metavar="DIR",
                   help="with --broker mqtt://...: keep that mosquitto's password and ACL files in DIR "
                        "(see `oak broker files`; $OAK_BROKER_FILES)")
    p.add_argument("--broker-reload", default=os.environ.get("OAK_BROKER_RELOAD", ""), metavar="CMD",
                   help="with --broker-files: shell command that has the broker re-read them, e.g. "
                        "'kill -HUP $(cat /run/mosquitto/mosquitto.pid)' ($OAK_BROKER_RELOAD)")
    p.add_argument("-v", "--verbose", action="store_true")


def _add_metrics_flags(p: argparse.ArgumentParser, tier: str) -> None:
    """``--metrics-port`` and ``--metrics-host`` of a tier (docs/metrics.md)."""
    p.add_argument("--metrics-port", type=int, default=metrics.PORTS[tier],
                   help=f"serve Prometheus metrics on this port (default {metrics.PORTS[tier]}; 0: off)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address the metrics are served on (default 127.0.0.1; 0.0.0.0 for a remote Prometheus)")


def _completed(action: argparse.Action, completer: Callable[..., list[str]]) -> None:
    """Have the shell complete *action*'s value with *completer* (services/cli/completion.py)."""
    action.completer = completer  # type: ignore[attr-defined]  # argcomplete reads it


def parser() -> argparse.ArgumentParser:
    """The whole command line."""
    top = argparse.ArgumentParser(prog="oak", description="Oakling: a hierarchical edge orchestrator.")
    top.add_argument("--version", action="version", version=f"oak {VERSION}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run root + cluster + worker on this machine (1-DOC)")
    _add_service_flags(up, 10000)
    up.add_argument("--cluster-port", type=int, default=10003, help="cluster broker port (default 10003)")
    up.add_argument("--cluster-name", default="cluster1")
    up.add_argument("--name", default=socket.gethostname(), help="worker name (default: hostname)")
    up.add_argument("--overlay", action="store_true",
                    help="give instances their own IPs and service IPs (root; builds oak0/oakvx on this host)")
    up.add_argument("--no-metrics", action="store_true",
                    help=f"serve no Prometheus metrics (else root, cluster and worker on ports "
                         f"{', '.join(str(p) for p in metrics.PORTS.values())})")
    up.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics are served on")

    root = sub.add_parser("root", help="run the root orchestrator")
    _add_service_flags(root, 10000)
    root.add_argument("--advertise", default="127.0.0.1", help="address written into credentials.json")
    _add_metrics_flags(root, "root")
    for parser in (up, root):
        parser.add_argument("--busy-backlog", type=int, default=BUSY_BACKLOG,
                            help=f"a user's requests waiting for the root beyond which they are answered `busy` "
                                 f"with a retry hint (default {BUSY_BACKLOG})")

    cluster = sub.add_parser("cluster", help="run a cluster orchestrator, or `oak cluster list`")
    cluster.add_argument("action", nargs="?", choices=["list", "revoke"],
                         help="list the clusters, or revoke one (refuse it from now on), instead of running one")
    cluster.add_argument("target", nargs="?", help="with revoke: the cluster")
    _add_service_flags(cluster, 10003)
    _add_metrics_flags(cluster, "cluster")
    cluster.add_argument("--root", help="root broker HOST:PORT (default $OAK_ROOT or "
                         "$SYSTEM_MANAGER_URL:$SYSTEM_MANAGER_PORT, else 127.0.0.1:10000)")
    cluster.add_argument("--name", default=os.environ.get("CLUSTER_NAME"), help="default $CLUSTER_NAME")
    cluster.add_argument("--location", default=os.environ.get("CLUSTER_LOCATION", ""),
                         help="default $CLUSTER_LOCATION (e.g. 48.14,11.58)")
    cluster.add_argument("--root-join-token", default=os.environ.get("OAK_ROOT_JOIN_TOKEN"))
    cluster.add_argument("--ca-fingerprint", default=os.environ.get("OAK_CA_FINGERPRINT"),
                         help="sha256:... of the root's CA, checked before joining (from `oak token create`)")
    cluster.add_argument("--mosquitto-bridge", action="store_true",
                         help="with --broker mosquitto: let mosquitto's own bridge link to the root")
    cluster.add_argument("--stuck-after", type=float, default=20.0, metavar="SECONDS",
                         help="move an instance a worker accepted and shows no progress on for this long, "
                              "and mark that worker SUSPECT (default 20)")
    cluster.add_argument("--json", action="store_true", help="with list: print JSON")

    worker = sub.add_parser("worker", help="run a worker (NodeEngine)")
    worker.add_argument("--data-dir")
    worker.add_argument("--cluster", default="127.0.0.1:10003", help="cluster broker HOST:PORT")
    worker.add_argument("--name", default=socket.gethostname(), help="worker name (default: hostname)")
    worker.add_argument("--runtime", action="append", help="runtime plugin(s) to enable (default: process)")
    worker.add_argument("--unikernel", action="store_true",
                        help="also enable the vm runtime: unikernels and microVMs in QEMU (as NodeEngine -u)")
    worker.add_argument("--oci-runtime", action="append", default=[], metavar="NAME=PATH",
                        help="offer another OCI runtime as virtualization NAME, e.g. runsc-kvm='/usr/bin/runsc "
                             "--platform=kvm' (repeatable; runc, crun and runsc on PATH are found without it; "
                             "enables the container runtime)")
    _add_metrics_flags(worker, "worker")
    worker.add_argument("--no-gpus", action="store_true",
                        help="offer no NVIDIA GPUs even where nvidia-smi finds some")
    worker.add_argument("--collector", default="psutil")
    worker.add_argument("--join-token", default=os.environ.get("OAK_JOIN_TOKEN"))
    worker.add_argument("--ca-fingerprint", default=os.environ.get("OAK_CA_FINGERPRINT"),
                        help="sha256:... of the fleet's CA, checked before joining (from `oak token create`)")
    worker.add_argument("--location", default="", help="where the worker is, 'latitude,longitude'")
    worker.add_argument("--label", action="append", default=[], help="a label SLAs can need (repeatable)")
    worker.add_argument("--probe", default="127.0.0.1:0",
                        help="HOST:PORT where peers measure latency to this worker over UDP (default "
                             "127.0.0.1 and any free port; use the worker's public address across machines)")
    worker.add_argument("--stop-grace", type=float, default=5.0,
                        help="seconds between SIGTERM and SIGKILL when stopping an instance (default 5)")
    net = worker.add_argument_group("overlay network (root only)")
    net.add_argument("--overlay", action="store_true",
                     help="give instances their own IPs and service IPs over the VXLAN overlay")
    net.add_argument("--netmanager", type=int, default=0, metavar="PORT",
                     help="use the overlay of the NetManager listening on this local port instead")
    net.add_argument("--public-address", default="auto",
                     help="this worker's address other workers reach (NodePublicAddress; default: auto)")
    net.add_argument("--vxlan-port", type=int, default=50103, help="UDP port of the overlay (NodePublicPort)")
    net.add_argument("--direct-routing", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                     help="reach workers on the same link without VXLAN (DirectRouting): 'auto' (default) once a "
                          "probe shows the link carries overlay addresses, 'on' (the flag alone) always, 'off' never")
    net.add_argument("--host-netns", default="",
                     help="a network namespace to build the overlay in instead of this host's own "
                          "(tests and demos play several hosts on one machine this way)")
    worker.add_argument("-v", "--verbose", action="store_true")

    app = sub.add_parser("app", help="applications").add_subparsers(dest="action", required=True)
    p = app.add_parser("create", help="create the applications of an SLA file")
    p.add_argument("sla", help="SLA v2.0 JSON file ('-' for stdin)")
    _add_common(p)
    _add_common(app.add_parser("list", help="list your applications"))
    p = app.add_parser("delete", help="undeploy and delete an application")
    _completed(p.add_argument("app", help="application name or id"), completion.APPS)
    _add_common(p)

    svc = sub.add_parser("service", help="services").add_subparsers(dest="action", required=True)
    p = svc.add_parser("deploy", help="deploy a service")
    _completed(p.add_argument("service", help="job name (app.appns.svc.svcns) or id"), completion.SERVICES)
    p.add_argument("-n", "--replicas", type=int, default=1)
    p.add_argument("--wait", action="store_true", help="follow its status until it runs")
    p.add_argument("--timeout", type=float, default=60.0)
    _add_common(p)
    p = svc.add_parser("scale", help="set the number of instances")
    _completed(p.add_argument("service"), completion.SERVICES)
    p.add_argument("replicas", type=int)
    _add_common(p)
    p = svc.add_parser("undeploy", help="stop all instances, or one")
    _completed(p.add_argument("service"), completion.SERVICES)
    p.add_argument("instance", nargs="?", type=int, help="instance number")
    _add_common(p)
    p = svc.add_parser("list", help="list your services")
    p.add_argument("--app", help="only this application's")
    _add_common(p)
    p = svc.add_parser("logs", help="print (and follow) the logs of a service's instances")
    _completed(p.add_argument("service"), completion.SERVICES)
    p.add_argument("instance", nargs="?", type=int, help="instance number (default: all)")
    p.add_argument("-n", "--tail", type=int, default=100, help="lines from the end (default 100)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (Ctrl-C stops)")
    _add_common(p)
    p = svc.add_parser("update", help="roll out a new revision of a service (as its SLA's update policy says)")
    _completed(p.add_argument("service"), completion.SERVICES)
    p.add_argument("file", nargs="?", help="an SLA holding the microservice, or a microservice object ('-': stdin)")
    p.add_argument("--code", help="the new image, kernel or code")
    p.add_argument("--cmd", help="the new command, split as a shell would")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="set a variable (repeatable)")
    p.add_argument("--memory", type=int, help="MB")
    p.add_argument("--vcpus", type=float)
    p.add_argument("--wait", action="store_true", help="follow the rollout until it ends")
    p.add_argument("--timeout", type=float, default=600.0)
    _add_common(p)
    p = svc.add_parser("history", help="a service's revisions")
    _completed(p.add_argument("service"), completion.SERVICES)
    _add_common(p)
    p = svc.add_parser("rollback", help="roll back to an earlier revision (default: the one before the last update)")
    _completed(p.add_argument("service"), completion.SERVICES)
    p.add_argument("revision", nargs="?", type=int)
    _add_common(p)
    p = svc.add_parser("promote", help="let a rollout waiting on its canaries go on")
    _completed(p.add_argument("service"), completion.SERVICES)
    _add_common(p)
    p = svc.add_parser("inspect", help="one service and its instances")
    _completed(p.add_argument("service"), completion.SERVICES)
    _add_common(p)

    node = sub.add_parser("node", help="workers").add_subparsers(dest="action", required=True)
    _add_common(node.add_parser("list", help="list every worker"))
    p = node.add_parser("revoke", help="refuse a worker from now on: disconnect it, move its instances")
    p.add_argument("target", metavar="NODE")
    _add_common(p)

    sim = sub.add_parser("sim", help="a testbed: many simulated workers (real MQTT, simulated workloads)")
    sim.add_argument("--workers", type=int, default=50, help="how many (default 50)")
    sim.add_argument("--cluster", default="127.0.0.1:10003", help="cluster broker HOST:PORT")
    sim.add_argument("--prefix", default="sim", help="worker names are PREFIX-0001 ... (default sim)")
    sim.add_argument("--data-dir")
    sim.add_argument("--report-interval", type=float, default=5.0, help="seconds between reports (default 5)")
    sim.add_argument("--join-token", default=os.environ.get("OAK_JOIN_TOKEN"))
    sim.add_argument("--ca-fingerprint", default=os.environ.get("OAK_CA_FINGERPRINT"),
                     help="sha256:... of the fleet's CA, checked before joining")
    sim.add_argument("-v", "--verbose", action="store_true")

    plugins = sub.add_parser("plugins", help="the installed plugins").add_subparsers(dest="action", required=True)
    p = plugins.add_parser("list", help="schedulers, runtimes and collectors: version and where each comes from")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    ev = sub.add_parser("events", help="what the root decided and saw: placements, status changes, workers, "
                                       "clusters, rollouts, refused requests")
    ev.add_argument("-f", "--follow", action="store_true", help="keep printing new events (Ctrl-C stops)")
    ev.add_argument("-n", "--tail", type=int, default=50, help="recent events to show first (default 50; at most 200)")
    _completed(ev.add_argument("--service", help="only this service's events (its job name)"), completion.SERVICES)
    _add_common(ev)
    doc = sub.add_parser("doctor", help="check a root, cluster or worker (and its machine), one line each with a fix")
    doc.add_argument("tier", nargs="?", choices=["root", "cluster", "worker"],
                     help="the tier to check (default: all three of `oak up` in --data-dir)")
    doc.add_argument("--data-dir", help="the tier's data directory (default: $OAK_HOME, ~/.oak)")
    doc.add_argument("--root", help="the root a cluster joins (default $OAK_ROOT or 127.0.0.1:10000)")
    doc.add_argument("--cluster", help="the cluster a worker joins (default 127.0.0.1:10003)")
    doc.add_argument("--name", help="the worker's name (default: the hostname)")
    doc.add_argument("--cluster-name", default="cluster1", help="the cluster's name (default: cluster1)")
    doc.add_argument("--join-token", default=os.environ.get("OAK_JOIN_TOKEN", ""))
    doc.add_argument("--netcfg", help=f"the worker's netcfg.json (default {DEFAULT_NETCFG} if it exists)")
    doc.add_argument("--netmanager", type=int, default=0, metavar="PORT", help="a NetManager to reach on 127.0.0.1")
    doc.add_argument("--admin-dir", help="where the admin's credentials.json is, to ask the root what it sees "
                                         "(default: the root's data directory, or $OAK_HOME)")
    doc.add_argument("--no-host-checks", action="store_true",
                     help="skip the machine's checks (cgroups, runtimes, nftables, VXLAN, disk)")
    for verb, said in (("install", "write systemd units so a tier starts at boot and restarts on failure"),
                       ("uninstall", "remove what `oak install` wrote for a tier")):
        inst = sub.add_parser(verb, help=said)
        inst.add_argument("tier", choices=["root", "cluster", "worker"])
        inst.add_argument("--prefix", default="/", help="write under this directory instead of / (default /)")
        inst.add_argument("--no-enable", action="store_true",
                          help="only write (remove) the files: no systemctl daemon-reload, enable or disable")
        if verb == "install":
            inst.add_argument("--name", help="the cluster's or worker's name (default: the worker's hostname)")
            inst.add_argument("--root", help="the root a cluster joins, HOST:PORT")
            inst.add_argument("--cluster", help="the cluster a worker joins, HOST:PORT (with --seed: its address)")
            inst.add_argument("--join-token", default="", help="kept in /etc/oak/TIER.env (0600), not in the unit")
            inst.add_argument("--seed", action="store_true",
                              help="worker: the seed guide's NetManager + NodeEngine pair instead of oak worker")
            inst.add_argument("--dry-run", action="store_true", help="print the files instead of writing them")
            inst.epilog = ("Flags for the tier itself go after --, e.g. "
                           "oak install worker --cluster H:P -- --runtime container")
    comp = sub.add_parser("completion", help="shell code that completes oak's commands and names")
    comp.add_argument("shell", choices=["bash", "zsh"])

    brk = sub.add_parser("broker", help="an existing broker for oak").add_subparsers(dest="action", required=True)
    p = brk.add_parser("files", help="write starting password and ACL files for your mosquitto into DIR and "
                                     "print the mosquitto.conf lines that use them (see docs/brokers.md)")
    p.add_argument("dir", type=Path, help="the directory oak keeps the files in (--broker-files)")

    tui_cli.add_arguments(sub.add_parser("tui", help="the dashboard, in this terminal or (--web) in a browser"))

    volume = sub.add_parser("volume", help="your services' volumes on the workers").add_subparsers(
        dest="action", required=True)
    _add_common(volume.add_parser("list", help="every volume: service, worker, size"))
    p = volume.add_parser("delete", help="delete a service's volumes (or one) from every worker")
    _completed(p.add_argument("service"), completion.SERVICES)
    p.add_argument("volume", nargs="?")
    _add_common(p)

    secret = sub.add_parser("secret", help="your secrets (given to services by their SLA's secrets)").add_subparsers(
        dest="action", required=True)
    p = secret.add_parser("set", help="set a secret (a new value rolls the services using it)")
    p.add_argument("name")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--value", help="the value (visible in your shell's history: --from-file is safer)")
    given.add_argument("--from-file", metavar="FILE", help="the value is this file's bytes ('-': stdin)")
    _add_common(p)
    _add_common(secret.add_parser("list", help="your secrets: names, versions, sizes, users (never values)"))
    p = secret.add_parser("delete", help="delete a secret no service uses")
    p.add_argument("name")
    _add_common(p)

    token = sub.add_parser("token", help="join tokens (administrators only)").add_subparsers(dest="action",
                                                                                              required=True)
    p = token.add_parser("create", help="make a join token and print the join command, with the CA's fingerprint")
    p.add_argument("--cluster", action="store_true", help="for a cluster joining the root (default: a worker)")
    p.add_argument("--ttl", default="24h", help="how long it is valid: 90s, 15m, 24h, 7d (default 24h)")
    p.add_argument("--uses", type=int, help="how many joins it allows (default: any number until it expires)")
    _add_common(p)

    user = sub.add_parser("user", help="users (administrators only)").add_subparsers(dest="action", required=True)
    p = user.add_parser("create", help="create a user")
    p.add_argument("username")
    p.add_argument("--password", help="default: read from $OAK_NEW_PASSWORD or a prompt")
    p.add_argument("--admin", action="store_true")
    p.add_argument("--cert", action="store_true",
                   help="also make it a certificate (key made here, kept in <data-dir>/users/NAME/)")
    _add_common(p)
    _add_common(user.add_parser("list", help="list users"))
    return top


def root_url(value: str | None) -> BrokerUrl:
    """The root broker from a flag, or the environment (Oakling's or Oakestra's names)."""
    value = value or os.environ.get("OAK_ROOT")
    if not value and os.environ.get("SYSTEM_MANAGER_URL"):
        value = f"{os.environ['SYSTEM_MANAGER_URL']}:{os.environ.get('SYSTEM_MANAGER_PORT', '10000')}"
    return BrokerUrl.parse(value or "127.0.0.1:10000", 10000, tls=True)


def _run_services(args: argparse.Namespace) -> Callable[[], Awaitable[None]] | None:
    """The coroutine factory of a service command, or None for a client command."""
    home = oak_home(args.data_dir)
    if args.command == "up":
        return lambda: commands.up(args, home)
    if args.command == "root":
        return lambda: commands.root(args, home)
    if args.command == "cluster" and args.action is None:
        if not args.name:
            raise CliError("a cluster needs a name: --name or $CLUSTER_NAME")
        return lambda: commands.cluster(args, home, root_url(args.root))
    if args.command == "worker":
        return lambda: commands.worker(args, home, BrokerUrl.parse(args.cluster, 10003, tls=True))
    if args.command == "sim":
        return lambda: commands.sim(args, home, BrokerUrl.parse(args.cluster, 10003, tls=True))
    return None


def _print(data: Any, args: argparse.Namespace, render: Callable[[Any], str]) -> None:
    if data is None:  # the command printed as it went (logs)
        return
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else render(data))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``oak``."""
    top = parser()
    completion.activate(top)  # a Tab in the shell: answered here, and the process ends
    argv = list(sys.argv[1:] if argv is None else argv)
    passed: list[str] = []
    if argv[:1] == ["install"] and "--" in argv:  # the installed tier's own flags, kept as they are
        cut = argv.index("--")
        argv, passed = argv[:cut], argv[cut + 1:]
    args = top.parse_args(argv)
    args.flags = passed
    if args.command == "completion":
        print(completion.script(args.shell))
        return 0
    if args.command == "doctor":
        return asyncio.run(commands.doctor(args))
    if args.command in ("install", "uninstall"):
        try:
            return commands.install(args)
        except (ValueError, OSError) as exc:
            print(f"oak: {exc}", file=sys.stderr)
            return 2
    if args.command == "broker":
        return commands.broker_files(args.dir)
    if args.command == "plugins":
        _print([dataclasses.asdict(p) for p in installed()], args, lambda rows: table(rows, PLUGIN_COLUMNS))
        return 0
    if args.command == "tui":
        return tui_cli.run(args)
    try:
        service = _run_services(args)
        if service is not None:
            setup_logging(getattr(args, "verbose", False))
            asyncio.run(run_until_signalled(service))  # type: ignore[arg-type]
            return 0
        data, render = asyncio.run(commands.client_command(args))
        _print(data, args, render)
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line per failure, no traceback, for errors people can fix
        leaves = _leaves(exc)
        if not all(isinstance(leaf, EXPECTED) for leaf in leaves):
            raise
        for leaf in leaves:
            print(f"oak: {leaf}", file=sys.stderr)
        return 1


EXPECTED = (CliError, MqttError, PluginError, ValueError, OSError)
PLUGIN_COLUMNS = (("KIND", "kind"), ("NAME", "name"), ("PACKAGE", "distribution"), ("VERSION", "version"),
                  ("FROM", "source"))


def _leaves(exc: BaseException) -> list[BaseException]:
    """The errors inside (possibly nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


if __name__ == "__main__":
    sys.exit(main())
