"""Join tokens: made by ``oak token create``, kept hashed, limited in time and in uses.

A token reads ``oak1.<id>.<secret>``: the id finds its record, and the SHA-256 of the secret is compared
in constant time (secrets are 192 random bits, so no stretching is needed). Tokens for clusters are
checked by the root; tokens for workers are made at the root too and sent, hashed, to every cluster
(``down/tokens``), which tells the root when one was used (``up/tokens/used``).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any

from broker.credentials import same_secret
from services.common.store import Store

TABLE = "join_tokens"
PREFIX = "oak1"
MAX_TTL = 365 * 24 * 3600.0


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode(errors="surrogatepass")).hexdigest()


@dataclass(frozen=True)
class TokenRecord:
    """A token as stored: what may join with it, until when, how often more (None: no limit)."""

    kind: str
    digest: str
    expires: float
    uses: int | None = None

    @classmethod
    def parse(cls, raw: Any) -> TokenRecord:
        """A record from the store or from the root; ValueError for anything else."""
        if not isinstance(raw, dict):
            raise ValueError("a token record is an object")
        kind, digest, expires, uses = raw.get("kind"), raw.get("digest"), raw.get("expires"), raw.get("uses")
        if kind not in ("cluster", "node") or not isinstance(digest, str) or len(digest) != 64:
            raise ValueError("a token record needs kind cluster|node and a sha256 digest")
        if isinstance(expires, bool) or not isinstance(expires, int | float):
            raise ValueError("a token record's expires is a time")
        if uses is not None and (isinstance(uses, bool) or not isinstance(uses, int) or uses < 0):
            raise ValueError("a token record's uses is a count")
        return cls(kind, digest, float(expires), uses)


@dataclass
class JoinPolicy:
    """Who may join: with a token of *tokens*, with the static ``--join-token``, or anyone (``--open-join``)."""

    tokens: JoinTokens
    static: str | None = None
    open: bool = False

    def by_token(self, token: object, kind: str) -> bool:
        """True when *token* lets a *kind* join (open joining aside)."""
        if self.static is not None and isinstance(token, str) and same_secret(self.static, token):
            return True
        return not self.tokens.refusal(token, kind)

    def refusal(self, token: object, kind: str) -> str:
        """Why a *kind* with *token* may not join ("" when it may)."""
        if self.open or self.by_token(token, kind):
            return ""
        why = self.tokens.refusal(token, kind)
        if token is None:
            return "joining needs a token: make one with `oak token create` (or start the parent with --open-join)"
        return why


class JoinTokens:
    """The tokens a tier accepts, kept in its store (the root's own, or those the root sent a cluster)."""

    def __init__(self, store: Store | None = None) -> None:
        self._store = store
        self._records: dict[str, TokenRecord] = {}

    async def load(self) -> None:
        """Read the tokens from the store."""
        if self._store is not None:
            self._records = {k: TokenRecord.parse(v) for k, v in (await self._store.load(TABLE)).items()}

    async def create(self, kind: str, ttl: float, uses: int | None) -> tuple[str, TokenRecord]:
        """A new token for a *kind* (``cluster``/``node``), valid *ttl* seconds and *uses* times."""
        if kind not in ("cluster", "node"):
            raise ValueError("a token is for a cluster or a node")
        if not 0 < ttl <= MAX_TTL:
            raise ValueError(f"ttl must be between 1 s and {MAX_TTL / 86400:.0f} days")
        if uses is not None and uses < 1:
            raise ValueError("uses must be at least 1")
        token_id, secret = secrets.token_hex(4), secrets.token_urlsafe(24)
        record = TokenRecord(kind, _digest(secret), time.time() + ttl, uses)
        await self._put(token_id, record)
        return f"{PREFIX}.{token_id}.{secret}", record

    def refusal(self, token: object, kind: str) -> str:
        """Why *token* cannot let a *kind* join now ("" when it can), without using it up."""
        found = self._find(token)
        if isinstance(found, str):
            return found
        _, record = found
        if record.kind != kind:
            return f"that token is for a {record.kind}, not a {kind}"
        if record.expires <= time.time():
            return "that token has expired: make a new one with `oak token create`"
        if record.uses == 0:
            return "that token has been used up: make a new one with `oak token create`"
        return ""

    async def use(self, token: object) -> str | None:
        """Count one use of a token :meth:`refusal` accepted; its id (None if it is not one of these)."""
        found = self._find(token)
        if isinstance(found, str):
            return None
        token_id, record = found
        if record.uses is not None:
            await self._put(token_id, TokenRecord(record.kind, record.digest, record.expires, record.uses - 1))
        return token_id

    async def used(self, token_id: str) -> bool:
        """Count one use of the token *token_id* (a cluster reported it); False if unknown or unlimited."""
        record = self._records.get(token_id)
        if record is None or record.uses is None:
            return False
        await self._put(token_id, TokenRecord(record.kind, record.digest, record.expires, max(record.uses - 1, 0)))
        return True

    def of_kind(self, kind: str) -> dict[str, dict[str, Any]]:
        """The live records of *kind*, hashed, as the root sends them to clusters."""
        now = time.time()
        return {k: asdict(r) for k, r in self._records.items() if r.kind == kind and r.expires > now}

    async def replace(self, records: dict[str, Any]) -> None:
        """Take *records* (from the root) as the whole set; a bad one is skipped (ValueError names it)."""
        parsed, bad = {}, []
        for token_id, raw in records.items():
            try:
                parsed[str(token_id)] = TokenRecord.parse(raw)
            except ValueError as exc:
                bad.append(f"{token_id}: {exc}")
        self._records = parsed
        if bad:
            raise ValueError("; ".join(bad))

    def _find(self, token: object) -> tuple[str, TokenRecord] | str:
        if not isinstance(token, str) or token.count(".") != 2 or not token.startswith(PREFIX + "."):
            return "no valid join token (expected oak1.<id>.<secret>, from `oak token create`)"
        _, token_id, secret = token.split(".")
        record = self._records.get(token_id)
        if record is None or not same_secret(record.digest, _digest(secret)):
            return "unknown join token"
        return token_id, record

    async def _put(self, token_id: str, record: TokenRecord) -> None:
        self._records[token_id] = record
        if self._store is not None:
            await self._store.put(TABLE, token_id, asdict(record))
