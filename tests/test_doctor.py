"""``oak doctor`` against working and broken set-ups: each problem one line with its fix, exit 1 when blocked."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from services.cli import doctor
from tests.conftest import eventually
from tests.stack import REPO, Stack, free_port, oak
from tests.test_three_tiers import _online_nodes

pytestmark = pytest.mark.timeout(120)


def run_doctor(*args: str) -> tuple[int, dict[str, list[str]]]:
    """``oak doctor ARGS``: its exit code and its lines by level."""
    done = subprocess.run(oak("doctor", *args), capture_output=True, text=True, cwd=REPO, timeout=90)
    lines: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        level = line.split(" ", 1)[0]
        lines.setdefault(level, []).append(line)
    assert done.stderr.strip() == "" or "Traceback" not in done.stderr, done.stderr
    return done.returncode, lines


def test_levels_and_fixes() -> None:
    """A blocking finding makes the exit code 1; a problem's line carries its fix."""
    found = [doctor.Finding("disk", "ok", "plenty"), doctor.clock_check(5.2), doctor.clock_check(0.1)]
    assert doctor.exit_code(found) == 0
    text = doctor.render(found)
    assert "WARN  clock        this clock and the root's differ by about +5.2 s  -> run NTP" in text
    assert doctor.exit_code([*found, doctor.Finding("join", "fail", "no token", "get one")]) == 1


def test_oci_runtimes_found_or_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runtimes found are listed, and then no warning says there is none; none found is a warning with its fix."""
    from plugins.runtimes.oci import OciRuntime

    runc = {"runc": OciRuntime("runc", "/usr/bin/runc")}
    for found, level in ((runc, "ok"), ({}, "warn")):
        monkeypatch.setattr(doctor.oci, "discover", lambda found=found: found)
        (verdict,) = [f for f in doctor.runtime_checks() if f.check == "runtimes"]
        assert verdict.level == level
    assert doctor.oci_check(runc).said == "OCI runtimes: runc (/usr/bin/runc)"
    assert doctor.oci_check({}).fix == "apt-get install runc umoci"


def test_a_bad_netcfg_and_a_busy_port(tmp_path: Path) -> None:
    """netcfg.json with a wrong field fails naming it; a port in use is a warning with how to find who holds it."""
    bad = tmp_path / "netcfg.json"
    bad.write_text(json.dumps({"NodePublicPort": "lots"}))
    assert doctor.netcfg_check(bad).level == "fail"
    assert "NodePublicPort" in doctor.netcfg_check(bad).said
    bad.write_text("{not json")
    assert "not valid JSON" in doctor.netcfg_check(bad).said
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        (finding,) = doctor.port_checks([("broker", port)])
    assert finding.level == "info"
    assert "in use" in finding.said


async def test_a_worker_that_never_joined(tmp_path: Path) -> None:
    """No cluster at the address, no token: both fail, each with its fix, and the exit code says so."""
    code, lines = await asyncio.to_thread(
        run_doctor, "worker", "--data-dir", str(tmp_path / "w"), "--cluster", f"127.0.0.1:{free_port()}",
        "--name", "ghost", "--no-host-checks")
    assert code == 1
    fails = "\n".join(lines.get("FAIL", []))
    assert "cannot reach the cluster" in fails
    assert "not joined yet and no join token given" in fails
    assert "oak token create" in fails


async def test_a_working_stack_then_a_stopped_worker(stack: Stack, api: Any) -> None:
    """A joined worker, online at the root: everything the doctor tries passes; once the worker stops, the
    root's view says it is offline, and the doctor fails on that."""
    stack.root()
    stack.cluster("c1")
    stack.worker("w1", "c1")
    client = await api()
    await eventually(lambda: _online_nodes(client, 1), what="the worker online")
    flags = ("worker", "--data-dir", str(stack.base / "w1"), "--cluster",
             f"mqtts://127.0.0.1:{stack.cluster_ports['c1']}", "--name", "w1", "--admin-dir",
             str(stack.base / "root"), "--no-host-checks")
    code, lines = await asyncio.to_thread(run_doctor, *flags)
    said = "\n".join(line for level in lines.values() for line in level)
    assert code == 0, said
    assert "takes the certificate of node.w1 in a TLS handshake" in said
    assert "worker w1 is online in cluster c1" in said
    assert "OK    clock" in said
    cluster = await asyncio.to_thread(run_doctor, "cluster", "--data-dir", str(stack.base / "c1"), "--root",
                                      f"mqtts://127.0.0.1:{stack.root_port}", "--cluster-name", "c1", "--admin-dir",
                                      str(stack.base / "root"))
    assert cluster[0] == 0, cluster[1]
    stack.procs["w1"].stop()

    async def offline() -> bool:
        return not await _online_nodes(client, 1)

    await eventually(offline, 30, what="the worker offline")
    code, lines = await asyncio.to_thread(run_doctor, *flags)
    assert code == 1
    assert any(re.search(r"worker w1 is (offline|LOST)", line) for line in lines.get("FAIL", [])), lines
