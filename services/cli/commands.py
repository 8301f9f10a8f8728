"""What each ``oak`` command does: run services, or send one API request and render the answer."""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import getpass
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker import ca
from broker.backend import EXTERNAL, BrokerSpec
from broker.external import conf_lines, write_initial
from broker.server import Listeners
from broker.tier_ca import TierCa
from services.cli.client import CliError, OakClient, Profile
from services.cli.revisions import revision_command
from services.cli.tables import table
from services.cli.views import event_line, event_rows, service_text, services_text
from services.cluster.app import ClusterConfig, run_cluster
from services.common import channels, metrics
from services.common.metrics import Endpoint
from services.common.mqtt import BrokerUrl
from services.common.private import private_dir, write_private
from services.root.app import RootConfig, run_root
from services.worker.app import WorkerConfig, run_worker, run_worker_retrying
from services.worker.netcfg import DEFAULT_PATH as DEFAULT_NETCFG

Render = Callable[[Any], str]

# ---- services ---------------------------------------------------------------------------------


def listeners(args: argparse.Namespace, port: int | None = None) -> Listeners:
    """The broker listeners asked for on the command line (the tier secures them: broker.tier_ca)."""
    return Listeners(args.host, args.port if port is None else port, ws_port=args.ws_port)


def broker_spec(args: argparse.Namespace) -> BrokerSpec:
    """The ``--broker`` asked for on the command line."""
    try:
        return BrokerSpec.parse(args.broker, args.broker_user or "", args.broker_password or "",
                                args.broker_files or "", args.broker_reload or "")
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _root_config(args: argparse.Namespace, home: Path) -> RootConfig:
    return RootConfig(home, listeners(args), args.scheduler, args.scheduler_profile, args.join_token,
                      getattr(args, "advertise", "127.0.0.1"), broker_spec(args), args.plain_loopback,
                      _plain_port(args), args.open_join, args.cert_days, args.busy_backlog, endpoint(args, "root"))


def endpoint(args: argparse.Namespace, tier: str) -> Endpoint:
    """Where *tier* serves its metrics: ``--metrics-host``/``--metrics-port``; for ``oak up``, each tier's
    default port unless ``--no-metrics``."""
    if getattr(args, "no_metrics", None) is not None:
        return Endpoint(args.metrics_host, 0 if args.no_metrics else metrics.PORTS[tier])
    return Endpoint(args.metrics_host, args.metrics_port)


def _plain_port(args: argparse.Namespace) -> int:
    """The plain loopback port: --plain-port, or any free one when the broker's own port is 0."""
    return 0 if args.port == 0 else args.plain_port


async def root(args: argparse.Namespace, home: Path) -> None:
    """``oak root``."""
    await run_root(_root_config(args, home))


async def cluster(args: argparse.Namespace, home: Path, root_url: BrokerUrl) -> None:
    """``oak cluster``."""
    await run_cluster(ClusterConfig(
        home, args.name, root_url, args.location, listeners(args), args.scheduler, args.scheduler_profile,
        args.join_token, args.root_join_token, broker_spec(args), args.mosquitto_bridge,
        root_ca_fingerprint=args.ca_fingerprint, cert_days=args.cert_days, plain_loopback=args.plain_loopback,
        plain_port=_plain_port(args), open_join=args.open_join, stuck_after=args.stuck_after,
        metrics=endpoint(args, "cluster")))


async def worker(args: argparse.Namespace, home: Path, cluster_url: BrokerUrl) -> None:
    """``oak worker``."""
    runtimes = tuple(args.runtime or ("process",))
    runtimes += ("vm",) if args.unikernel and "vm" not in runtimes else ()
    runtimes += ("container",) if args.oci_runtime and "container" not in runtimes else ()
    await run_worker(WorkerConfig(home, cluster_url, args.name, runtimes,
                                  args.collector, args.join_token, args.location, tuple(args.label),
                                  stop_grace=args.stop_grace, probe_host=args.probe.rpartition(":")[0] or "127.0.0.1",
                                  probe_port=int(args.probe.rpartition(":")[2] or 0), overlay=args.overlay,
                                  netmanager_port=args.netmanager, public_address=args.public_address,
                                  vxlan_port=args.vxlan_port, direct_routing=args.direct_routing,
                                  host_netns=args.host_netns, ca_fingerprint=args.ca_fingerprint,
                                  oci_runtimes=tuple(args.oci_runtime), gpus=not args.no_gpus,
                                  metrics=endpoint(args, "worker")))


