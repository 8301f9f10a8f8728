"""What a user's request carries and what its answer looks like: shared by the root's :class:`Api` and
the users' lane (services/root/lane.py), which may run in a process of its own and so imports only this."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any


class ApiError(Exception):
    """A request that cannot be served; *code* is machine-readable, the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def request_body(payload: bytes) -> Any:
    """A request's JSON body (an empty payload is ``{}``); ApiError ``bad_request`` when it is not JSON."""
    if not payload.strip():
        return {}
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise ApiError("bad_request", "the request is not JSON") from None
    except RecursionError:
        raise ApiError("bad_request", "the request is nested too deeply") from None


def stamped(answer: dict[str, Any], transaction: str | None) -> dict[str, Any]:
    """*answer* as it is sent: the root's clock first, where a reader finds it, and the request's
    transaction echoed when it had one."""
    if transaction is not None:
        answer["transaction"] = transaction
    return {"ts": round(time.time(), 3), **answer}


def listing(items: list[bytes], transaction: str | None) -> bytes:
    """The ``ok`` answer (as :func:`stamped`) whose data is the list of *items*, each already JSON: a list
    of a thousand services' states is joined, not encoded again."""
    head = json.dumps(stamped({"ok": True}, transaction), separators=(",", ":")).encode()
    return b"".join((head[:-1], b',"data":[', b",".join(items), b"]}"))


def one_less(waiting: Counter[str], user: str) -> None:
    """Count one of *user*'s waiting requests off *waiting*, which holds only users with some waiting."""
    waiting[user] -= 1
    if not waiting[user]:
        del waiting[user]


def transaction_of(body: Any) -> str | None:
    """The ``transaction`` a request carries, to be echoed in its answers (None without one)."""
    transaction = body.get("transaction") if isinstance(body, dict) else None
    return transaction if isinstance(transaction, str) else None
