"""Shared test helpers: free ports, real service processes, and an API client."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.cli.client import OakClient
from services.common.mqtt import BrokerUrl
from tests.stack import Stack, eventually

__all__ = ["Stack", "eventually"]


def need_binary(name: str) -> None:
    """Skip the test, saying why, when *name* is not installed."""
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed (make test installs it when run as root)")


DEBUG_LINES = ("Client ", "Subscribed (")  # what mosquitto_sub -d prints besides the messages


def subscribed(command: list[str], out: Path | None = None, timeout: float = 15.0) -> subprocess.Popen[str]:
    """mosquitto_sub *command*, started with ``-d`` and returned once the broker acknowledged its
    subscription (no sleep and hope). Its output goes to a pipe, read with :func:`messages`, or to the file
    *out* (a burst's answers would fill a pipe and stop it reading), read with :func:`message_lines`."""
    need_binary("stdbuf")  # mosquitto_sub's output line by line, not when it ends
    argv = ["stdbuf", "-oL", *command, "-d"]
    if out is None:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        watchdog = threading.Timer(timeout, proc.kill)  # a client that never subscribes ends the loop below
        watchdog.start()
        try:
            for line in proc.stdout:
                if "received SUBACK" in line:
                    return proc
        finally:
            watchdog.cancel()
        proc.wait()
    else:
        with out.open("w") as sink:
            proc = subprocess.Popen(argv, stdout=sink, text=True)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if "received SUBACK" in out.read_text():
                return proc
            time.sleep(0.02)
        proc.kill()
        proc.wait()
    raise AssertionError(f"{command[0]} ended, or took over {timeout} s, before it subscribed")


def message_lines(text: str) -> list[str]:
    """The messages in what mosquitto_sub -d printed (see :func:`subscribed`), without its debug lines and
    without a last line it is still writing."""
    whole = text[:text.rfind("\n") + 1]
    return [line for line in whole.splitlines() if line and not line.startswith(DEBUG_LINES)]


def answers_by_transaction(text: str) -> dict[str, list[dict[str, Any]]]:
    """The API answers in what mosquitto_sub -d printed (whole lines), by their transaction."""
    by_transaction: dict[str, list[dict[str, Any]]] = {}
    for line in message_lines(text):
        answer = json.loads(line)
        by_transaction.setdefault(str(answer.get("transaction", "")), []).append(answer)
    return by_transaction


def messages(proc: subprocess.Popen[str], timeout: float) -> list[str]:
    """The message lines *proc* (from :func:`subscribed`, to a pipe) printed until it ended."""
    out, _ = proc.communicate(timeout=timeout)
    return message_lines(out)


def either_broker(kind: str, tmp_path: Path) -> Iterator[Stack]:
    """A stack whose root and clusters run on *kind* (``embedded`` or ``mosquitto``), stopped at the end;
    skips, saying why, when mosquitto or its clients are missing."""
    for binary in ("mosquitto_sub", "mosquitto_pub", *(("mosquitto",) if kind == "mosquitto" else ())):
        need_binary(binary)
    args = ("--broker", "mosquitto") if kind == "mosquitto" else ()
    s = Stack(tmp_path, root_args=args, cluster_args=args)
    try:
        yield s
    finally:
        s.stop()


def machine_login(stack: Stack, machine: str, port: int) -> list[str]:
    """mosquitto client flags that log in as *machine* with its own certificate (its own client id), at
    *port* or, on mosquitto, the certificate port its parent gave it."""
    saved = json.loads((stack.base / machine / "identity.json").read_text())
    tls = stack.base / machine / "tls"
    return ["-V", "mqttv311", "-h", "127.0.0.1", "-p", str(saved.get("port", port)), "--cafile", str(tls / "ca.pem"),
            "--cert", str(tls / "cert.pem"), "--key", str(tls / "key.pem"), "-i", saved["username"]]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test's report carries the end of each of its stacks' process logs: a failure on a CI machine
    is then explained by what the root, clusters and workers said, not only by the assertion."""
    report: pytest.TestReport = yield
    if report.failed:
        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, Stack) and value.procs:
                report.sections.append((f"the logs of stack '{name}' ({report.when})", value.logs()))
    return report


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack of processes, stopped at the end of the test."""
    s = Stack(tmp_path)
    try:
        yield s
    finally:
        s.stop()


async def connect(stack: Stack, timeout: float = 20.0) -> OakClient:
    """An API client for the admin, once the root is up."""
    try:
        await eventually(lambda: (stack.base / "root" / "credentials.json").exists(), timeout, what="root credentials")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.logs()}") from None
    profile = stack.profile()
    client = OakClient(profile)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await client.__aenter__()
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
            client = OakClient(profile)


async def online_nodes(client: OakClient, count: int) -> bool:
    """True when exactly *count* workers are online."""
    nodes = await client.request("nodes", "list")
    return sum(1 for n in nodes if n["online"]) == count


async def fleet(stack: Stack, api: Callable[[], Any], workers: dict[str, tuple[str, ...]]) -> OakClient:
    """Start the root, the clusters of *workers* and their workers; the admin's client once all are online."""
    stack.root()
    for cluster in workers:
        stack.cluster(cluster)
    for cluster, names in workers.items():
        for name in names:
            stack.worker(name, cluster)
    admin: OakClient = await api()
    total = sum(len(names) for names in workers.values())
    await eventually(lambda: online_nodes(admin, total), timeout=30, what=f"{total} workers online")
    return admin


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[Callable[[], Any]]:
    """Yields a coroutine factory ``await api()`` connecting the admin client (closed at the end)."""
    clients: list[OakClient] = []

    async def make() -> OakClient:
        client = await connect(stack)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.__aexit__(None, None, None)


def sla(*services: dict[str, Any], app: str = "demo", ns: str = "test") -> dict[str, Any]:
    """An SLA v2.0 document with *services* (dicts of microservice fields over sane defaults)."""
    micro = []
    for svc in services:
        micro.append({"microserviceID": "", "microservice_namespace": ns, "virtualization": "process", "code": "",
                      "memory": 10, "vcpus": 0.1, "one_shot": False, **svc})
    return {"sla_version": "v2.0", "customerID": "Admin",
            "applications": [{"applicationID": "", "application_name": app, "application_namespace": ns,
                              "application_desc": "test app", "microservices": micro}]}


def sleeper(name: str, seconds: int = 600, **extra: Any) -> dict[str, Any]:
    """A process service that sleeps."""
    return {"microservice_name": name, "cmd": ["sleep", str(seconds)], **extra}


def broker_url(port: int) -> BrokerUrl:
    """The loopback broker on *port*."""
    return BrokerUrl("127.0.0.1", port)


def untimed(answer: Any) -> Any:
    """An API answer without its ``ts`` (when the root answered, by its clock), which must be about now."""
    assert isinstance(answer, dict), answer
    assert abs(float(answer.pop("ts")) - time.time()) < 120, "ts is the root's clock, now"
    return answer


def dumps(doc: Any) -> bytes:
    """JSON bytes."""
    return json.dumps(doc).encode()


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI archive with busybox, built once per test session (skips, saying why, when it cannot be)."""
    from tests.images import build_busybox, missing

    reason = missing()
    if reason:
        pytest.skip(reason)
    return build_busybox(tmp_path_factory.mktemp("image"))