async def sim(args: argparse.Namespace, home: Path, cluster_url: BrokerUrl) -> None:
    """``oak sim``: many simulated workers in this process, each a real worker with the ``sim`` runtime
    and collector (real MQTT sessions, reports and state machines; no workloads executed)."""
    if not 1 <= args.workers <= 10_000:
        raise CliError("--workers must be between 1 and 10000")
    connected: set[str] = set()
    async with asyncio.TaskGroup() as tasks:
        for i in range(args.workers):
            name = f"{args.prefix}-{i + 1:04d}"
            tasks.create_task(run_worker_retrying(WorkerConfig(  # one failing worker is retried, alone
                home / name, cluster_url, name, ("sim",), "sim", args.join_token,
                report_interval=args.report_interval, stop_grace=0.0, ca_fingerprint=args.ca_fingerprint,
                gpus=False, on_connected=connected.add)))
            if i % 50 == 49:
                await asyncio.sleep(0.2)  # let joins through in waves
        print(f"oak sim: {args.workers} simulated workers started against {cluster_url}", file=sys.stderr,
              flush=True)
        await _joining(connected, args.workers)


async def _joining(connected: set[str], total: int, every: float = 2.0) -> None:
    """Say how many of *total* simulated workers have connected, every *every* seconds until all have."""
    said = -1
    while len(connected) < total:
        if len(connected) != said:
            said = len(connected)
            print(f"oak sim: {said} of {total} workers connected", file=sys.stderr, flush=True)
        await asyncio.sleep(every)
    print(f"oak sim: all {total} workers connected", file=sys.stderr, flush=True)


def broker_files(directory: Path) -> int:
    """``oak broker files DIR``: files an existing mosquitto can start with; print how to use them."""
    write_initial(directory)
    print(f"# oak keeps {directory.resolve()}/passwd and acl; put these lines in mosquitto.conf, before "
          "any listener:")
    print("\n".join(conf_lines(directory)))
    print("# then run each oak tier on that broker with:\n#   --broker mqtt://HOST:PORT "
          f"--broker-files {directory.resolve()} --broker-reload 'kill -HUP MOSQUITTO_PID'")
    return 0


async def up(args: argparse.Namespace, home: Path) -> None:
    """``oak up``: root, cluster and worker in one process (1-DOC); each keeps its own data dir."""
    root_ready, cluster_ready = asyncio.Event(), asyncio.Event()
    ports: dict[str, int] = {}
    token = args.join_token or secrets.token_urlsafe(24)  # this run's own cluster and worker join with it

    def fingerprint() -> str:  # the root's CA, on this machine: the cluster and worker pin it
        return TierCa.root(home).fingerprint

    async def start_cluster() -> None:
        await root_ready.wait()
        await run_cluster(
            ClusterConfig(home / "cluster", args.cluster_name, BrokerUrl("127.0.0.1", ports["root"], tls=True),
                          listen=Listeners(args.host, args.cluster_port), scheduler=args.scheduler,
                          scheduler_profile=args.scheduler_profile,
                          join_token=token, root_join_token=token, broker=cfg.broker,
                          root_ca_fingerprint=fingerprint(), plain_loopback=cfg.plain_loopback,
                          plain_port=args.cluster_port + 1 if args.cluster_port else 0, open_join=args.open_join,
                          metrics=endpoint(args, "cluster")),
            cluster_ready,
        )

    async def start_worker() -> None:
        await cluster_ready.wait()
        await run_worker(WorkerConfig(home / "worker", BrokerUrl("127.0.0.1", args.cluster_port, tls=True),
                                      args.name, join_token=token, overlay=args.overlay,
                                      ca_fingerprint=fingerprint(), metrics=endpoint(args, "worker")))

    async def announce() -> None:
        await cluster_ready.wait()
        ca = home / "ca" / "ca.pem"
        plain = (f"  or without TLS, on this machine only:  mosquitto_sub -p {args.plain_port} -u admin -P ...\n"
                 if cfg.plain_loopback else "  (add --plain-loopback to also allow plain TCP on 127.0.0.1)\n")
        print(f"Oakling is up: root on port {ports['root']} (TLS), cluster {args.cluster_name!r} on port "
              f"{args.cluster_port}, worker {args.name!r}.\nAdmin credentials: {home / 'credentials.json'}\n"
              f"Try: oak app create sla.json && oak service list    (Ctrl-C stops everything)\n"
              f"Scripts: mosquitto_sub -V mqttv311 -h 127.0.0.1 -p {ports['root']} --cafile {ca} -u admin -P ...\n"
              f"{plain}The fleet's CA: {ca} ({fingerprint()})",
              file=sys.stderr, flush=True)

    cfg = dataclasses.replace(_root_config(args, home), join_token=token)
    if cfg.broker.kind == EXTERNAL:
        raise CliError("oak up runs two brokers (root and cluster): use --broker embedded or mosquitto")
    ports["root"] = args.port
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(run_root(cfg, root_ready))
        tasks.create_task(start_cluster())
        tasks.create_task(start_worker())
        tasks.create_task(announce())


