"""Real Oakling processes on loopback ports, for tests and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.ca import fingerprint, load_certs
from plugins.runtimes.spares import Spares
from services.cli.client import Profile

REPO = Path(__file__).resolve().parents[1]


# Ports for the tiers under test are taken below Linux's ephemeral range (32768-60999), where no client
# socket of a test running alongside can hold them; a tier also listens on its port + 1 (plain loopback)
# and, on mosquitto, + 2 (certificates), so all three must be free.
PORTS = range(20_000, 32_000, 3)


def own_ports() -> range:
    """This process's share of :data:`PORTS`: each of pytest-xdist's workers takes a slice of its own, so
    tests running side by side never pick the same port (a port is only checked free, and the process
    that binds it starts a second or more later)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return PORTS[int(worker or 0) % count::count]


_handed_out: set[int] = set()  # never handed out twice by one process: a stack's tiers bind theirs later


def free_port() -> int:
    """A TCP port that, with the two after it, nobody uses right now and this process has not handed out."""
    candidates = [port for port in own_ports() if port not in _handed_out]
    for port in random.sample(candidates, min(200, len(candidates))):
        try:
            with contextlib.ExitStack() as held:
                for p in range(port, port + 3):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", p))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no three free TCP ports in a row below the ephemeral range")


class Proc:
    """An Oakling service started as its own process, with its log kept in a file."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.log = log_dir / f"{name}.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        """Start (or restart) the process."""
        handle = open(self.log, "ab")  # noqa: SIM115 - closed with the process
        self.popen = subprocess.Popen(self.args, stdout=handle, stderr=handle, env=self.env, cwd=REPO,
                                      start_new_session=True)
        handle.close()
        return self

    def kill9(self) -> None:
        """Kill it abruptly, as a crash would."""
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def freeze(self) -> None:
        """Stop it dead without closing anything (SIGSTOP): a hung device, or a link gone silent."""
        assert self.popen is not None
        self.popen.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """Let a frozen process go on (SIGCONT)."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop it gracefully (SIGTERM), then kill it if it lingers."""
        if self.popen is not None:
            self.thaw()  # a frozen process would not see the SIGTERM
            end(self.popen, 15)

    def tail(self, lines: int = 30) -> str:
        """The end of its log, for failure messages."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


def end(popen: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """Stop a process this test started: SIGTERM, then SIGKILL if it lingers past *grace* seconds."""
    if popen.poll() is not None:
        return
    popen.send_signal(signal.SIGTERM)
    try:
        popen.wait(grace)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait(5)


def oak(*args: str) -> list[str]:
    """The command line of ``oak ARGS`` run with this interpreter."""
    return [sys.executable, "-m", "services.cli.main", *args]


#: Every tier of a stack serves no metrics unless a test asks (``--metrics-port N`` in its flags wins): the
#: default ports are one per machine, and tests run side by side.
QUIET = ("--metrics-port", "0")


class Stack:
    """Root, clusters and workers as separate processes on loopback ports, each with its own data dir."""

    def __init__(self, base: Path, env: dict[str, str] | None = None, *, root_args: tuple[str, ...] = (),
                 cluster_args: tuple[str, ...] = ()) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.env = env or {}
        self.root_args = root_args  # e.g. ("--broker", "mosquitto"), for every root started
        self.cluster_args = cluster_args  # the same, for every cluster
        self.procs: dict[str, Proc] = {}
        self.scheme = "mqtts://"  # how clusters and workers reach their parents ("mqtt://" for a broker without TLS)
        self.token = secrets.token_urlsafe(16)  # every tier's --join-token: joining needs one by default
        self.root_port = free_port()
        self.cluster_ports: dict[str, int] = {}
        self.worker_dirs: dict[str, Path] = {}  # each worker's data directory

    def _start(self, name: str, args: list[str]) -> Proc:
        proc = Proc(name, args, self.base, self.env).start()
        self.procs[name] = proc
        return proc

    def root(self, *extra: str) -> Proc:
        """Start the root."""
        return self._start("root", oak("root", "--data-dir", str(self.base / "root"), "--host", "127.0.0.1",
                                       "--port", str(self.root_port), f"--join-token={self.token}", *QUIET,
                                       *self.root_args, *extra))

    def pin(self) -> list[str]:
        """``--ca-fingerprint`` of the root's CA, once the root has made it (none without TLS)."""
        if self.scheme != "mqtts://":
            return []
        path = self.base / "root" / "ca" / "ca.pem"
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return ["--ca-fingerprint", fingerprint(load_certs(path.read_bytes())[0])] if path.exists() else []

    def cluster(self, name: str, *extra: str) -> Proc:
        """Start a cluster orchestrator called *name*."""
        port = self.cluster_ports.setdefault(name, free_port())
        return self._start(name, oak("cluster", "--name", name, "--data-dir", str(self.base / name),
                                     "--host", "127.0.0.1", "--port", str(port),
                                     "--root", f"{self.scheme}127.0.0.1:{self.root_port}",
                                     f"--root-join-token={self.token}", f"--join-token={self.token}", *self.pin(),
                                     *QUIET, *self.cluster_args, *extra))

    def worker(self, name: str, cluster: str, *extra: str, home: str = "") -> Proc:
        """Start a worker called *name* under *cluster*, in data dir *home* (its own: ``base/name``)."""
        self.worker_dirs[name] = self.base / (home or name)
        return self._start(name, oak("worker", "--name", name, "--data-dir", str(self.base / (home or name)),
                                     "--cluster", f"{self.scheme}127.0.0.1:{self.cluster_ports[cluster]}",
                                     f"--join-token={self.token}", *self.pin(), *QUIET, *extra))

    def profile(self) -> Profile:
        """The admin's profile, once the root has written it."""
        return Profile.load(self.base / "root")

    def logs(self) -> str:
        """Every process's recent log, for failure messages."""
        return "\n".join(f"--- {name} ---\n{proc.tail()}" for name, proc in self.procs.items())

    def stop(self) -> None:
        """Stop every process (workers first, so their instances stop with them), and remove the spare
        sandboxes a worker killed with -9 left (plugins/runtimes/spares.py)."""
        for proc in sorted(self.procs.values(), key=lambda p: p.name == "root"):
            proc.stop()
        for name, data_dir in self.worker_dirs.items():
            Spares(name, 0, data_dir).sweep()


async def eventually(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1,
                     what: str = "condition") -> Any:
    """Poll *check* (sync or async) until it returns something truthy; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if asyncio.iscoroutine(last):
                last = await last
            if last:
                return last
        except (AssertionError, KeyError, FileNotFoundError, IndexError) as exc:
            last = exc
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


