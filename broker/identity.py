"""Who is connecting: a username tells the kind of identity and its name.

Machine identities are ``<kind>.<name>`` (``svc.root``, ``cluster.c1``, ``node.w1``): a user name never
contains a dot, and mosquitto's password file cannot hold a username with a colon. The older
``<kind>:<name>`` spelling is still understood.
"""

from __future__ import annotations

from dataclasses import dataclass

SERVICE, USER, CLUSTER, NODE, JOIN = "service", "user", "cluster", "node", "join"
WORDS = {"svc": SERVICE, "cluster": CLUSTER, "node": NODE, "join": JOIN}
SEPARATORS = (".", ":")


@dataclass(frozen=True)
class Identity:
    """A broker identity: ``svc.root``, ``cluster.<name>``, ``node.<name>``, ``join.<nonce>`` or a user."""

    kind: str
    name: str

    @classmethod
    def of(cls, username: str) -> Identity:
        """Tell the identity behind *username*."""
        for word, kind in WORDS.items():
            if username[len(word) : len(word) + 1] in SEPARATORS and username.startswith(word):
                return cls(kind, username[len(word) + 1 :])
        return cls(USER, username)

    @property
    def username(self) -> str:
        """The username this identity connects with."""
        for word, kind in WORDS.items():
            if kind == self.kind:
                return f"{word}{SEPARATORS[0]}{self.name}"
        return self.name


# A newcomer connects as NEWCOMER with its nonce as client id (its password: the join token, or
# OPEN_JOIN_PASSWORD when joining is open): one fixed username, so a broker with a password file
# (mosquitto) can admit newcomers too; the topic rules take the nonce from the client id.
NEWCOMER = Identity(JOIN, "newcomer").username
OPEN_JOIN_PASSWORD = "-"
