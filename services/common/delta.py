"""Big retained documents sent as deltas: each change at once, the whole document once changes settle.

A *document* is a few named *sections*, each a map of keyed JSON objects: the root's desired map for a
cluster is ``{"instances": {iid: spec}}``, a cluster's state ``{"nodes": ..., "instances": ...,
"overlay": ...}``. Resending 10,000 specs or statuses for every change costs both sides more than the
change itself, so the owner of such a topic publishes:

* every change at once as a small **delta**, not retained, on ``<channel>/delta`` (the channel's ``delta``):
  ``{"epoch": e, "seq": n, "put": {section: {key: doc}}, "drop": {section: [key, ...]}}``;
* the **whole document**, retained, on the channel itself, with ``"epoch"`` and ``"seq"`` added beside
  the sections: first at once, then once changes have settled (``quiet`` seconds without one, up to half
  again at random) and at least every ``full_every`` seconds while they go on. Late subscribers (and
  ``mosquitto_sub``) read it.

``epoch`` is new for every sender (a restarted one starts another), ``seq`` counts its changes. A
receiver applies a delta only on top of the one before it (``seq + 1``, same epoch); a later one is held
until the missing one arrives, an older one is dropped. A gap that does not close is healed by the next
whole document, which replaces what the receiver has (a document older than what it has is ignored).

:class:`DeltaSender` and :class:`DeltaReceiver` are plain logic (no broker, no clock of their own);
:class:`DeltaPublisher` puts a sender on an MQTT session.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.common import envelope
from services.common.channels import Channel

Doc = dict[str, Any]
Sections = dict[str, dict[str, Doc]]
MAX_HELD = 256  # out-of-order deltas kept while waiting for a missing one; beyond, wait for the whole document


@dataclass(frozen=True)
class Change:
    """What a delta or a whole document changed: per section, the documents put and the keys dropped."""

    put: dict[str, dict[str, Doc]] = field(default_factory=dict)
    drop: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return any(self.put.values()) or any(self.drop.values())


@dataclass(frozen=True)
class Delta:
    """One change of a document, numbered ``seq`` in the sender's ``epoch``."""

    epoch: str
    seq: int
    change: Change

    def data(self) -> Doc:
        """The JSON form."""
        return {"epoch": self.epoch, "seq": self.seq, "put": {s: d for s, d in self.change.put.items() if d},
                "drop": {s: list(k) for s, k in self.change.drop.items() if k}}

    @classmethod
    def load(cls, data: Any) -> Delta:
        """Read the JSON form; raise ValueError when it is malformed."""
        if not isinstance(data, dict) or not isinstance(data.get("epoch"), str) or not isinstance(data.get("seq"), int):
            raise ValueError("delta: expected {'epoch': str, 'seq': int, 'put': {...}, 'drop': {...}}")
        put, drop = data.get("put", {}), data.get("drop", {})
        if not isinstance(put, dict) or not all(isinstance(d, dict) for d in put.values()):
            raise ValueError("delta: 'put' must map sections to objects")
        if not isinstance(drop, dict) or not all(isinstance(k, list) for k in drop.values()):
            raise ValueError("delta: 'drop' must map sections to lists of keys")
        return cls(data["epoch"], data["seq"], Change({s: dict(d) for s, d in put.items()},
                                                      {s: tuple(map(str, k)) for s, k in drop.items()}))


