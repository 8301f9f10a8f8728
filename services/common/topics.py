"""Names and topic matching: the rules every topic's parts follow. The topics themselves are declared
in the channel table (services/common/channels.py)."""

from __future__ import annotations

import re

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


def is_valid_id(value: object) -> bool:
    """True when *value* may name a cluster, node, user or instance: the one rule for names everywhere.

    Printable ASCII letters, digits, ``-`` and ``_``, at most 63, starting with a letter or digit: no
    control characters, MQTT wildcards or separators, nothing mosquitto's files could misread. The
    whole string must match (``$`` alone would let a trailing newline through).
    """
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


def matches(topic_filter: str, topic: str) -> bool:
    """True when *topic* matches the MQTT filter *topic_filter* (``+`` one level, ``#`` the rest)."""
    want, got = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(got) or (level != "+" and level != got[i]):
            return False
    return len(want) == len(got)
