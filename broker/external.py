"""A broker someone else runs (``--broker mqtt://HOST:PORT``), whose accounts and topic rules oak keeps.

With ``--broker-files DIR`` oak writes mosquitto's ``DIR/passwd`` and ``DIR/acl`` from the tier's
identities (:mod:`broker.password_files`), at start and whenever one changes, and runs the operator's
``--broker-reload`` command (e.g. ``kill -HUP $(cat /run/mosquitto.pid)``) so the broker re-reads
them; a change counts once a login written for it is accepted. The operator's mosquitto.conf names
the two files (:func:`conf_lines`). The tier's own services log in with accounts of their own, made
at every start, like on a broker oak runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from types import TracebackType

from broker.mosquitto_credentials import MosquittoCredentials
from broker.mosquitto_files import render_acl
from broker.password_files import PasswordFiles
from services.common.mqtt import BrokerUrl
from services.common.private import write_private

log = logging.getLogger(__name__)

RELOAD_TIMEOUT = 30.0  # a change must be read by the broker within this (the operator's command ran)
WAIT_LOG_EVERY = 10.0


def conf_lines(directory: Path) -> list[str]:
    """What the operator's mosquitto.conf needs (before its listeners) to use oak's files."""
    return ["per_listener_settings false", "allow_anonymous false",
            f"password_file {directory.resolve() / 'passwd'}", f"acl_file {directory.resolve() / 'acl'}"]


def write_initial(directory: Path) -> None:
    """Files a broker can start with before any oak tier has run: no account, the join patterns.

    Existing files are left alone (they may hold the accounts of a tier that ran already)."""
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "passwd").exists():
        write_private(directory / "passwd", "")
    if not (directory / "acl").exists():
        write_private(directory / "acl", render_acl([]))


class ExternalFiles:
    """``async with ExternalFiles(credentials, url, directory, command)``: the files written and read."""

    def __init__(self, credentials: MosquittoCredentials, url: BrokerUrl, directory: Path, command: str) -> None:
        self.credentials = credentials
        self.command = command
        self.files = PasswordFiles(credentials, directory, url, self._run_reload)

    async def _run_reload(self) -> None:
        """The operator's reload command (none: the broker is expected to notice by itself)."""
        if not self.command:
            return
        proc = await asyncio.create_subprocess_shell(
            self.command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        if proc.returncode:
            log.warning("the broker reload command %r exited with %s: %s", self.command, proc.returncode,
                        out.decode(errors="replace").strip()[-300:])

    async def reload(self) -> None:
        """Rewrite the files, run the reload command, and wait until the broker accepts the change."""
        await self.files.reload(RELOAD_TIMEOUT)

    async def __aenter__(self) -> ExternalFiles:
        directory = self.files.directory
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, os.stat(directory).st_mode | 0o700)
        async with self.files.lock:
            self.files.write()
            await self._run_reload()
            # The broker may not run yet: wait for it as long as it takes, saying so now and then.
            since = time.monotonic()
            while True:
                try:
                    await self.files.wait_read(WAIT_LOG_EVERY, poll=0.1)
                    break
                except TimeoutError:
                    log.warning("the broker at %s has not accepted the accounts in %s for %.0f s: does its "
                                "mosquitto.conf name them (oak broker files %s) and did the reload command "
                                "%r make it read them?", self.files.url, directory, time.monotonic() - since,
                                directory, self.command)
                    await self._run_reload()
        log.info("broker at %s reads oak's accounts and rules from %s", self.files.url, directory)
        self.credentials.on_change = self.reload
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.credentials.on_change = None