class DeltaSender:
    """Turns changes into numbered deltas: either changes the caller tracked itself (:meth:`change`, no
    look at the rest of the document), or successive whole documents (:meth:`diff`; unchanged entries are
    recognised by identity first, then by equality)."""

    def __init__(self, sections: tuple[str, ...], epoch: str | None = None) -> None:
        self.sections = sections
        self.epoch = epoch or secrets.token_hex(4)
        self.seq = 0
        self.last: Sections = {s: {} for s in sections}
        self._texts: dict[str, dict[str, tuple[Doc, str]]] = {s: {} for s in sections}

    def diff(self, doc: Mapping[str, Mapping[str, Doc]]) -> Delta | None:
        """The delta from the last document to *doc* (which becomes the last), or None if nothing changed."""
        put: dict[str, dict[str, Doc]] = {}
        drop: dict[str, tuple[str, ...]] = {}
        for section in self.sections:
            new, old = doc.get(section, {}), self.last[section]
            changed = {k: v for k, v in new.items() if (o := old.get(k)) is not v and o != v}
            gone = tuple(k for k in old if k not in new)
            if changed:
                put[section] = changed
            if gone:
                drop[section] = gone
            self.last[section] = dict(new)
        if not put and not drop:
            return None
        self.seq += 1
        return Delta(self.epoch, self.seq, Change(put, drop))

    def change(self, put: Mapping[str, Mapping[str, Doc]] | None = None,
               drop: Mapping[str, Iterable[str]] | None = None) -> Delta | None:
        """The delta that puts the documents *put* and drops the keys *drop* (per section), applied to the
        last document; None when it changes nothing."""
        puts: dict[str, dict[str, Doc]] = {}
        drops: dict[str, tuple[str, ...]] = {}
        for section, keys in (drop or {}).items():
            last = self.last[section]
            gone = tuple(k for k in keys if last.pop(k, None) is not None)
            if gone:
                drops[section] = gone
        for section, docs in (put or {}).items():
            last = self.last[section]
            changed = {k: v for k, v in docs.items() if (o := last.get(k)) is not v and o != v}
            if changed:
                last.update(changed)
                puts[section] = changed
        if not puts and not drops:
            return None
        self.seq += 1
        return Delta(self.epoch, self.seq, Change(puts, drops))

    def whole(self) -> Doc:
        """The last document, with its epoch and seq (the retained form)."""
        return {**self.last, "epoch": self.epoch, "seq": self.seq}

    def whole_json(self) -> str:
        """:meth:`whole` as JSON text, made of each entry's kept text (:meth:`text`): the whole document
        of thousands of entries is resent every few seconds in a burst, and encoding it again held the
        event loop for a tenth of a second."""
        parts = []
        for section in self.sections:
            parts.append(self._section_json(section, self.last[section]))
            kept = self._texts[section]
            if len(kept) > len(self.last[section]):  # let go of the texts of entries no longer there
                self._texts[section] = {k: kept[k] for k in self.last[section]}
        parts.append(f'"epoch":{json.dumps(self.epoch)},"seq":{self.seq}')
        return "{" + ",".join(parts) + "}"

    def delta_json(self, delta: Delta) -> str:
        """:meth:`Delta.data` of one of this sender's deltas as JSON text, its entries' texts kept for
        :meth:`whole_json` (so each entry is encoded once, when it changes)."""
        put = ",".join(self._section_json(section, docs) for section, docs in delta.change.put.items() if docs)
        drop = ",".join(f"{json.dumps(section)}:{json.dumps(list(keys))}"
                        for section, keys in delta.change.drop.items() if keys)
        return f'{{"epoch":{json.dumps(delta.epoch)},"seq":{delta.seq},"put":{{{put}}},"drop":{{{drop}}}}}'

    def _section_json(self, section: str, docs: Mapping[str, Doc]) -> str:
        entries = ",".join(f"{json.dumps(key)}:{self.text(section, key, doc)}" for key, doc in docs.items())
        return f"{json.dumps(section)}:{{{entries}}}"

    def text(self, section: str, key: str, doc: Doc) -> str:
        """The JSON text of entry *doc*, kept while *key* holds that same object."""
        made = self._texts[section].get(key)
        if made is None or made[0] is not doc:
            made = self._texts[section][key] = (doc, json.dumps(doc, separators=(",", ":")))
        return made[1]


class DeltaReceiver:
    """Keeps a copy of a sender's document from its whole documents and deltas (see the module's rules)."""

    def __init__(self, sections: tuple[str, ...]) -> None:
        self.sections = sections
        self.docs: Sections = {s: {} for s in sections}
        self.epoch: str | None = None
        self.seq = 0
        self._held: dict[tuple[str, int], Delta] = {}

    def whole(self, data: Mapping[str, Any]) -> Change:
        """Take a whole document (without ``epoch``/``seq``, from an older sender, it is taken as is);
        return what changed, or an empty change when it is older than what this receiver has."""
        epoch, seq = data.get("epoch"), data.get("seq")
        if not (isinstance(epoch, str) and isinstance(seq, int)):
            epoch, seq = None, 0
        elif epoch == self.epoch and seq <= self.seq:
            return Change()
        put: dict[str, dict[str, Doc]] = {}
        drop: dict[str, tuple[str, ...]] = {}
        for section in self.sections:
            new = data.get(section) or {}
            if not isinstance(new, dict):
                raise ValueError(f"{section}: expected an object")
            old = self.docs[section]
            put[section] = {k: v for k, v in new.items() if old.get(k) != v}
            drop[section] = tuple(k for k in old if k not in new)
            self.docs[section] = dict(new)
        self.epoch, self.seq = epoch, seq
        self._held = {k: d for k, d in self._held.items() if d.epoch == self.epoch and d.seq > self.seq}
        return self._merge(Change(put, drop), self._catch_up())

    def delta(self, data: Any) -> Change:
        """Take a delta; return what changed (empty when it is old, or held until a missing one comes)."""
        delta = Delta.load(data)
        if delta.epoch == self.epoch and delta.seq <= self.seq:
            return Change()
        if len(self._held) < MAX_HELD:  # another epoch's are kept for its whole document, which may come late
            self._held[(delta.epoch, delta.seq)] = delta
        return self._catch_up()

    @property
    def waiting(self) -> bool:
        """True while deltas are held for a missing one."""
        return bool(self._held)

    def _catch_up(self) -> Change:
        out = Change()
        while self.epoch is not None and (delta := self._held.pop((self.epoch, self.seq + 1), None)) is not None:
            self._apply(delta.change)
            self.seq = delta.seq
            out = self._merge(out, delta.change)
        return out

    def _apply(self, change: Change) -> None:
        for section, keys in change.drop.items():
            docs = self.docs.get(section)
            if docs is not None:
                for key in keys:
                    docs.pop(key, None)
        for section, docs in change.put.items():
            if section in self.docs:
                self.docs[section].update(docs)

    @staticmethod
    def _merge(a: Change, b: Change) -> Change:
        """*a* then *b* as one change."""
        if not b:
            return a
        if not a:
            return b
        put = {s: dict(d) for s, d in a.put.items()}
        drop = {s: set(k) for s, k in a.drop.items()}
        for section, keys in b.drop.items():
            for key in keys:
                put.get(section, {}).pop(key, None)
            drop.setdefault(section, set()).update(keys)
        for section, docs in b.put.items():
            put.setdefault(section, {}).update(docs)
            drop.get(section, set()).difference_update(docs)
        return Change(put, {s: tuple(k) for s, k in drop.items()})


