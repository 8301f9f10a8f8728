"""Failed logins slow down their source and their user name, so a password flood costs the broker little.

Each failed password check counts against the connection's source address and against the user name it
tried. The first :data:`FREE_FAILURES` of a key cost nothing more; after that the key is refused for a
backoff that starts at :data:`FIRST_BACKOFF` seconds and doubles with every further failure up to
:data:`MAX_BACKOFF`. A refused attempt is answered at once, without hashing, and changes nothing. A
success clears both keys; a key quiet for :data:`FORGET_AFTER` seconds is forgotten.

A password that already logged its user in since the broker started is recognised without hashing
(:meth:`broker.credentials.Credentials.remembers`) and is never refused here: a flood aimed at a name
cannot lock out the clients that already use it. Certificates are not passwords and are never counted.

broker/mosquitto_login.c says the same rules in C for mosquitto; both are tested through real brokers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

FREE_FAILURES = 5
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 60.0
FORGET_AFTER = 600.0
MAX_TRACKED = 4096  # keys kept at most; the quietest goes first


@dataclass
class _Record:
    failures: int = 0
    until: float = 0.0
    last: float = 0.0


class LoginGuard:
    """Backoff for failed logins, per source address and per user name (see the module's rules)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._records: dict[str, _Record] = {}

    def refused_for(self, source: str, name: str) -> float:
        """Seconds until *source* or *name* may try a password again (0: now)."""
        now = self._clock()
        return max([0.0, *(record.until - now for record in self._find(source, name))])

    def failed(self, source: str, name: str) -> str:
        """Count a failed password check; return a line to log when it starts a backoff ("" otherwise), so
        a burst is logged once."""
        now = self._clock()
        note = ""
        for key in (f"address {source}", f"user {name}"):
            record = self._records.get(key) or self._track(key, now)
            record.failures += 1
            record.last = now
            over = record.failures - FREE_FAILURES
            if over >= 0:
                backoff = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** over)
                record.until = now + backoff
                if over == 0:
                    note = note or (f"{FREE_FAILURES} failed logins for {key}: refusing its logins for "
                                    f"{backoff:.0f} s, then longer with every failure")
        return note

    def succeeded(self, source: str, name: str) -> None:
        """Clear both keys: their owner is back."""
        self._records.pop(f"address {source}", None)
        self._records.pop(f"user {name}", None)

    def _find(self, source: str, name: str) -> list[_Record]:
        return [r for r in (self._records.get(f"address {source}"), self._records.get(f"user {name}")) if r]

    def _track(self, key: str, now: float) -> _Record:
        for old in [k for k, r in self._records.items() if now - r.last > FORGET_AFTER and r.until <= now]:
            del self._records[old]
        if len(self._records) >= MAX_TRACKED:
            del self._records[min(self._records, key=lambda k: self._records[k].last)]
        record = self._records[key] = _Record()
        return record
