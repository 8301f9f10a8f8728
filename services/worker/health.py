"""Health checks: whether a running instance works (liveness) and may take traffic (readiness).

The SLA's ``health`` says how to check (:class:`~services.common.sla.HealthCheck`). :class:`Health` is
the pure verdict over the tries so far; :func:`probe` makes one try. An ``exec`` check runs inside the
instance through its runtime (:class:`~services.common.plugin_api.Executes`); ``tcp`` and ``http``
connect to the instance's IP from inside its network namespace (the socket is made in the namespace
by a thread that enters it alone), or to 127.0.0.1 on the worker without the overlay. A VM's
namespace passes every frame to the guest, so its checks connect from the worker's side of the overlay
instead, as a client on the worker would.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
from dataclasses import dataclass

from services.common.models import HEALTHY, STARTING, UNHEALTHY
from services.common.plugin_api import Executes, Handle, Runtime
from services.common.sla import HealthCheck
from services.worker.kernel import entered

log = logging.getLogger(__name__)
STATUS_LINE = re.compile(rb"HTTP/\d(?:\.\d)? (\d{3})")
MAX_ANSWER = 4096  # of an http check's answer, only the status line is read


@dataclass(frozen=True)
class Health:
    """The verdict on an instance after its latest try: its state, the failed tries in a row that count,
    and why the last try failed ("" when it passed)."""

    state: str = STARTING
    failed: int = 0
    reason: str = ""

    def after(self, check: HealthCheck, failure: str, running_for: float) -> Health:
        """The verdict once a try has ended with *failure* ("" when it passed), *running_for* seconds after
        the instance started: a pass makes it healthy; a failure counts unless the instance is still in
        its ``start_period`` and has never passed; ``failures`` in a row make it unhealthy."""
        if not failure:
            return Health(HEALTHY)
        if self.state == STARTING and running_for < check.start_period:
            return Health(STARTING, 0, failure)
        failed = self.failed + 1
        return Health(UNHEALTHY if failed >= check.failures else self.state, failed, failure)

    def describe(self, check: HealthCheck) -> str:
        """A status reason: why the checks fail, and how many more failures restart the instance."""
        if not self.reason:
            return ""
        if self.state == UNHEALTHY:
            return f"unhealthy: {self.reason} ({self.failed} failed checks in a row)"
        if not self.failed:
            return f"health check failed (in its start period, not counted): {self.reason}"
        return f"health check failed ({self.failed} of {check.failures}): {self.reason}"


@dataclass(frozen=True)
class Target:
    """Where a check reaches an instance: its runtime and handle (exec), and its address (tcp, http)."""

    runtime: Runtime
    handle: Handle
    ip: str = ""  # "" without the overlay: 127.0.0.1 in the worker's namespace
    netns: str = ""  # the namespace to connect from ("" = the worker's)


async def probe(check: HealthCheck, target: Target) -> str:
    """One try of *check*: "" when it passed, else why it failed."""
    try:
        async with asyncio.timeout(check.timeout):
            if check.type == "exec":
                return await _exec(check, target)
            return await _connect(check, target)
    except TimeoutError:
        return f"no answer within {check.timeout:g} s"
    except Exception as exc:  # a runtime's failure to run the check is the check's, never the worker's
        log.warning("a %s health check could not be made: %r", check.type, exc)
        return f"the check could not be made: {exc}"


async def _exec(check: HealthCheck, target: Target) -> str:
    if not isinstance(target.runtime, Executes):
        return f"the {target.runtime.name} runtime cannot run a command inside an instance"
    end = await target.runtime.exec(target.handle, check.cmd, check.timeout)
    if end.code == 0:
        return ""
    return f"{check.cmd[0]} {end.reason}"


def _socket(netns: str) -> socket.socket:
    """A TCP socket made in *netns* (it stays there once this thread is back)."""
    with entered(netns or None):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


async def _connect(check: HealthCheck, target: Target) -> str:
    loop = asyncio.get_running_loop()
    try:
        sock = await asyncio.to_thread(_socket, target.netns) if target.netns else _socket("")
    except OSError as exc:
        return f"cannot enter the instance's network namespace: {exc.strerror or exc}"
    address = (target.ip or "127.0.0.1", check.port)
    with sock:
        try:
            await loop.sock_connect(sock, address)
            if check.type == "tcp":
                return ""
            request = f"GET {check.path} HTTP/1.0\r\nHost: {address[0]}\r\nUser-Agent: oak-health\r\n\r\n"
            await loop.sock_sendall(sock, request.encode())
            answer = b""
            while b"\r\n" not in answer and len(answer) < MAX_ANSWER:
                chunk = await loop.sock_recv(sock, MAX_ANSWER)
                if not chunk:
                    break
                answer += chunk
        except OSError as exc:
            return f"{address[0]}:{check.port}: {os.strerror(exc.errno) if exc.errno else exc}"
    match = STATUS_LINE.match(answer)
    if match is None:
        return f"{address[0]}:{check.port} did not answer HTTP"
    code = int(match.group(1))
    return "" if 200 <= code < 400 else f"GET {check.path} answered {code}"
