"""``oak doctor [root|cluster|worker]``: why a tier does not come up or show up, one line per check, each
problem with its fix.

Every check is a small function giving :class:`Finding` s; :func:`diagnose` runs those that apply to a tier
and :func:`render` prints them. ``fail`` means the tier cannot work as it is (``oak doctor`` then exits 1);
``warn`` means it works with less (no KVM, no GPU); ``ok`` and ``info`` say what was found.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import ssl
import subprocess
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from broker.join import Login
from plugins.runtimes import cgroups, containerd, oci
from services.cli.client import ApiFailure, CliError, OakClient, Profile
from services.common.mqtt import BrokerUrl
from services.worker import gpus
from services.worker.netcfg import NetConfig, NetConfigError

Level = Literal["ok", "info", "warn", "fail"]
TCP_TIMEOUT = 3.0
CLOCK_SKEW_MAX = 2.0  # seconds: liveness reads its peers' silence from their clocks' timestamps
DISK_LOW_MB, DISK_FULL_MB = 1024, 100
SBIN = "/usr/sbin:/sbin"  # where system tools are when a user's PATH leaves them out


@dataclass(frozen=True)
class Finding:
    """One thing a check found: its level, what it found and, for a problem, how to fix it."""

    check: str
    level: Level
    said: str
    fix: str = ""


def render(findings: Iterable[Finding]) -> str:
    """One line per finding: ``LEVEL  check  what (fix: ...)``."""
    lines = []
    for f in findings:
        fix = f"  -> {f.fix}" if f.fix and f.level in ("warn", "fail") else ""
        lines.append(f"{f.level.upper():<5} {f.check:<12} {f.said}{fix}")
    return "\n".join(lines)


def exit_code(findings: Iterable[Finding]) -> int:
    """1 when a finding blocks operation, else 0."""
    return 1 if any(f.level == "fail" for f in findings) else 0


# ---- the host ------------------------------------------------------------------------------------------


def cgroup_check() -> Finding:
    """cgroup v1 or v2 with the memory and cpu controllers (instances' limits)."""
    version = cgroups.version()
    if version is None:
        return Finding("cgroups", "warn" if os.geteuid() == 0 else "info",
                       "no cgroup hierarchy with the memory and cpu controllers: instances run without limits",
                       "boot with cgroups enabled (systemd.unified_cgroup_hierarchy=1, cgroup_enable=memory "
                       "on a Raspberry Pi's cmdline.txt)")
    v2 = cgroups.cgroup2_mount()
    hybrid = " (hybrid: v2 at " + str(v2) + ")" if version == 1 and v2 else ""
    return Finding("cgroups", "ok", f"cgroup v{version} with memory and cpu{hybrid}")


def runtime_checks() -> list[Finding]:
    """Which runtimes this machine can run: OCI runtimes, containerd, QEMU with KVM or TCG, wasmtime, GPUs."""
    out = []
    quiet = logging.getLogger(oci.__name__)
    level, quiet.level = quiet.level, logging.ERROR  # said below, as a finding
    try:
        found = oci.discover()
    finally:
        quiet.setLevel(level)
    out.append(oci_check(found))
    if any(r.kernel_network for r in found.values()):
        out.append(Finding("runtimes", "info", "this runsc is too old for its own network stack on this kernel "
                                               "(gVisor issue 10704): its instances use the kernel's",
                           "install a gVisor release from August 2024 or later"))
    if "runc" in found and not shutil.which("umoci"):
        out.append(Finding("runtimes", "warn", "umoci is missing: images cannot be unpacked for runc",
                           "apt-get install umoci"))
    missing = containerd.missing()
    out.append(Finding("containerd", "ok" if missing is None else "info",
                       "containerd and ctr found" if missing is None else f"{missing}; containers use runc directly"))
    qemu = shutil.which("qemu-system-x86_64") or shutil.which("qemu-system-aarch64")
    if not qemu:
        out.append(Finding("qemu", "info", "QEMU is not installed: no unikernels or microVMs (--unikernel)",
                           "apt-get install qemu-system-x86 (or qemu-system-arm)"))
    else:
        kvm = os.access("/dev/kvm", os.R_OK | os.W_OK)
        out.append(Finding("qemu", "ok" if kvm else "warn", f"{qemu} with {'KVM' if kvm else 'TCG (software, slow)'}",
                           "" if kvm else "enable virtualization in the firmware, or give this user /dev/kvm"))
    try:
        import importlib.util

        wasm = importlib.util.find_spec("wasmtime") is not None
    except ValueError:
        wasm = False
    out.append(Finding("wasm", "ok" if wasm else "info",
                       "wasmtime installed (--runtime wasm)" if wasm else "wasmtime is not installed: no wasm runtime",
                       "" if wasm else "pip install wasmtime"))
    listed = gpus.discover()
    out.append(Finding("gpus", "ok" if listed else "info",
                       f"{len(listed)} NVIDIA GPU(s): {gpus.summary(listed)[1]}" if listed else "no NVIDIA GPU found"))
    return out


def oci_check(found: dict[str, oci.OciRuntime]) -> Finding:
    """The OCI runtimes found, or that there is none."""
    if not found:
        return Finding("runtimes", "warn", "no OCI runtime (runc, crun, runsc): containers cannot run",
                       "apt-get install runc umoci")
    return Finding("runtimes", "ok", "OCI runtimes: " + ", ".join(f"{n} ({r.path})" for n, r in found.items()))


def nftables_check() -> Finding:
    """nftables, which service IPs and port mappings use."""
    nft = shutil.which("nft") or shutil.which("nft", path=SBIN)
    if nft is None:
        return Finding("nftables", "fail", "nft is missing: no service IPs or port mappings on the overlay",
                       "apt-get install nftables")
    return Finding("nftables", "ok", f"{nft} found")


def vxlan_check() -> Finding:
    """Whether this kernel makes VXLAN devices (the overlay), tried in a namespace made and removed here."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return Finding("vxlan", "info", "not tried: needs root and iproute2")
    name = f"oakdoc{uuid.uuid4().hex[:6]}"
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
        made = subprocess.run(["ip", "-n", name, "link", "add", "vx0", "type", "vxlan", "id", "42", "dstport",
                               "4789"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return Finding("vxlan", "warn", f"cannot try: {exc}")
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    if made.returncode != 0:
        return Finding("vxlan", "fail", f"the kernel makes no VXLAN device: {made.stderr.strip()[:120]}",
                       "load the vxlan module (modprobe vxlan) or use a kernel with CONFIG_VXLAN")
    return Finding("vxlan", "ok", "VXLAN devices can be made")


def netcfg_check(path: Path) -> Finding:
    """netcfg.json, as the seed's NetManager and ``oak worker`` read it."""
    if not path.exists():
        return Finding("netcfg", "info", f"{path} does not exist: the defaults apply")
    try:
        cfg = NetConfig.load(path)
    except NetConfigError as exc:
        return Finding("netcfg", "fail", str(exc), f"edit {path} (fields: README, netcfg.json)")
    return Finding("netcfg", "ok", f"{path} valid (cluster {cfg.cluster_url}:{cfg.cluster_mqtt_port})")


def port_checks(ports: Iterable[tuple[str, int]]) -> list[Finding]:
    """Each (what, port) free to listen on, or in use (by this tier already running, or by another)."""
    out = []
    for what, port in ports:
        if not port:
            continue
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("0.0.0.0", port))
                out.append(Finding("ports", "ok", f"{what} port {port} is free"))
            except OSError:
                out.append(Finding("ports", "info", f"{what} port {port} is in use (by this tier if it runs, "
                                                   "else by another program)",
                                   f"stop what holds it (ss -ltnp 'sport = :{port}') or pick another port"))
    return out


