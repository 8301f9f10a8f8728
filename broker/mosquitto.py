"""mosquitto as a tier's broker: a child process fed with files oak writes from its own identities.

``<data-dir>/mosquitto/`` holds ``mosquitto.conf``, ``passwd`` and ``acl`` (kept in step with the
identities by :mod:`broker.password_files`: rewritten and re-read on SIGHUP whenever one changes),
mosquitto's persistence and ``mosquitto.log``. mosquitto dies with its parent (``PR_SET_PDEATHSIG``),
is restarted if it exits on its own, and is stopped with the tier.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pwd
import shutil
import signal
import socket
from pathlib import Path
from types import TracebackType

from broker.mosquitto_credentials import MosquittoCredentials
from broker.mosquitto_files import KICK_FILE, Listener, NativeBridge, render_conf
from broker.mosquitto_plugin import build_plugin
from broker.password_files import LOOPBACK_PASSWORDS, PasswordFiles
from broker.server import Listeners
from services.common.mqtt import BrokerUrl
from services.common.private import private_opener, write_private

__all__ = ["MosquittoBroker", "MosquittoCredentials"]

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0
CERT_PORT_OFFSET = 2  # the TLS port + 1 is the plain loopback port's default


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host if host != "0.0.0.0" else "127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MosquittoBroker:
    """mosquitto run as this tier's broker: ``async with MosquittoBroker(...) as broker: broker.port``."""

    def __init__(
        self,
        listeners: Listeners,
        credentials: MosquittoCredentials,
        directory: Path,
        bridge: NativeBridge | None = None,
        binary: str = "mosquitto",
    ) -> None:
        self.listeners = listeners
        self.credentials = credentials
        self.directory = directory
        self.bridge = bridge
        self.binary = binary
        self.port = listeners.port or _free_port(listeners.plain_host or listeners.host)
        self.tls_port = None if listeners.tls_port is None else listeners.tls_port or _free_port(listeners.host)
        # Clusters and workers log in with their certificates on a listener of their own (mosquitto takes
        # usernames from certificates only where it requires them): the TLS port + 2, or any free one.
        self.cert_port: int | None = None
        if listeners.tls_port is not None and listeners.cafile:
            self.cert_port = listeners.tls_port + CERT_PORT_OFFSET if listeners.tls_port else _free_port(listeners.host)
        self.files = PasswordFiles(credentials, directory, BrokerUrl(self.local_host, self.port), self._hangup,
                                   listeners.plain_admits)
        self._process: asyncio.subprocess.Process | None = None
        self._plugin: Path | None = None
        self._watcher: asyncio.Task[None] | None = None

    @property
    def local_host(self) -> str:
        """Where this machine's services reach the broker."""
        host = self.listeners.plain_host or self.listeners.host
        return "127.0.0.1" if host in ("0.0.0.0", "") else host

    def _config(self) -> str:
        lst = self.listeners
        plain = LOOPBACK_PASSWORDS if lst.plain_admits is not None else "passwd"
        listeners = [Listener(self.port, lst.plain_host or lst.host, password_file=plain)]
        if lst.tls_port is not None:
            listeners.append(Listener(self.tls_port or 0, lst.host, lst.certfile, lst.keyfile, cafile=lst.cafile))
        if self.cert_port is not None:
            listeners.append(Listener(self.cert_port, lst.host, lst.certfile, lst.keyfile, cafile=lst.cafile,
                                      certificates=True, crlfile=lst.crlfile))
        if lst.ws_port is not None:
            listeners.append(Listener(lst.ws_port, lst.plain_host or lst.host, websockets=True, password_file=plain))
        return render_conf(self.directory, listeners, self.bridge, pwd.getpwuid(os.geteuid()).pw_name, self._plugin)

    async def _hangup(self) -> None:
        """Have mosquitto re-read its password and ACL files."""
        if self._process is not None and self._process.returncode is None:
            self._process.send_signal(signal.SIGHUP)

    async def _spawn(self) -> None:
        log_file = open(self.directory / "mosquitto.log", "ab", opener=private_opener)  # noqa: SIM115, ASYNC230
        try:
            self._process = await asyncio.create_subprocess_exec(
                self.binary, "-c", str(self.directory / "mosquitto.conf"),
                stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file, preexec_fn=_die_with_parent,
                start_new_session=True,  # a Ctrl-C meant for oak must not stop mosquitto under it
            )
        finally:
            log_file.close()
        async with asyncio.timeout(START_TIMEOUT):
            while not await self.files.probe():
                if self._process.returncode is not None:
                    raise RuntimeError(f"mosquitto exited with {self._process.returncode}: {self.log_tail()}")
                await asyncio.sleep(0.05)
        log.info("mosquitto (pid %d) listening on port %d", self._process.pid, self.port)

    def log_tail(self, lines: int = 5) -> str:
        """The end of mosquitto's log."""
        path = self.directory / "mosquitto.log"
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    async def _watch(self) -> None:
        """Restart mosquitto if it exits on its own."""
        while True:
            assert self._process is not None
            code = await self._process.wait()
            log.error("mosquitto exited with %s (%s); restarting it", code, self.log_tail(3))
            await asyncio.sleep(1.0)
            async with self.files.lock:
                self.files.write()
                await self._spawn()

    async def reload(self) -> None:
        """Rewrite the password and ACL files, have mosquitto read them, and wait until it has."""
        if self._process is not None:
            await self.files.reload(START_TIMEOUT)

    async def cut_off(self, username: str) -> int:
        """Disconnect *username* at once (oak's plugin kicks it at a reload) and read the revocation list
        again, which refuses its certificate from then on; -1 (mosquitto does not say how many)."""
        if self._plugin is None:
            log.warning("without oak's plugin mosquitto cannot disconnect %s: it is refused from its next "
                        "connection on", username)
        kick = self.directory / KICK_FILE
        write_private(kick, username + "\n")
        try:
            await self.reload()
        finally:
            write_private(kick, "")
        return -1

    async def restart(self) -> None:
        """Stop mosquitto and start it again (it reads its bridge's certificate only when it starts)."""
        async with self.files.lock:
            if self._watcher is not None:
                self._watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._watcher
            await self._stop_process()
            self.files.write()
            await self._spawn()
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _stop_process(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()

    async def __aenter__(self) -> MosquittoBroker:
        if shutil.which(self.binary) is None:
            raise RuntimeError(f"{self.binary} is not installed (Debian: apt-get install mosquitto)")
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self._plugin = await build_plugin(self.directory)
        (self.directory / "mosquitto.conf").write_text(self._config())
        os.chmod(self.directory / "mosquitto.conf", 0o600)  # it may hold the bridge's password
        self.files.write()
        await self._spawn()
        self.credentials.on_change = self.reload
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.credentials.on_change = None
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._stop_process()
