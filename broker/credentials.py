"""Per-identity credentials: salted PBKDF2 hashes kept in the service's TinyDB, never plain passwords."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass

from broker.identity import JOIN, SERVICE, USER, Identity
from services.common.store import Store

log = logging.getLogger(__name__)

TABLE = "identities"
REVOKED = "revoked"  # serial (hex) -> {"username", "expires"}: certificates no one may use any more
ITERATIONS = 100_000
# Clusters and workers only ever get passwords from new_password() (192 random bits): stretching adds
# nothing there, and 100,000 rounds per join would make 1,000 workers joining at once take minutes.
MACHINE_ITERATIONS = 1


# Password checks that may run at once, each in a thread: a flood of wrong passwords queues here instead
# of blocking the event loop (and everything else the broker's process serves).
CONCURRENT_CHECKS = 2
# An unknown user's password is stretched against this salt, so a wrong name costs what a wrong password costs.
_NOBODY_SALT = secrets.token_bytes(16)


def new_password() -> str:
    """A fresh random password for a machine identity."""
    return secrets.token_urlsafe(24)


def same_secret(known: str, given: str) -> bool:
    """Whether *given* is *known*, in constant time, for any text (hmac's own takes only ASCII str)."""
    return hmac.compare_digest(known.encode(errors="surrogatepass"), given.encode(errors="surrogatepass"))


def _digest(password: str) -> bytes:
    return hashlib.sha256(password.encode(errors="surrogatepass")).digest()


def _hash(password: str, salt: bytes, iterations: int) -> str:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations).hex()


@dataclass(frozen=True)
class Account:
    """A stored identity: its username, password hash, whether it administers the system, and the one
    certificate that logs it in, if it has one (its serial in hex, and when it ends)."""

    username: str
    salt: str
    hash: str
    iterations: int = ITERATIONS
    admin: bool = False
    cert_serial: str = ""
    cert_expires: float = 0.0


class Credentials:
    """The accounts a broker accepts, backed by a :class:`Store`.

    Also admits, without storing anything, the in-process services (``svc:*``, with a password made
    at start-up) and newcomers (``join.*``, who may only ask to join: the desk checks their token).
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._accounts: dict[str, Account] = {}
        self._services: dict[str, str] = {}
        self._verified: dict[str, bytes] = {}
        self._checks: asyncio.Semaphore | None = None
        self.machines_by_certificate = False  # set where the tier runs a CA: then no password logs them in

    async def load(self) -> None:
        """Read the accounts from the store."""
        self._accounts = {k: Account(**v) for k, v in (await self._store.load(TABLE)).items()}

    def service_password(self, username: str) -> str:
        """Return (creating it once) the in-memory password of an in-process service identity."""
        return self._services.setdefault(username, new_password())

    def exists(self, username: str) -> bool:
        """True when an account *username* is stored."""
        return username in self._accounts

    def is_admin(self, username: str) -> bool:
        """True when *username* is an administrator."""
        account = self._accounts.get(username)
        return bool(account and account.admin)

    def usernames(self) -> list[str]:
        """Every stored username."""
        return sorted(self._accounts)

    def users(self) -> list[str]:
        """The people and scripts among the accounts (not clusters or workers)."""
        return [name for name in sorted(self._accounts) if Identity.of(name).kind == USER]

    async def set_password(self, username: str, password: str, *, admin: bool = False) -> None:
        """Create or replace the account *username*."""
        salt = secrets.token_bytes(16)
        rounds = ITERATIONS if Identity.of(username).kind == USER else MACHINE_ITERATIONS
        account = Account(username, salt.hex(), _hash(password, salt, rounds), rounds, admin)
        await self._store.put(TABLE, username, account.__dict__)
        self._accounts[username] = account
        self._verified.pop(username, None)

    async def certify(self, username: str, serial: int, expires: float) -> None:
        """Make the certificate *serial* (ending at *expires*) the one that logs *username* in."""
        account = self._accounts[username]
        account = dataclasses.replace(account, cert_serial=f"{serial:X}", cert_expires=expires)
        await self._store.put(TABLE, username, account.__dict__)
        self._accounts[username] = account

    def certificate(self, username: str) -> tuple[str, float] | None:
        """(serial in hex, end) of the certificate that logs *username* in, if any."""
        account = self._accounts.get(username)
        return (account.cert_serial, account.cert_expires) if account and account.cert_serial else None

    async def revoke(self, username: str) -> bool:
        """Delete the account *username* and keep its certificate's serial as revoked; False if unknown."""
        account = self._accounts.get(username)
        if account is None:
            return False
        if account.cert_serial:
            await self._store.put(REVOKED, account.cert_serial, {"username": username, "expires": account.cert_expires})
        await self.remove(username)
        return True

    async def revoked(self) -> list[int]:
        """The serials of revoked certificates that have not ended yet (for a revocation list)."""
        now = time.time()
        return [int(serial, 16) for serial, doc in (await self._store.load(REVOKED)).items() if doc["expires"] > now]

    async def remove(self, username: str) -> None:
        """Delete the account *username*."""
        await self._store.delete(TABLE, username)
        self._accounts.pop(username, None)
        self._verified.pop(username, None)

    async def check(self, username: str | None, password: str | bytes | None) -> Identity | None:
        """:meth:`verify` off the event loop, at most :data:`CONCURRENT_CHECKS` at a time."""
        if self._checks is None:
            self._checks = asyncio.Semaphore(CONCURRENT_CHECKS)
        async with self._checks:
            return await asyncio.to_thread(self.verify, username, password)

    def verify(self, username: str | None, password: str | bytes | None) -> Identity | None:
        """Return the identity when *password* is right for *username*, else None (slow: see :meth:`check`)."""
        if not username or password is None:
            return None
        if isinstance(password, bytes):
            password = password.decode(errors="replace")
        identity = Identity.of(username)
        if identity.kind == SERVICE:
            expected = self._services.get(username)
            return identity if expected and same_secret(expected, password) else None
        if identity.kind == JOIN:  # a newcomer: the join desk checks its token (broker.join)
            return identity
        account = self._accounts.get(username)
        if account is None:
            if identity.kind == USER:
                _hash(password, _NOBODY_SALT, ITERATIONS)  # as slow as a wrong password for a real user
            return None
        if self.remembers(username, password):  # PBKDF2 once per password, not per reconnect
            return identity
        if hmac.compare_digest(_hash(password, bytes.fromhex(account.salt), account.iterations), account.hash):
            self._verified[username] = _digest(password)
            return identity
        return None

    def remembers(self, username: str | None, password: str | bytes | None) -> bool:
        """True when *password* is known right for *username* without hashing: it logged that user in
        since start, or it is an in-process service's."""
        if not username or password is None:
            return False
        if isinstance(password, bytes):
            password = password.decode(errors="replace")
        if username in self._services:
            return same_secret(self._services[username], password)
        return username in self._verified and hmac.compare_digest(self._verified[username], _digest(password))