def disk_check(path: Path) -> Finding:
    """Free space where the tier keeps its data (its database, logs, images)."""
    where = path if path.exists() else next((p for p in path.parents if p.exists()), Path("/"))
    free = shutil.disk_usage(where).free // 2**20
    if free < DISK_FULL_MB:
        return Finding("disk", "fail", f"{free} MB free at {where}", "free space: the store cannot write")
    if free < DISK_LOW_MB:
        return Finding("disk", "warn", f"only {free} MB free at {where}", "free space before images fill it")
    return Finding("disk", "ok", f"{free} MB free at {where}")


# ---- the network -------------------------------------------------------------------------------------


async def reach_check(what: str, host: str, port: int) -> Finding:
    """A TCP connection to *host*:*port*."""
    try:
        async with asyncio.timeout(TCP_TIMEOUT):
            _, writer = await asyncio.open_connection(host, port)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    except (OSError, TimeoutError) as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return Finding("reach", "fail", f"cannot reach the {what} at {host}:{port}: {reason}",
                       "start it, or check the address, its firewall and --host/--port")
    return Finding("reach", "ok", f"the {what} answers at {host}:{port}")


def join_check(data_dir: Path, token: str) -> Finding:
    """A saved login, or a join token to get one."""
    saved = Login.load(data_dir)
    if saved is not None:
        if saved.expired():
            return Finding("join", "fail" if not token else "warn", f"the certificate of {saved.username} has ended",
                           "give a join token (oak token create on the root) to join again")
        return Finding("join", "ok", f"joined as {saved.username} (kept in {data_dir})")
    if not token:
        return Finding("join", "fail", "not joined yet and no join token given",
                       "run `oak token create` on the root (`--cluster` for a cluster) and pass --join-token")
    return Finding("join", "ok", "not joined yet; a join token is given")


