"""``oak install`` / ``oak uninstall``: the units it writes pass ``systemd-analyze verify``, their ExecStart
lines run a real root, cluster and worker that find each other, and uninstall removes exactly what install
wrote. Everything goes under a temporary --prefix; nothing is enabled (no systemd runs here)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from services.cli.client import OakClient, Profile
from tests.stack import REPO, Proc, eventually, free_port, oak

pytestmark = pytest.mark.timeout(120)
OAK = str(Path(shutil.which("oak") or REPO / ".venv" / "bin" / "oak"))


def run_install(prefix: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert prefix != Path("/"), "tests install under a temporary prefix only"
    tier, *rest = args  # the prefix before any --, after which flags are the tier's own
    return subprocess.run(oak("install", tier, "--prefix", str(prefix), "--no-enable", *rest), capture_output=True,
                          text=True, cwd=REPO, timeout=60)


def exec_start(unit: Path) -> list[str]:
    """The ExecStart command of *unit*."""
    line = next(ln for ln in unit.read_text().splitlines() if ln.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


def test_dry_run_prints_without_writing_or_showing_the_token(tmp_path: Path) -> None:
    done = subprocess.run(oak("install", "worker", "--cluster", "10.0.0.5:10003", "--join-token", "s3cret",
                              "--prefix", str(tmp_path), "--dry-run"), capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "/etc/systemd/system/oak-worker.service" in done.stdout
    assert "KillMode=process" in done.stdout
    assert "OAK_JOIN_TOKEN=..." in done.stdout
    assert "s3cret" not in done.stdout
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"


def test_seed_pair_and_uninstall(tmp_path: Path) -> None:
    """``worker --seed``: NetManager and NodeEngine units (the engine requires the manager) and netcfg.json,
    which a second install leaves as it is; uninstall removes what install wrote and keeps the state."""
    done = run_install(tmp_path, "worker", "--seed", "--cluster", "10.0.0.5", "--join-token", "t0k")
    assert done.returncode == 0, done.stderr
    units = tmp_path / "etc/systemd/system"
    assert sorted(p.name for p in units.iterdir()) == ["netmanager.service", "nodeengine.service"]
    engine = (units / "nodeengine.service").read_text()
    assert "Requires=netmanager.service" in engine
    assert exec_start(units / "nodeengine.service")[1:5] == ["-n", "6000", "-a", "10.0.0.5"]
    assert exec_start(units / "netmanager.service")[1:3] == ["-p", "6000"]
    env = tmp_path / "etc/oak/worker.env"
    assert env.read_text() == "OAK_JOIN_TOKEN=t0k\n"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    netcfg = tmp_path / "etc/netmanager/netcfg.json"
    assert json.loads(netcfg.read_text())["ClusterUrl"] == "10.0.0.5"
    netcfg.write_text('{"ClusterUrl": "edited.by.hand"}')
    (tmp_path / "var/lib/oak/worker/worker.db.json").write_text("{}")  # state the worker made
    done = subprocess.run(oak("uninstall", "worker", "--prefix", str(tmp_path), "--no-enable"), capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not list(units.iterdir())
    assert not env.exists()
    assert (tmp_path / "var/lib/oak/worker/worker.db.json").exists(), "the worker's state stays"
    assert netcfg.read_text() == '{"ClusterUrl": "edited.by.hand"}', "an edited netcfg.json is the user's"
    again = subprocess.run(oak("uninstall", "worker", "--prefix", str(tmp_path), "--no-enable"),
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    assert again.returncode != 0
    assert "nothing installed for worker" in again.stderr


def test_units_pass_systemd_analyze(tmp_path: Path) -> None:
    """systemd's own checker finds nothing to say about any unit install writes."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd package has it)")
    for tier, extra in (("root", []), ("cluster", ["--root", "10.0.0.1:10000"]),
                        ("worker", ["--cluster", "10.0.0.5:10003"]), ("worker", ["--seed", "--cluster", "10.0.0.5"])):
        prefix = tmp_path / f"{tier}{len(extra)}"
        assert run_install(prefix, tier, *extra).returncode == 0
        for unit in (prefix / "etc/systemd/system").iterdir():
            done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                                  timeout=60)
            said = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
            assert done.returncode == 0, done.stderr
            assert said == [], said


async def test_the_units_exec_start_lines_run_a_fleet(tmp_path: Path) -> None:
    """Root, cluster and worker installed, then each unit's ExecStart run as systemd would (its env file
    read), with the data directories under the prefix: the worker joins and shows up online at the root."""
    token, port, cport = "install-token-1", free_port(), free_port()
    assert run_install(tmp_path, "root", "--", "--host", "127.0.0.1", "--port", str(port),
                       f"--join-token={token}", "--metrics-port", "0").returncode == 0
    assert run_install(tmp_path, "cluster", "--name", "c1", "--root", f"127.0.0.1:{port}", "--join-token", token,
                       "--", "--host", "127.0.0.1", "--port", str(cport), "--metrics-port", "0",
                       f"--join-token={token}").returncode == 0
    assert run_install(tmp_path, "worker", "--name", "w1", "--cluster", f"127.0.0.1:{cport}", "--join-token", token,
                       "--", "--metrics-port", "0").returncode == 0
    procs = []
    try:
        for tier in ("root", "cluster", "worker"):
            command = exec_start(tmp_path / f"etc/systemd/system/oak-{tier}.service")
            command = [str(tmp_path) + arg if arg.startswith("/var/lib/oak/") else arg for arg in command]
            env = dict(line.split("=", 1) for line in (tmp_path / f"etc/oak/{tier}.env").read_text().splitlines())
            proc = Proc(tier, command, tmp_path, env).start()
            procs.append(proc)
            if tier == "root":
                await eventually(lambda: (tmp_path / "var/lib/oak/root/credentials.json").exists(), 30,
                                 what="the root up")
        client: Any = await OakClient(Profile.load(tmp_path / "var/lib/oak/root")).__aenter__()
        try:
            async def online() -> bool:
                return any(n["name"] == "w1" and n["online"] for n in await client.request("nodes", "list"))

            await eventually(online, 60, what="the installed worker online")
        finally:
            await client.__aexit__(None, None, None)
    finally:
        for proc in reversed(procs):
            proc.stop()
    assert command[0] == OAK or os.path.basename(command[0]) == "oak"
