"""Credentials that also keep every password in mosquitto's format, for a password file oak writes."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from broker.credentials import ITERATIONS, Credentials
from broker.identity import DISCOVER, NEWCOMER, OPEN_JOIN_PASSWORD, USER, Identity
from broker.mosquitto_files import password_line, render_acl
from services.common.store import Store

log = logging.getLogger(__name__)

TABLE = "mosquitto_passwords"
MACHINE_ITERATIONS = 101  # machine passwords are 192 random bits: stretching adds nothing


class MosquittoCredentials(Credentials):
    """:class:`Credentials` that also keep every password in mosquitto's format and report changes.

    Accounts made before the tier ran on mosquitto have no such line and cannot log in there: they are
    named in a warning (re-create the user, or let the cluster or worker join again).
    """

    def __init__(self, store: Store) -> None:
        super().__init__(store)
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

    def password_file(self, probe_line: str, kinds: frozenset[str] | None = None) -> str:
        """The password file: accounts, in-process services, newcomers and the reload probe; only the
        identities of *kinds* when given (the probe always: it is a service)."""
        newcomer = password_line(NEWCOMER, OPEN_JOIN_PASSWORD, MACHINE_ITERATIONS)
        discover = password_line(DISCOVER, OPEN_JOIN_PASSWORD, MACHINE_ITERATIONS)
        lines = {**self._lines, **self._service_lines, NEWCOMER: newcomer, DISCOVER: discover}
        kept = [line for name, line in lines.items() if kinds is None or Identity.of(name).kind in kinds]
        return "\n".join([*kept, probe_line]) + "\n"

    def acl_file(self) -> str:
        """The ACL file for every account and service."""
        return render_acl([*self._lines, *self._service_lines])
