"""mosquitto's ``passwd`` and ``acl`` files kept in step with a tier's identities, each change confirmed.

Whenever an identity changes (a user is created, a cluster or worker joins) both files are rewritten
and the broker is told to re-read them (*signal*: SIGHUP to the child oak runs, or the operator's
reload command). A change is acknowledged only once a login written for that reload alone (the
*probe*) is accepted, so a newcomer given credentials can use them at once. Used by
:mod:`broker.mosquitto` (mosquitto run by oak) and :mod:`broker.external` (a broker someone else runs).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from broker.credentials import new_password
from broker.identity import SERVICE, Identity
from broker.mosquitto_credentials import MACHINE_ITERATIONS, MosquittoCredentials
from broker.mosquitto_files import password_line
from broker.probe import accepts
from services.common.mqtt import BrokerUrl
from services.common.private import write_private

PROBE = Identity(SERVICE, "reload-probe").username
LOOPBACK_PASSWORDS = "passwd-loopback"  # the logins of a tier's plain loopback listener


class PasswordFiles:
    """``passwd`` and ``acl`` in *directory* for *credentials*, re-read by the broker at *url* on *signal*."""

    def __init__(self, credentials: MosquittoCredentials, directory: Path, url: BrokerUrl,
                 signal: Callable[[], Awaitable[None]], loopback_kinds: frozenset[str] | None = None) -> None:
        self.credentials = credentials
        self.loopback_kinds = loopback_kinds  # when given, LOOPBACK_PASSWORDS holds only these kinds
        self.directory = directory
        self.url = url
        self.signal = signal
        self.lock = asyncio.Lock()  # one writer of the files at a time (reloads, a restart of the broker)
        self._wanted = self._done = 0
        self._probe_password = ""

    def write(self) -> None:
        """Rewrite both files, with a fresh probe login."""
        self._probe_password = new_password()
        probe = password_line(PROBE, self._probe_password, MACHINE_ITERATIONS)
        write_private(self.directory / "passwd", self.credentials.password_file(probe))
        if self.loopback_kinds is not None:
            loopback = self.credentials.password_file(probe, self.loopback_kinds)
            write_private(self.directory / LOOPBACK_PASSWORDS, loopback)
        write_private(self.directory / "acl", self.credentials.acl_file())

    async def probe(self) -> bool:
        """True when the broker accepts the probe login of the last write (it has read the files)."""
        return await accepts(self.url.host, self.url.port, PROBE, self._probe_password, tls=self.url.tls)

    async def wait_read(self, timeout: float | None, poll: float = 0.02) -> None:
        """Return once the broker has read the last write (TimeoutError after *timeout* seconds)."""
        async with asyncio.timeout(timeout):
            while not await self.probe():
                await asyncio.sleep(poll)

    async def reload(self, timeout: float | None = 10.0) -> None:
        """Rewrite the files, signal the broker and wait until it has read them.

        Reloads asked for while one runs are served together by the next one.
        """
        self._wanted += 1
        generation = self._wanted
        async with self.lock:
            if self._done >= generation:
                return
            generation = self._wanted
            self.write()
            await self.signal()
            await self.wait_read(timeout)
            self._done = generation
