"""mosquitto as a tier's broker: a child process fed with files oak writes from its own identities.

``<data-dir>/mosquitto/`` holds ``mosquitto.conf``, ``passwd`` (mosquitto's PBKDF2-SHA512 lines),
``acl`` (:mod:`broker.mosquitto_files`), mosquitto's persistence and ``mosquitto.log``. Whenever an
identity changes (a user is created, a worker joins) both files are rewritten and mosquitto is sent
SIGHUP; the change is acknowledged only once a login made for that reload is accepted, so a newcomer
given credentials can use them at once. mosquitto dies with its parent (``PR_SET_PDEATHSIG``), is
restarted if it exits on its own, and is stopped with the tier.
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
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType

from broker.credentials import ITERATIONS, Credentials, new_password
from broker.identity import NEWCOMER, OPEN_JOIN_PASSWORD, SERVICE, USER, Identity
from broker.mosquitto_files import Listener, NativeBridge, password_line, render_acl, render_conf
from broker.server import Listeners
from services.common.store import Store

log = logging.getLogger(__name__)

TABLE = "mosquitto_passwords"
MACHINE_ITERATIONS = 101  # machine passwords are 192 random bits: stretching adds nothing
PROBE = Identity(SERVICE, "reload-probe").username
START_TIMEOUT = 10.0


class MosquittoCredentials(Credentials):
    """:class:`Credentials` that also keep every password in mosquitto's format and report changes.

    Accounts made before the tier ran on mosquitto have no such line and cannot log in there: they are
    named in a warning (re-create the user, or let the cluster or worker join again).
    """

    def __init__(self, store: Store, join_token: str | None = None) -> None:
        super().__init__(store, join_token)
        self._db = store
        self._lines: dict[str, str] = {}
        self._service_lines: dict[str, str] = {}
        self.on_change: Callable[[], Awaitable[None]] | None = None

    async def load(self) -> None:
        """Read the accounts and their mosquitto lines."""
        await super().load()
        self._lines = {name: doc["line"] for name, doc in (await self._db.load(TABLE)).items()}
        missing = [name for name in self.usernames() if name not in self._lines]
        if missing:
            log.warning("these accounts predate mosquitto and cannot log in to it: %s", ", ".join(missing))

    async def set_password(self, username: str, password: str, *, admin: bool = False) -> None:
        """Create or replace an account; return once mosquitto accepts it."""
        await super().set_password(username, password, admin=admin)
        rounds = ITERATIONS if Identity.of(username).kind == USER else MACHINE_ITERATIONS
        self._lines[username] = password_line(username, password, rounds)
        await self._db.put(TABLE, username, {"line": self._lines[username]})
        await self._changed()

    async def remove(self, username: str) -> None:
        """Delete an account; return once mosquitto no longer accepts it."""
        await super().remove(username)
        self._lines.pop(username, None)
        await self._db.delete(TABLE, username)
        await self._changed()

    def service_password(self, username: str) -> str:
        """The in-memory password of an in-process service, also written to the password file."""
        password = super().service_password(username)
        if username not in self._service_lines:
            self._service_lines[username] = password_line(username, password, MACHINE_ITERATIONS)
        return password

    async def _changed(self) -> None:
        if self.on_change is not None:
            await self.on_change()

    def password_file(self, probe_line: str) -> str:
        """The password file: accounts, in-process services, newcomers and the reload probe."""
        newcomer = password_line(NEWCOMER, self.join_token or OPEN_JOIN_PASSWORD, MACHINE_ITERATIONS)
        lines = [*self._lines.values(), *self._service_lines.values(), newcomer, probe_line]
        return "\n".join(lines) + "\n"

    def acl_file(self) -> str:
        """The ACL file for every account and service."""
        return render_acl([*self._lines, *self._service_lines])


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host if host != "0.0.0.0" else "127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def accepts(host: str, port: int, username: str, password: str, timeout: float = 2.0) -> bool:
    """True when the broker at *host*:*port* accepts this MQTT 3.1.1 login (a bare CONNECT/CONNACK)."""

    def field(text: str) -> bytes:
        raw = text.encode()
        return len(raw).to_bytes(2, "big") + raw

    body = field("MQTT") + bytes([4, 0xC2, 0, 10]) + field(f"oak-probe-{os.getpid()}") + field(username)
    body += field(password)
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(_connect_packet(body))
                connack = await reader.readexactly(4)
                writer.write(b"\xe0\x00")  # DISCONNECT
                await writer.drain()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    return connack[0] == 0x20 and connack[3] == 0


def _connect_packet(body: bytes) -> bytes:
    """A CONNECT packet around *body* (its remaining length as MQTT's variable-length integer)."""
    size, length = len(body), bytearray()
    while True:
        byte, size = size % 128, size // 128
        length.append(byte | (0x80 if size else 0))
        if not size:
            return bytes([0x10]) + bytes(length) + body


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
        self.port = listeners.port or _free_port(listeners.host)
        self._process: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._wanted = self._done = 0
        self._probe_password = ""

    @property
    def local_host(self) -> str:
        """Where this machine's services reach the broker."""
        return "127.0.0.1" if self.listeners.host in ("0.0.0.0", "") else self.listeners.host

    def _write_files(self) -> None:
        self._probe_password = new_password()
        probe = password_line(PROBE, self._probe_password, MACHINE_ITERATIONS)
        for name, text in (("passwd", self.credentials.password_file(probe)), ("acl", self.credentials.acl_file())):
            tmp = self.directory / f"{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.replace(tmp, self.directory / name)

    def _config(self) -> str:
        lst = self.listeners
        listeners = [Listener(self.port, lst.host)]
        if lst.tls_port is not None:
            listeners.append(Listener(lst.tls_port, lst.host, lst.certfile, lst.keyfile))
        if lst.ws_port is not None:
            listeners.append(Listener(lst.ws_port, lst.host, websockets=True))
        return render_conf(self.directory, listeners, self.bridge, pwd.getpwuid(os.geteuid()).pw_name)

    async def _spawn(self) -> None:
        log_file = open(self.directory / "mosquitto.log", "ab")  # noqa: SIM115, ASYNC230 - handed to the child
        try:
            self._process = await asyncio.create_subprocess_exec(
                self.binary, "-c", str(self.directory / "mosquitto.conf"),
                stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file, preexec_fn=_die_with_parent,
                start_new_session=True,  # a Ctrl-C meant for oak must not stop mosquitto under it
            )
        finally:
            log_file.close()
        async with asyncio.timeout(START_TIMEOUT):
            while not await accepts(self.local_host, self.port, PROBE, self._probe_password):
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
            async with self._lock:
                self._write_files()
                await self._spawn()

    async def reload(self) -> None:
        """Rewrite the password and ACL files, have mosquitto read them, and wait until it has.

        Reloads asked for while one runs are served together by the next one.
        """
        self._wanted += 1
        generation = self._wanted
        async with self._lock:
            if self._done >= generation or self._process is None:
                return
            generation = self._wanted
            self._write_files()
            self._process.send_signal(signal.SIGHUP)
            async with asyncio.timeout(START_TIMEOUT):
                while not await accepts(self.local_host, self.port, PROBE, self._probe_password):
                    await asyncio.sleep(0.02)
            self._done = generation

    async def __aenter__(self) -> MosquittoBroker:
        if shutil.which(self.binary) is None:
            raise RuntimeError(f"{self.binary} is not installed (Debian: apt-get install mosquitto)")
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        (self.directory / "mosquitto.conf").write_text(self._config())
        os.chmod(self.directory / "mosquitto.conf", 0o600)  # it may hold the bridge's password
        self._write_files()
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
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
