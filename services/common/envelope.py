"""The versioned JSON envelope every internal message travels in.

``{"v": 1, "kind": "node.state", "ts": 1732520000.12, "src": "node/w1", "data": {...}}``

``v`` is the major schema version of ``kind``; adding optional keys does not bump it, and readers
ignore keys they do not know. A message with a higher major version than this code understands is
refused with :class:`EnvelopeError` rather than misread.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

VERSION = 1


class EnvelopeError(ValueError):
    """A payload is not a valid envelope."""


@dataclass(frozen=True)
class Envelope:
    """A decoded message."""

    kind: str
    data: dict[str, Any]
    src: str
    ts: float
    v: int = VERSION


def encode(kind: str, data: dict[str, Any], src: str) -> bytes:
    """Wrap *data* in an envelope and return it as JSON bytes."""
    return json.dumps(
        {"v": VERSION, "kind": kind, "ts": round(time.time(), 3), "src": src, "data": data},
        separators=(",", ":"),
    ).encode()


def encode_json(kind: str, data: str | bytes, src: str) -> bytes:
    """:func:`encode` for *data* already in JSON (text, or UTF-8 bytes the caller keeps too): the same bytes."""
    head = json.dumps({"v": VERSION, "kind": kind, "ts": round(time.time(), 3), "src": src}, separators=(",", ":"))
    body = data.encode() if isinstance(data, str) else data
    return b"".join((head[:-1].encode(), b',"data":', body, b"}"))


_SENT = re.compile(rb'"ts":\s*([0-9]+(?:\.[0-9]+)?)')
HEAD = 96  # the encoders write ``ts`` within the first bytes: v, kind, ts


def sent_at(payload: bytes) -> float | None:
    """When the sender says it sent the envelope *payload* (its ``ts``, on the sender's clock), read from the
    head without decoding the rest: a reader may want it for every message, the rest only once."""
    match = _SENT.search(payload, 0, HEAD)
    return float(match.group(1)) if match else None


def json_object(payload: bytes | str) -> dict[str, Any]:
    """A JSON object, or :class:`EnvelopeError` saying why *payload* is not one."""
    try:
        raw = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnvelopeError(f"not JSON: {exc}") from None
    except RecursionError:
        raise EnvelopeError("nested too deeply") from None
    if not isinstance(raw, dict):
        raise EnvelopeError("not a JSON object")
    return raw


def decode(payload: bytes | str, kind: str | None = None) -> Envelope:
    """Decode an envelope; check its *kind* when given. Raise :class:`EnvelopeError` on anything else."""
    raw = json_object(payload)
    v, got_kind, data = raw.get("v"), raw.get("kind"), raw.get("data")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise EnvelopeError("missing or bad 'v'")
    if v > VERSION:
        raise EnvelopeError(f"schema version {v} is newer than this Oakling understands ({VERSION})")
    if not isinstance(got_kind, str) or not isinstance(data, dict):
        raise EnvelopeError("missing 'kind' or 'data'")
    if kind is not None and got_kind != kind:
        raise EnvelopeError(f"expected a {kind!r} message, got {got_kind!r}")
    ts = raw.get("ts")
    return Envelope(
        kind=got_kind,
        data=data,
        src=str(raw.get("src", "")),
        ts=float(ts) if isinstance(ts, int | float) else 0.0,
        v=v,
    )


ONLINE = b'{"state":"online"}'
OFFLINE = b'{"state":"offline"}'


def is_online(payload: bytes) -> bool:
    """True when an ``avail`` payload says online (``1`` too: mosquitto's bridge reports itself so)."""
    if payload.strip() == b"1":
        return True
    try:
        return bool(json.loads(payload).get("state") == "online")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return False
