"""Who is connecting: a username tells the kind of identity and its name.

Machine identities are ``<kind>.<name>`` (``svc.root``, ``cluster.c1``, ``node.w1``): a user name never
contains a dot, and mosquitto's password file cannot hold a username with a colon. The older
``<kind>:<name>`` spelling is still understood.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.channels import CLUSTER, JOIN, NODE, SERVICE, USER  # the roles of the channel table

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
# Before it sends its token, a newcomer reads the parent's CA as DISCOVER (any password, nonce client id),
# which may read ``oak/join/ca`` and nothing else (broker.join).
DISCOVER = Identity(JOIN, "discover").username


# Client ids. A broker lets an identity connect only with a client id of its own (broker.acl.client_id_allowed),
# so nobody can displace another's session by borrowing its id:
# * in-process services: ``root``, ``cluster``, ``bridge`` (and anything else: they are trusted);
# * a cluster (at the root) or worker (at its cluster): its username, ``cluster.C`` or ``node.W`` (mosquitto's
#   certificate listener sets exactly that, use_username_as_clientid);
# * a newcomer: its nonce, 32 hex digits;
# * user ``U``: ``U`` or ``U-<anything>``; an empty client id is given ``U-<random>`` (the embedded broker)
#   or ``auto-<uuid>`` (mosquitto), and any user may hold an ``auto-`` id: they cannot be guessed.
# broker/mosquitto_login.c says the same rule in C, for mosquitto's password listener.
SERVICE_CLIENT_IDS = frozenset({"root", "cluster", "bridge"})
GENERATED_PREFIX = "auto-"
NONCE_HEX_DIGITS = 32


def client_id_owner(client_id: str) -> Identity | None:
    """The identity that alone may use *client_id*, or None for an id any user may claim under its name."""
    if client_id in SERVICE_CLIENT_IDS:
        return Identity(SERVICE, client_id)
    identity = Identity.of(client_id)
    if identity.kind in (CLUSTER, NODE) and client_id.startswith(identity.username):
        return identity
    if len(client_id) == NONCE_HEX_DIGITS and all(c in "0123456789abcdef" for c in client_id):
        return Identity(JOIN, "newcomer")
    return None
