"""mosquitto's configuration, password file and ACL file for an Oakling tier. Pure functions.

The ACL file says what :mod:`broker.acl` says, one ``user`` block per identity (a service may do
everything; a user, cluster or node its own subtrees), and lets a newcomer use only the join topics
named after its client id (its nonce). mosquitto applies ``pattern`` lines to every user, so every
other identity is denied ``oak/join/#`` explicitly (denials come first in mosquitto).

One difference remains: mosquitto accepts a subscription outside the rules (SUBACK 0) and then
delivers nothing on it, where the embedded broker refuses it (SUBACK 0x80).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path

from broker import acl
from broker.identity import CLUSTER, JOIN, NODE, SERVICE, USER, Identity
from services.common import channels, topics
from services.common.mqtt import BrokerUrl

SALT_BYTES = 12  # mosquitto refuses any other salt length
KICK_FILE = "kick"  # usernames oak's plugin disconnects at the next reload (broker/mosquitto_login.c)
JOIN_FILTERS = f"{channels.BASE}/join/#"


def password_line(username: str, password: str, iterations: int) -> str:
    """One line of a mosquitto password file: ``user:$7$iterations$salt$hash`` (PBKDF2-SHA512)."""
    if ":" in username:
        raise ValueError(f"mosquitto cannot hold a username with ':' ({username!r})")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"{username}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def acl_block(username: str) -> list[str]:
    """The ACL lines of one identity (empty for one that cannot be expressed)."""
    identity = Identity.of(username)
    if ":" in username or any(c.isspace() for c in username):
        return []
    if identity.kind == SERVICE:
        return [f"user {username}", "topic readwrite #"]
    if identity.kind not in (USER, CLUSTER, NODE) or not topics.is_valid_id(identity.name):
        return []
    rules = acl.rules(identity)
    return [
        f"user {username}",
        f"topic deny {JOIN_FILTERS}",
        *(f"topic write {topic_filter}" for topic_filter in rules.publish),
        *(f"topic read {prefix}/#" for prefix in rules.subtrees),
        *(f"topic read {topic}" for topic in rules.exact),
    ]


def render_acl(usernames: list[str]) -> str:
    """The whole ACL file for *usernames*."""
    lines = [
        "# Written by oak from broker/acl.py's rules; rewritten whenever an identity changes.",
        f"pattern write {channels.JOIN_REQUEST.topic(join='%c')}",
        f"pattern read {channels.JOIN_RESPONSE.topic(join='%c')}",
        f"pattern read {channels.JOIN_CA.topic()}",
    ]
    for username in usernames:
        if Identity.of(username).kind != JOIN:
            lines += ["", *acl_block(username)]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Listener:
    """One mosquitto listener, with its own logins (``per_listener_settings``).

    A password listener checks *password_file* (and oak's client-id plugin, when built); a certificate
    listener (*certificates*: TLS with a client certificate of *cafile* required) takes the certificate's
    common name as username and client id, so no one can use another's id there either.
    """

    port: int
    host: str = "127.0.0.1"
    certfile: str | None = None
    keyfile: str | None = None
    websockets: bool = False
    cafile: str | None = None
    certificates: bool = False
    password_file: str = "passwd"
    crlfile: str | None = None

    def lines(self, directory: Path, plugin: Path | None) -> list[str]:
        """Its lines in mosquitto.conf."""
        out = [f"listener {self.port} {self.host}", "allow_anonymous false", f"acl_file {directory / 'acl'}"]
        if self.certificates:
            out += ["require_certificate true", "use_identity_as_username true", "use_username_as_clientid true"]
            if self.crlfile:
                out.append(f"crlfile {self.crlfile}")
        else:
            out.append(f"password_file {directory / self.password_file}")
            if plugin is not None:  # clients that send no id are named auto-<uuid> (mosquitto's default prefix)
                out += [f"plugin {plugin}", f"plugin_opt_kick_file {directory / KICK_FILE}",
                        f"plugin_opt_password_file {directory / self.password_file}"]
        if self.certfile and self.keyfile:
            out += [f"certfile {self.certfile}", f"keyfile {self.keyfile}"]
        if self.cafile:
            out.append(f"cafile {self.cafile}")
        if self.websockets:
            out.append("protocol websockets")
        return out


@dataclass(frozen=True)
class NativeBridge:
    """mosquitto's own bridge from a cluster's broker to the root's, in place of :mod:`broker.bridge`.

    It forwards ``oak/clusters/<cid>/down/#`` in as ``oak/downstream/#`` and ``oak/upstream/#`` out as
    ``oak/clusters/<cid>/up/#``, with the cluster's own login at the root, and reports its connection
    as ``1``/``0`` (retained, ``0`` as its last will) on the cluster's ``avail`` topic at the root.
    ``try_private false`` and ``notifications`` on a topic outside ``$SYS`` keep an amqtt root happy.
    """

    cluster: str
    root: BrokerUrl
    username: str
    password: str = ""  # empty: log in with the certificate below
    ca: Path | None = None  # the fleet's CA, to verify the root by
    cert: Path | None = None
    key: Path | None = None

    def _topic_lines(self) -> list[str]:
        """One ``topic`` line per bridged channel of the table: ``topic <rest> in|out 1 <local>/ <remote>/``."""
        out = []
        for direction, pairs in (("in", channels.BRIDGED_DOWN), ("out", channels.BRIDGED_UP)):
            for at_root, local in pairs:
                remote, here = at_root.filter(cluster=self.cluster).split("/"), local.filter().split("/")
                shared = len(here) - (len(remote) - 4)  # the channel's own levels follow oak/clusters/<c>/<dir>
                out.append(f"topic {'/'.join(here[shared:])} {direction} 1 {'/'.join(here[:shared])}/ "
                           f"{'/'.join(remote[:4])}/")
        return out

    def lines(self) -> list[str]:
        """The ``connection`` section."""
        out = [
            f"connection oak-root-{self.cluster}",
            f"address {self.root.host}:{self.root.port}",
            "bridge_protocol_version mqttv311",
            "try_private false",
            "notifications true",
            f"notification_topic {channels.CLUSTER_AVAIL.topic(cluster=self.cluster)}",
            f"remote_clientid {self.username}",
            f"remote_username {self.username}",
            *([f"remote_password {self.password}"] if self.password else []),
            "cleansession false",
            "keepalive_interval 10",
            "restart_timeout 1 10",
            *self._topic_lines(),
        ]
        if self.ca is not None:  # no host name check: tiers are reached by any address, the CA is the fleet's
            out += [f"bridge_cafile {self.ca}", "bridge_insecure true"]
            if self.cert is not None:
                out += [f"bridge_certfile {self.cert}", f"bridge_keyfile {self.key}"]
        elif self.root.tls:
            out.append("bridge_capath /etc/ssl/certs")
        return out


def render_conf(directory: Path, listeners: list[Listener], bridge: NativeBridge | None = None,
                user: str | None = None, plugin: Path | None = None) -> str:
    """mosquitto.conf for a broker whose files live in *directory*; no anonymous access.

    *user*: the account mosquitto keeps when started as root (by default it would switch to
    ``mosquitto`` and could not read oak's files, which only their owner may read). *plugin*: oak's
    client-id plugin (:mod:`broker.mosquitto_plugin`), which refuses a login using another's client id.
    """
    lines = [
        "# Written by oak at every start: change the oak command line, not this file.",
        *([f"user {user}"] if user else []),
        "per_listener_settings true",
        "persistence true",
        f"persistence_location {directory}/",
        "autosave_interval 60",
        "set_tcp_nodelay true",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_timestamp_format %H:%M:%S",
    ]
    for listener in listeners:
        lines += ["", *listener.lines(directory, plugin)]
    if bridge is not None:
        lines += ["", *bridge.lines()]
    return "\n".join(lines) + "\n"
