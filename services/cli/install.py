"""``oak install root|cluster|worker``: systemd units, so a tier starts at boot and starts again when it fails;
``oak uninstall TIER`` removes exactly what install wrote.

What install writes (under ``--prefix``, ``/`` by default; docs/install.md):

* ``/etc/systemd/system/oak-<tier>.service``, or for ``worker --seed`` the seed guide's pair,
  ``netmanager.service`` and ``nodeengine.service`` (NodeEngine requires NetManager);
* ``/etc/oak/<tier>.env`` (0600): the join token, which a unit must not show on its command line;
* ``/var/lib/oak/<tier>/`` (0700): the tier's data directory;
* for ``--seed``: ``/etc/netmanager/netcfg.json`` from ``--cluster``, unless one is there (never overwritten);
* ``/var/lib/oak/<tier>/installed.json``: the list of what it wrote, which uninstall removes.

A worker's unit has ``KillMode=process``: restarting the worker must not kill its instances (the new worker
adopts them), and ``Delegate=yes``, so the worker manages its instances' cgroups below its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

UNITS = Path("etc/systemd/system")
ENV_DIR = Path("etc/oak")
DATA = Path("var/lib/oak")
NETCFG = Path("etc/netmanager/netcfg.json")
MANIFEST = "installed.json"
TIERS = ("root", "cluster", "worker")


@dataclass(frozen=True)
class Install:
    """What one ``oak install`` writes: files (relative to the prefix) with their modes, and directories."""

    tier: str
    files: dict[Path, tuple[str, int]] = field(default_factory=dict)
    dirs: tuple[Path, ...] = ()
    units: tuple[str, ...] = ()
    keep: tuple[Path, ...] = ()  # written only when missing (netcfg.json)


def unit(description: str, command: list[str], env_file: Path, *, worker: bool = False,
         requires: str = "") -> str:
    """A systemd service unit running *command*, restarted when it fails, reading *env_file* if present."""
    after = "network-online.target" + (f" {requires}" if requires else "")
    lines = ["[Unit]", f"Description={description}", f"After={after}", "Wants=network-online.target"]
    if requires:
        lines.append(f"Requires={requires}")
    lines += ["", "[Service]", "Type=simple", f"EnvironmentFile=-/{env_file}",
              f"ExecStart={shlex.join(command)}", "Restart=on-failure", "RestartSec=5", "TimeoutStopSec=30",
              "LimitNOFILE=65536"]
    if worker:
        lines += ["# restarting the worker must not kill its instances: the new one adopts them",
                  "KillMode=process", "Delegate=yes"]
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def plan(tier: str, flags: list[str], *, oak: str, token: str = "", seed: bool = False, cluster: str = "",
         name: str = "") -> Install:
    """What installing *tier* writes: its unit(s) running ``oak TIER --data-dir ... FLAGS`` (or the seed's
    NetManager and NodeEngine for ``worker --seed``), its env file and data directory."""
    if tier not in TIERS:
        raise ValueError(f"install what? one of {', '.join(TIERS)}")
    data = DATA / tier
    env_file = ENV_DIR / f"{tier}.env"
    # a cluster presents its token to the root; a worker to its cluster; a root accepts it from clusters
    env = f"{'OAK_ROOT_JOIN_TOKEN' if tier == 'cluster' else 'OAK_JOIN_TOKEN'}={token}\n" if token else ""
    files: dict[Path, tuple[str, int]] = {env_file: (env, 0o600)}
    bindir = Path(oak).parent
    if tier == "worker" and seed:
        if not cluster:
            raise ValueError("worker --seed needs --cluster (the cluster orchestrator's address)")
        netmanager = [str(bindir / "NetManager"), "-p", "6000", "--data-dir", f"/{data}/netmanager"]
        engine = [str(bindir / "NodeEngine"), "-n", "6000", "-a", cluster, "--data-dir", f"/{data}",
                  *(["--name", name] if name else []), *flags]
        files[UNITS / "netmanager.service"] = (unit("Oakling NetManager (the seed's overlay)", netmanager, env_file),
                                               0o644)
        files[UNITS / "nodeengine.service"] = (unit("Oakling NodeEngine (the seed's worker)", engine, env_file,
                                                    worker=True, requires="netmanager.service"), 0o644)
        netcfg = json.dumps({"ClusterUrl": cluster, "ClusterMqttPort": 10003, "NodePublicAddress": "auto"}, indent=2)
        files[NETCFG] = (netcfg + "\n", 0o644)
        return Install(tier, files, (data,), ("netmanager.service", "nodeengine.service"), (NETCFG,))
    command = [oak, tier, "--data-dir", f"/{data}", *(["--name", name] if name else []),
               *(["--cluster" if tier == "worker" else "--root", cluster] if cluster else []), *flags]
    files[UNITS / f"oak-{tier}.service"] = (unit(f"Oakling {tier}", command, env_file, worker=tier == "worker"),
                                            0o644)
    return Install(tier, files, (data,), (f"oak-{tier}.service",))


def render(install: Install) -> str:
    """What ``--dry-run`` prints: each file it would write, with its text (the env file's secrets hidden)."""
    out = []
    for path, (text, mode) in install.files.items():
        shown = "".join(f"{line.split('=', 1)[0]}=...\n" for line in text.splitlines()) if mode == 0o600 else text
        out.append(f"# /{path} (mode {mode:o}{', only if missing' if path in install.keep else ''})\n{shown}")
    out.append("# directories: " + ", ".join(f"/{d} (0700)" for d in install.dirs))
    return "\n".join(out)


def write(install: Install, prefix: Path) -> list[Path]:
    """Write *install* under *prefix*; return what was written (also listed in the manifest)."""
    written: list[Path] = []
    for directory in install.dirs:
        target = prefix / directory
        made = not target.exists()
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        if made:
            written.append(directory)
    for path, (text, mode) in install.files.items():
        target = prefix / path
        if path in install.keep and target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        os.chmod(target, mode)
        written.append(path)
    manifest = prefix / DATA / install.tier / MANIFEST
    manifest.write_text(json.dumps({"tier": install.tier, "units": list(install.units),
                                    "files": {str(p): _digest(prefix / p) for p in written if p not in install.dirs},
                                    "dirs": [str(d) for d in written if d in install.dirs]}, indent=2))
    return written


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def installed(tier: str, prefix: Path) -> dict[str, Any]:
    """The manifest ``install`` wrote for *tier* under *prefix*; ValueError when there is none."""
    manifest = prefix / DATA / tier / MANIFEST
    if not manifest.exists():
        raise ValueError(f"nothing installed for {tier} under {prefix} (no {manifest})")
    return dict(json.loads(manifest.read_text()))


def remove(tier: str, prefix: Path, listed: dict[str, Any]) -> tuple[list[Path], list[Path]]:
    """Remove what ``install`` wrote for *tier* under *prefix*, as its manifest *listed* says: (what went, what
    was kept). A file changed since (an edited netcfg.json) is kept; the data directory goes only if nothing
    but the manifest is left in it (the tier's state stays)."""
    manifest = prefix / DATA / tier / MANIFEST
    gone: list[Path] = []
    kept: list[Path] = []
    for name, digest in dict(listed.get("files", {})).items():
        target = prefix / name
        if target.exists() and _digest(target) != digest:
            kept.append(target)
        elif target.exists():
            target.unlink()
            gone.append(target)
    manifest.unlink()
    gone.append(manifest)
    for name in listed.get("dirs", []):
        target = prefix / name
        if target.exists() and not any(target.iterdir()):
            target.rmdir()
            gone.append(target)
    return gone, kept


def systemd_running() -> bool:
    """Whether systemd manages this machine (there is something to enable the units with)."""
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None