class Publisher(Protocol):
    """What :class:`DeltaPublisher` needs of an MQTT session."""

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None: ...


class DeltaPublisher:
    """Publishes a document as deltas on ``<topic>/delta`` and, retained, whole on *topic* (see the module).

    :meth:`update` is called with the current whole document whenever it may have changed; the whole
    document follows by itself once changes settle (a timer on the running loop)."""

    def __init__(self, session: Publisher, channel: Channel[Any], src: str, names: Mapping[str, str] | None = None,
                 quiet: float = 1.0, full_every: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        if channel.delta is None:
            raise ValueError(f"{channel.pattern} has no delta channel")
        self.session = session
        self.topic, self.delta_topic = channel.topic(**(names or {})), channel.delta.topic(**(names or {}))
        self.kind, self.delta_kind = channel.kind, channel.delta.kind
        self.src = src
        self.sender = DeltaSender(channel.sections)
        self.quiet = quiet
        self.full_every = full_every
        self.clock = clock
        self._whole_seq: int | None = None  # seq of the last whole document published
        self._whole_at = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def update(self, doc: Mapping[str, Mapping[str, Doc]]) -> bool:
        """Publish what changed since the last call (the first call publishes the whole document);
        return True when something was published."""
        return self._send(self.sender.diff(doc))

    def change(self, put: Mapping[str, Mapping[str, Doc]] | None = None,
               drop: Mapping[str, Iterable[str]] | None = None) -> bool:
        """Publish changes the caller tracked itself (see :meth:`DeltaSender.change`); True when something
        was published."""
        return self._send(self.sender.change(put, drop))

    def encode(self, section: str, key: str, doc: Doc) -> None:
        """Encode an entry about to be put (:meth:`change`) ahead of it, so that a caller putting thousands
        can spread the cost between turns of the event loop."""
        self.sender.text(section, key, doc)

    def _send(self, delta: Delta | None) -> bool:
        if self._whole_seq is None:
            self.publish_whole()
            return True
        if delta is None:
            return False
        self.session.publish(self.delta_topic,
                             envelope.encode_json(self.delta_kind, self.sender.delta_json(delta), self.src))
        if self.clock() - self._whole_at >= self.full_every:
            self.publish_whole()
        else:
            self._arm()
        return True

    def publish_whole(self) -> None:
        """Publish the whole document now, retained."""
        self._cancel()
        self._whole_seq, self._whole_at = self.sender.seq, self.clock()
        self.session.publish(self.topic, envelope.encode_json(self.kind, self.sender.whole_json(), self.src),
                             retain=True)

    def publish_if_behind(self) -> None:
        """Publish the whole document now if a delta came after the retained one (for a subscriber that has
        just come back: the retained one it reads would otherwise lag until changes settle)."""
        if self._whole_seq is not None and self._whole_seq != self.sender.seq:
            self.publish_whole()

    def close(self) -> None:
        """Stop the timer (the whole document may be behind the last delta)."""
        self._cancel()

    def _arm(self) -> None:
        self._cancel()
        with_loop = _running_loop()
        if with_loop is None:
            self.publish_whole()  # no loop to wait on (plain calls, tests): be exact now
            return
        # Up to half as long again, at random: the documents of ten clusters that settle together would
        # otherwise all be sent in one turn of the event loop.
        self._timer = with_loop.call_later(self.quiet * (1 + random.random() / 2), self._settled)

    def _settled(self) -> None:
        self._timer = None
        if self._whole_seq != self.sender.seq:
            self.publish_whole()

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