# ---- client commands ---------------------------------------------------------------------------

def duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``15m``, ``24h`` or ``7d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        return float(number) * units[unit]
    except ValueError:
        raise CliError(f"not a duration: {text!r} (e.g. 90s, 15m, 24h, 7d)") from None


def _keep_user_certificate(home: Path, username: str, key: ca.PrivateKey, data: dict[str, Any]) -> Path:
    """Write a new user's key, certificate and the CA to ``<data-dir>/users/<name>/`` (0600); the folder."""
    where = private_dir(home / "users" / username)
    write_private(where / "key.pem", ca.key_pem(key).decode())
    write_private(where / "cert.pem", data.pop("cert"))
    write_private(where / "ca.pem", data.pop("ca"))
    return where


def _dated(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """*rows* with ``cert_expires`` as a date (or nothing, for an identity without a certificate), and a
    LOST one's state saying since when it is silent."""
    return [{**row, "cert_expires": time.strftime("%Y-%m-%d %H:%M", time.localtime(row["cert_expires"]))
             if row.get("cert_expires") else None, "state": _since(row)} for row in rows]


def _since(row: dict[str, Any]) -> str:
    lost = row.get("silent_since") or row.get("lost_since")
    state = str(row.get("state", ""))
    return f"{state} since {time.strftime('%H:%M:%S', time.localtime(lost))}" if state == "LOST" and lost else state


def _token(data: Any) -> str:
    limit = "any number of times" if data["uses"] is None else f"{data['uses']} time(s)"
    until = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(data["expires"]))
    return (f"token for a {data['kind']}, valid until {until}, {limit}:\n{data['token']}\n"
            f"CA fingerprint: {data['fingerprint']}\n\njoin with:\n{data['command']}")


def _apps(data: Any) -> str:
    rows = [{**a, "services": [s["job_name"] for s in a["services"]]} for a in data]
    return table(rows, [("APP", "name"), ("NAMESPACE", "namespace"), ("ID", "app_id"),
                        ("SERVICES", "services")]) if rows else "no applications"