async def login_check(url: BrokerUrl, data_dir: Path) -> Finding:
    """The saved certificate, tried in a TLS handshake with the parent's broker: an unknown CA or an ended
    certificate fails there. Never an MQTT login: the broker lets one connection per identity, and a running
    tier would lose its own; so a revoked identity (refused at login) shows in the root's view instead."""
    saved = Login.load(data_dir)
    if saved is None:
        return Finding("login", "info", "no saved login to try yet (it joins at its first start)")
    if saved.cert is None:
        return Finding("login", "info", f"{saved.username} logs in with a password: tried at its next start")
    where = saved.at(url)
    try:
        async with asyncio.timeout(TCP_TIMEOUT * 2):
            reader, writer = await asyncio.open_connection(where.host, where.port, ssl=saved.tls(),
                                                           server_hostname=where.host)
            # TLS 1.3 sends the broker's verdict on the client's certificate after the handshake: read it
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await reader.read(1)
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        return Finding("login", "fail", f"{where} refuses the certificate of {saved.username}: {exc}",
                       f"revoked or from another fleet: remove {data_dir / 'identity.json'} and join again with a "
                       "new token")
    return Finding("login", "ok", f"{where} takes the certificate of {saved.username} in a TLS handshake")


def clock_check(lag: float | None) -> Finding:
    """The clock against the root's, from how old the root's answer looked when it arrived."""
    if lag is None:
        return Finding("clock", "info", "not measured (no answer from the root)")
    if abs(lag) > CLOCK_SKEW_MAX:
        return Finding("clock", "warn", f"this clock and the root's differ by about {lag:+.1f} s",
                       "run NTP (systemd-timesyncd or chrony): silences are judged from timestamps")
    return Finding("clock", "ok", f"within {CLOCK_SKEW_MAX:g} s of the root's ({lag:+.2f} s)")


async def root_view(profile: Profile | None, worker: str = "", cluster: str = "") -> list[Finding]:
    """What the root says, asked as the admin: the clusters and workers it sees, and the clock's offset."""
    if profile is None:
        return [Finding("seen", "info", "no admin credentials here: cannot ask the root what it sees",
                        "pass --admin-dir with the root's credentials.json to check it")]
    try:
        async with OakClient(profile) as oak:
            clusters = await oak.request("clusters", "list")
            nodes = await oak.request("nodes", "list")
            lag = oak.last_lag
    except (CliError, ApiFailure) as exc:
        return [Finding("root", "fail", f"the root at {profile.root} does not serve the admin: {exc}",
                        "start the root (`oak root` or `oak up`) and check credentials.json")]
    online = [c["name"] for c in clusters if c.get("online")]
    out = [Finding("root", "ok", f"the root at {profile.root} serves; clusters online: "
                                 f"{', '.join(online) or 'none'} of {len(clusters)}"), clock_check(lag)]
    if cluster:
        state = next((c.get("state", "") for c in clusters if c["name"] == cluster), None)
        out.append(Finding("seen", "ok" if cluster in online else "fail",
                           f"the root sees cluster {cluster}: {state}" if state is not None
                           else f"the root has never seen cluster {cluster}",
                           "" if cluster in online else "check the cluster's log, --root and its join token"))
    if worker:
        node = next((n for n in nodes if n["name"] == worker), None)
        ok = node is not None and node.get("online")
        said = (f"the root has never seen worker {worker}" if node is None
                else f"worker {worker} is {node.get('state') or ('online' if ok else 'offline')} in cluster "
                     f"{node.get('cluster')}")
        out.append(Finding("seen", "ok" if ok else "fail", said,
                           "" if ok else "check the worker's log, --cluster and its join token"))
    return out


def host_checks(data_dir: Path) -> list[Finding]:
    """What a worker needs of its machine."""
    return [cgroup_check(), *runtime_checks(), nftables_check(), vxlan_check(), disk_check(data_dir)]


async def diagnose(tier: str, data_dir: Path, *, parent: BrokerUrl | None = None, token: str = "",
                   ports: tuple[tuple[str, int], ...] = (), netcfg: Path | None = None, netmanager: int = 0,
                   host: bool = True) -> list[Finding]:
    """Every check that applies to *tier* (``root``, ``cluster`` or ``worker``) kept in *data_dir*; *host*:
    also the machine's (a worker's cgroups, runtimes, nftables and VXLAN; every tier's disk)."""
    out: list[Finding] = []
    if host:
        out += host_checks(data_dir) if tier == "worker" else [disk_check(data_dir)]
    if netcfg is not None:
        out.append(netcfg_check(netcfg))
    if netmanager:
        out.append(await reach_check("NetManager", "127.0.0.1", netmanager))
    out += port_checks(ports)
    if parent is not None:
        what = "root" if tier == "cluster" else "cluster"
        reached = await reach_check(what, parent.host, parent.port)
        out.append(reached)
        out.append(join_check(data_dir, token))
        if reached.level == "ok":
            out.append(await login_check(parent, data_dir))
    return out
