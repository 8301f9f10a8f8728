"""Who is connecting: a username tells the kind of identity and its name."""

from __future__ import annotations

from dataclasses import dataclass

SERVICE, USER, CLUSTER, NODE, JOIN = "service", "user", "cluster", "node", "join"
PREFIXES = {"svc:": SERVICE, "cluster:": CLUSTER, "node:": NODE, "join:": JOIN}


@dataclass(frozen=True)
class Identity:
    """A broker identity: ``svc:root``, ``cluster:<name>``, ``node:<name>``, ``join:<nonce>`` or a user."""

    kind: str
    name: str

    @classmethod
    def of(cls, username: str) -> Identity:
        """Tell the identity behind *username*."""
        for prefix, kind in PREFIXES.items():
            if username.startswith(prefix):
                return cls(kind, username[len(prefix) :])
        return cls(USER, username)

    @property
    def username(self) -> str:
        """The username this identity connects with."""
        for prefix, kind in PREFIXES.items():
            if kind == self.kind:
                return prefix + self.name
        return self.name