def _read_bytes(path: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None


def install(args: argparse.Namespace) -> int:
    """``oak install TIER`` / ``oak uninstall TIER`` (services/cli/install.py)."""
    import shutil
    import subprocess

    from services.cli import install as units

    prefix = Path(args.prefix)
    enable = not args.no_enable and prefix == Path("/") and units.systemd_running()
    if args.command == "uninstall":
        listed = units.installed(args.tier, prefix)
        if enable and listed.get("units"):
            subprocess.run(["systemctl", "disable", "--now", *listed["units"]], check=False)
        gone, kept = units.remove(args.tier, prefix, listed)
        for path in gone:
            print(f"removed {path}")
        for path in kept:
            print(f"kept {path}: changed since it was installed")
        if enable:
            subprocess.run(["systemctl", "daemon-reload"], check=False)
        return 0
    flags = list(args.flags)
    beside = Path(sys.executable).parent / "oak"  # the oak of this interpreter's environment first
    oak_path = str(beside) if beside.exists() else shutil.which("oak")
    if oak_path is None:
        raise ValueError("cannot find the oak command to put in the unit: install oak (pip install -e .) first")
    plan = units.plan(args.tier, flags, oak=oak_path, token=args.join_token, seed=args.seed,
                      cluster=args.cluster or args.root or "", name=args.name or "")
    if args.dry_run:
        print(units.render(plan))
        return 0
    for path in units.write(plan, prefix):
        print(f"wrote {prefix / path}")
    if enable:
        subprocess.run(["systemctl", "daemon-reload"], check=True)
        subprocess.run(["systemctl", "enable", "--now", *plan.units], check=True)
        print(f"enabled and started {', '.join(plan.units)}")
    else:
        print(f"not enabled (no systemd here, --no-enable or --prefix): systemctl enable --now {' '.join(plan.units)}")
    return 0


async def doctor(args: argparse.Namespace) -> int:
    """``oak doctor [TIER]``: check one tier, or the three of ``oak up`` kept in --data-dir, then what the root
    sees of them; print one line per finding; 1 when something blocks operation."""
    from services.cli import doctor as checks
    from services.cli.client import oak_home

    home = oak_home(args.data_dir)
    tiers = [args.tier] if args.tier else ["root", "cluster", "worker"]
    admin_dir = Path(args.admin_dir) if args.admin_dir else (home if args.tier in (None, "root") else oak_home(None))
    try:
        admin: Profile | None = Profile.load(admin_dir)
    except CliError:
        admin = None
    root = BrokerUrl.parse(args.root or os.environ.get("OAK_ROOT") or "127.0.0.1:10000", 10000, tls=True)
    cluster = BrokerUrl.parse(args.cluster or "127.0.0.1:10003", 10003, tls=True)
    host = not args.no_host_checks
    sections: list[tuple[str, list[checks.Finding]]] = []
    for tier in tiers:
        data_dir = home if args.tier or tier == "root" else home / tier
        if tier == "root":
            found = await checks.diagnose("root", data_dir, host=host,
                                          ports=(("broker", root.port), ("metrics", metrics.PORTS["root"])))
        elif tier == "cluster":
            found = await checks.diagnose("cluster", data_dir, parent=root, token=args.join_token, host=host,
                                          ports=(("broker", cluster.port), ("metrics", metrics.PORTS["cluster"])))
        else:
            netcfg = Path(args.netcfg) if args.netcfg else (DEFAULT_NETCFG if DEFAULT_NETCFG.exists() else None)
            found = await checks.diagnose("worker", data_dir, parent=cluster, token=args.join_token, netcfg=netcfg,
                                          netmanager=args.netmanager, host=host,
                                          ports=(("metrics", metrics.PORTS["worker"]),))
        sections.append((f"{tier} ({data_dir})", found))
    seen = await checks.root_view(admin, worker=(args.name or socket.gethostname()) if "worker" in tiers else "",
                                  cluster=(args.cluster_name if "cluster" in tiers else ""))
    sections.append(("as the root sees it", seen))
    for title, found in sections:
        if len(sections) > 2:
            print(f"== {title}")
        print(checks.render(found))
    return max(checks.exit_code(found) for _, found in sections)


async def client_command(args: argparse.Namespace) -> tuple[Any, Render]:
    """Run one client command; return its data and how to render it."""
    from services.cli.client import oak_home

    home = oak_home(args.data_dir)
    profile = Profile.load(home, args.root)
    async with OakClient(profile) as oak:
        group, action = args.command, getattr(args, "action", None)
        if group == "events":
            return await _events(oak, args)
        if group == "app" and action == "create":
            return await oak.request("apps", "create", raw=_read_bytes(args.sla)), _apps
        if group == "app" and action == "list":
            return await oak.request("apps", "list"), _apps
        if group == "app" and action == "delete":
            data = await oak.request("apps", "delete", {"app": args.app})
            return data, lambda d: (f"deleted {d['app_id']} ({', '.join(d['deleted_services']) or 'no services'})"
                                    + (f" and its volumes {', '.join(d['deleted_volumes'])}"
                                       if d.get("deleted_volumes") else ""))
        if group == "service":
            return await _service_command(oak, args)
        if action == "revoke":
            kind = "cluster" if group == "cluster" else "node"
            if not args.target:
                raise CliError(f"which {kind}? oak {group} revoke NAME")
            data = await oak.request(f"{kind}s", "revoke", {kind: args.target})
            return data, lambda d: f"revoked {kind} {args.target}: disconnected, refused from now on"
        if group == "cluster":
            return await oak.request("clusters", "list"), lambda d: table(
                _dated(d), [("CLUSTER", "name"), ("STATE", "state"), ("LOCATION", "location"), ("NODES", "nodes"),
                    ("CPUS", "cpu_cores"), ("MEM MB", "memory_mb"), ("CPU%", "cpu_percent"),
                    ("INSTANCES", "instances"), ("CERT EXPIRES", "cert_expires")]) if d else "no clusters"
        if group == "node":
            return await oak.request("nodes", "list"), lambda d: table(
                _dated(d), [("NODE", "name"), ("CLUSTER", "cluster"), ("STATE", "state"), ("CPUS", "cpu_cores"),
                    ("CPU FREE", "cpu_free"), ("MEM MB", "memory_mb"), ("MEM FREE", "memory_free_mb"),
                    ("CPU%", "cpu_percent"), ("GPUS", "gpus"), ("RUNTIMES", "runtimes"), ("INSTANCES", "instances"),
                    ("CERT EXPIRES", "cert_expires")]) if d else "no nodes"
        if group == "user" and action == "create":
            password = args.password or os.environ.get("OAK_NEW_PASSWORD") or getpass.getpass("password: ")
            body = {"username": args.username, "password": password, "admin": args.admin}
            key = ca.new_key() if args.cert else None
            if key is not None:
                body["csr"] = ca.request(key, args.username).decode()
            data = await oak.request("users", "create", body)
            if key is None:
                return data, lambda d: f"created user {d['username']}" + (" (admin)" if d["admin"] else "")
            where = _keep_user_certificate(home, args.username, key, data)
            port = f" (port {data['port']})" if data.get("port") else ""
            return data, lambda d: (f"created user {d['username']}" + (" (admin)" if d["admin"] else "")
                                    + f"; its certificate, key and the CA are in {where}; it logs in with them "
                                    f"and no password{port}")
        if group == "user" and action == "list":
            return await oak.request("users", "list"), lambda d: table(d, [("USER", "username"), ("ADMIN", "admin")])
        if group == "volume" and action == "list":
            return await oak.request("volumes", "list"), lambda d: table(d, [
                ("SERVICE", "service"), ("VOLUME", "volume"), ("CLUSTER", "cluster"), ("NODE", "node"),
                ("BYTES", "bytes"), ("ONLINE", "online")]) if d else "no volumes"
        if group == "volume" and action == "delete":
            body = {"service": args.service, **({"volume": args.volume} if args.volume else {})}
            return await oak.request("volumes", "delete", body), lambda d: f"deleting {', '.join(d['deleted'])}"
        if group == "secret":
            return await _secret_command(oak, args)
        if group == "token" and action == "create":
            body = {"cluster": args.cluster, "ttl": duration(args.ttl), "uses": args.uses}
            return await oak.request("tokens", "create", body), _token
    raise CliError(f"unknown command {group} {action}")


FOLLOW_SECONDS = 3600


async def _secret_command(oak: OakClient, args: argparse.Namespace) -> tuple[Any, Render]:
    """``oak secret set | list | delete``: what is printed never holds a value."""
    if args.action == "list":
        rows = [{**s, "at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["at"])),
                 "used_by": ", ".join(s["used_by"]) or "-"} for s in await oak.request("secrets", "list")]
        return rows, lambda d: table(d, [("SECRET", "name"), ("VERSION", "version"), ("SET", "at"),
                                         ("BYTES", "size"), ("USED BY", "used_by")]) if d else "no secrets"
    if args.action == "delete":
        return await oak.request("secrets", "delete", {"name": args.name}), lambda d: f"deleted secret {d['name']}"
    body: dict[str, Any] = {"name": args.name}
    if args.from_file is not None:
        body["value_b64"] = base64.b64encode(_read_bytes(args.from_file)).decode()
    else:
        body["value"] = args.value
    data = await oak.request("secrets", "set", body)
    return data, lambda d: (f"secret {d['name']} is at version {d['version']} ({d['size']} bytes)"
                            + (f"; rolling {', '.join(d['rolled'])}" if d["rolled"] else ""))


async def _events(oak: OakClient, args: argparse.Namespace) -> tuple[Any, Render]:
    """``oak events``: the recent events (retained), then, with -f, each new batch as it comes."""
    me = oak.profile.username
    recent, live = channels.API_EVENTS_RECENT.topic(user=me), channels.API_EVENTS.topic(user=me)
    await oak.session.subscribe_confirmed(recent, *([live] if args.follow else []))
    if args.follow:  # on stderr: stdout holds only events, for scripts
        print("oak: following new events (Ctrl-C stops)", file=sys.stderr, flush=True)

    def wanted(channel: channels.Channel[dict[str, Any]], payload: bytes) -> list[dict[str, Any]]:
        try:
            rows = event_rows(channel.decode(payload))
        except ValueError:  # not an events document: nothing to show from it
            return []
        return [e for e in rows if not args.service or e.get("service") == args.service]

    shown: set[str] = set()
    try:
        async with asyncio.timeout(2.0):  # the retained recent events come at once, if there are any
            while True:
                message = await oak.updates.get()
                if message.topic == recent:
                    break
        events = wanted(channels.API_EVENTS_RECENT, message.payload)
        events = events[len(events) - args.tail:] if args.tail > 0 else []
    except TimeoutError:
        events = []
    for event in events:
        shown.add(json.dumps(event, sort_keys=True))
        print(event_line(event), flush=True)
    if not events and not args.follow:
        print("no events yet")
    while args.follow:
        message = await oak.updates.get()
        if message.topic != live:
            continue
        for event in wanted(channels.API_EVENTS, message.payload):
            if json.dumps(event, sort_keys=True) not in shown:
                print(event_line(event), flush=True)
    return None, lambda _: ""


async def _logs(oak: OakClient, args: argparse.Namespace) -> tuple[Any, Render]:
    """Print log lines as they arrive (prefixed with the instance when there are several)."""
    body: dict[str, Any] = {"service": args.service, "tail": args.tail}
    if args.instance is not None:
        body["instance"] = args.instance
    if args.follow:
        body["follow"] = FOLLOW_SECONDS
    first, answers = await oak.stream("services", "logs", body)
    waiting = set(first["instances"])
    prefix = len(waiting) > 1
    try:
        async for answer in answers:
            data = answer.get("data") or {}
            if not answer.get("ok"):
                print(f"oak: instance {data.get('number')}: {answer.get('error', {}).get('message')}", file=sys.stderr)
            for line in data.get("lines", []):
                print(f"#{data['number']} {line}" if prefix else line, flush=True)
            if data.get("done"):
                waiting.discard(data.get("number"))
                if not waiting:
                    break
    finally:
        if args.follow and waiting:
            await oak.request("services", "logs", {"stop": first["stream"]})
    return None, lambda _: ""


async def _service_command(oak: OakClient, args: argparse.Namespace) -> tuple[Any, Render]:
    action = args.action
    if action == "logs":
        return await _logs(oak, args)
    if action == "list":
        return await oak.request("services", "list", {"app": args.app} if args.app else {}), services_text
    if action in ("update", "history", "rollback", "promote"):
        return await revision_command(oak, args)
    if action == "inspect":
        return await oak.request("services", "inspect", {"service": args.service}), service_text
    if action == "scale":
        scale = {"service": args.service, "replicas": args.replicas}
        return await oak.request("services", "scale", scale), service_text
    if action == "undeploy":
        body: dict[str, Any] = {"service": args.service}
        if args.instance is not None:
            body["instance"] = args.instance
        return await oak.request("services", "undeploy", body), service_text
    data = await oak.request("services", "deploy", {"service": args.service, "replicas": args.replicas})
    if args.wait:
        seen: list[str] = []

        def progress(state: dict[str, Any]) -> None:
            line = ", ".join(f"#{i['number']} {i['status']}" for i in state["instances"])
            if not seen or seen[-1] != line:
                seen.append(line)
                print(f"{state['job_name']}: {line}", file=sys.stderr, flush=True)

        data = await oak.wait_until_running(data["job_name"], args.timeout, progress)
    return data, service_text
