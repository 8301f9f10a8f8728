"""The channel table: every MQTT topic the tiers use, declared once.

A :class:`Channel` says where a kind of message travels (its topic pattern), what it carries (its
envelope kind and how its payload decodes into a typed value), whether it is retained, its QoS, who may
publish it and who may read it. Everything else is derived from this table:

* subscriptions, dispatch and decoding (:class:`services.common.inbox.Inbox`: a handler is registered
  with the channel it handles);
* the brokers' topic rules (:mod:`broker.acl`, the amqtt plugin and mosquitto's ACL file);
* the retain flag the bridge restores (MQTT 3.1.1 drops it on live deliveries);
* the tables of docs/topics.md (``python -m services.common.channels`` prints them; a test compares).

A pattern's ``{name}`` levels are filled by :meth:`Channel.topic` and matched by :meth:`Channel.parse`.
A level named after a role (``{cluster}``, ``{node}``, ``{user}``, ``{join}``) is that identity's own
name: a cluster may publish ``oak/clusters/{cluster}/up/info`` only under its own name.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from services.common import envelope, models
from services.common.models import ClusterInfo, InstanceSpec, NodeInfo, NodeState

T = TypeVar("T")

# Who publishes and reads: the kinds of broker identity (broker.identity uses the same words).
SERVICE, USER, CLUSTER, NODE, JOIN = "service", "user", "cluster", "node", "join"
ROLES = (USER, CLUSTER, NODE, JOIN)

BASE = "oak"
_PLACEHOLDER = re.compile(r"\{([a-z]+)\}")


def _object(payload: bytes) -> dict[str, Any]:
    """A JSON object (not an envelope): tokens, commands and their answers, renewals, the user API's answers."""
    return envelope.json_object(payload)


def _bytes(payload: bytes) -> bytes:
    """Taken as it is: its reader answers a malformed one itself (an error for the user, a refused join)."""
    return payload


def _avail(payload: bytes) -> bool:
    return envelope.is_online(payload)


def _envelope(kind: str, load: Callable[[dict[str, Any]], Any] = lambda data: data) -> Callable[[bytes], Any]:
    """Decode an envelope of *kind* and build its data with *load* (which checks every field)."""
    return lambda payload: load(envelope.decode(payload, kind).data)


@dataclass(frozen=True)
class Channel(Generic[T]):
    """One kind of message between tiers: where it travels, what it carries, who may send and read it."""

    pattern: str
    doc: str
    decode: Callable[[bytes], T]
    publisher: str
    readers: tuple[str, ...] = ()
    kind: str = ""  # the envelope kind; "" for a bare JSON body
    retained: bool = False
    qos: int = 1
    delta: Channel[Any] | None = None  # the non-retained channel carrying this document's changes
    sections: tuple[str, ...] = ()  # a document sent as deltas: its sections (services/common/delta.py)

    @functools.cached_property
    def levels(self) -> tuple[tuple[str, bool], ...]:
        """The pattern's levels, each as (its text, or the placeholder's name; whether a placeholder):
        split once, as every topic built or parsed on this channel needs them."""
        return tuple((m.group(1), True) if (m := _PLACEHOLDER.fullmatch(level)) else (level, False)
                     for level in self.pattern.split("/"))

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        """The placeholders of the pattern, in order."""
        return tuple(text for text, placeholder in self.levels if placeholder)

    @functools.cached_property
    def owner(self) -> str | None:
        """The placeholder naming whose channel this is (``cluster`` in ``oak/clusters/{cluster}/up/..``)."""
        return next((name for name in self.names if name in ROLES), None)

    def topic(self, **names: str) -> str:
        """The topic with every placeholder filled (KeyError naming a missing one)."""
        return self._fill(names, None)

    def filter(self, **names: str) -> str:
        """The subscription filter: the given placeholders filled, the others ``+``."""
        return self._fill(names, "+")

    def _fill(self, names: Mapping[str, str], default: str | None) -> str:
        out = []
        for text, placeholder in self.levels:
            if placeholder:
                value = names.get(text, default)
                if value is None:
                    raise KeyError(f"the topic needs {text!r}")
                text = value
            out.append(text)
        return "/".join(out)

    def parse(self, topic: str) -> dict[str, str] | None:
        """The placeholders' values when *topic* is on this channel, else None."""
        got = topic.split("/")
        if len(got) != len(self.levels):
            return None
        out: dict[str, str] = {}
        for (text, placeholder), level in zip(self.levels, got, strict=True):
            if placeholder:
                if not level or "+" in level or "#" in level:
                    return None
                out[text] = level
            elif text != level:
                return None
        return out

    def encode(self, data: Mapping[str, Any], src: str) -> bytes:
        """The payload for *data*: an envelope of this channel's kind, or the bare JSON object."""
        if self.kind:
            return envelope.encode(self.kind, dict(data), src)
        return json.dumps(data, separators=(",", ":")).encode()


def _shown(pattern: str) -> str:
    return pattern.replace("{", "<").replace("}", ">")


def _whole_and_delta(pattern: str, doc: str, kind: str, publisher: str, readers: tuple[str, ...],
                     delta_doc: str, sections: tuple[str, ...]
                     ) -> tuple[Channel[dict[str, Any]], Channel[dict[str, Any]]]:
    """A big retained document and its numbered changes (services/common/delta.py)."""
    delta: Channel[dict[str, Any]] = Channel(pattern + "/delta", delta_doc, _envelope(kind + ".delta"), publisher,
                                             readers, kind=kind + ".delta")
    return Channel(pattern, doc, _envelope(kind), publisher, readers, kind=kind, retained=True, delta=delta,
                   sections=sections), delta


def _load_desired(data: dict[str, Any]) -> dict[str, InstanceSpec]:
    return models.load_desired(data)


# ---- the root broker: clusters, joins and users ------------------------------------------------------

ROOT_AVAIL: Channel[bool] = Channel(
    f"{BASE}/root/avail", "online / offline (the root's last will)", _avail, SERVICE, (USER, CLUSTER), retained=True)

CLUSTER_AVAIL: Channel[bool] = Channel(
    f"{BASE}/clusters/{{cluster}}/up/avail",
    "online / offline, from the cluster's bridge (its last will): a cluster that is not heard again within "
    "2 s is gone, and its instances are replaced as their `disconnect` policies say", _avail, CLUSTER,
    retained=True)
CLUSTER_BEAT: Channel[dict[str, Any]] = Channel(
    f"{BASE}/clusters/{{cluster}}/up/beat", "`{\"n\": count, \"ts\": sent}` every second: the cluster's "
    "heartbeat (one not heard from for 4 s is gone, docs/partitions.md)", _object, CLUSTER, qos=0)
CLUSTER_INFO: Channel[ClusterInfo] = Channel(
    f"{BASE}/clusters/{{cluster}}/up/info", "`cluster.info`: name, location, version, scheduler",
    _envelope("cluster.info", lambda data: models.load(ClusterInfo, data)), CLUSTER, kind="cluster.info",
    retained=True)
CLUSTER_STATE, CLUSTER_STATE_DELTA = _whole_and_delta(
    f"{BASE}/clusters/{{cluster}}/up/state",
    "`cluster.state`, once changes settle (at least every 10 s while they go on): `nodes` (each worker's "
    "capacity, free capacity after placed demands, load, runtimes, volumes), `instances` (`{iid: status}`) and "
    "`overlay`, with `epoch` and `seq`", "cluster.state", CLUSTER, (),
    "`cluster.state.delta`, on change (at once when idle; spaced by its cost while the cluster is behind on "
    "its messages): what changed since `seq - 1`", ("nodes", "instances", "overlay"))
CLUSTER_ANSWER: Channel[dict[str, Any]] = Channel(
    f"{BASE}/clusters/{{cluster}}/up/res/{{verb}}",
    "a worker's answer to a command, passed up unchanged: log chunks `{\"id\", \"iid\", \"node\", \"lines\", "
    "\"done\"}`", _object, CLUSTER)
CLUSTER_TOKEN_USED: Channel[dict[str, Any]] = Channel(
    f"{BASE}/clusters/{{cluster}}/up/tokens/used", "`{\"id\": ...}`: a worker joined with that token (the "
    "root counts the use)", _object, CLUSTER)
CLUSTER_CSR: Channel[dict[str, Any]] = Channel(
    f"{BASE}/clusters/{{cluster}}/up/csr", "`{\"csr\": <PEM for the cluster's key>}`: renewal "
    "(docs/security.md)", _object, CLUSTER)
CLUSTER_SECRETS_ASK: Channel[dict[str, Any]] = Channel(
    f"{BASE}/clusters/{{cluster}}/up/secrets", "`{\"id\", \"iid\", \"node\"}`: a worker of the cluster starts "
    "that instance and needs its secrets (passed up only for an instance placed on that worker)", _object, CLUSTER)
CLUSTER_DESIRED, CLUSTER_DESIRED_DELTA = _whole_and_delta(
    f"{BASE}/clusters/{{cluster}}/down/desired",
    "`desired`, once changes settle (at least every 30 s while they go on): `{\"instances\": {iid: "
    "InstanceSpec}, \"epoch\", \"seq\"}`, every instance the root placed on the cluster", "desired", SERVICE,
    (CLUSTER,), "`desired.delta`, on every change: the instances put on and dropped from the cluster since "
    "`seq - 1`", ("instances",))
CLUSTER_NET: Channel[dict[str, Any]] = Channel(
    f"{BASE}/clusters/{{cluster}}/down/net",
    "`net`, when it changed: the cluster's overlay `block` and the whole net `table` (docs/network.md)",
    _envelope("net"), SERVICE, (CLUSTER,), kind="net", retained=True)
CLUSTER_COMMAND: Channel[dict[str, Any]] = Channel(
    f"{BASE}/clusters/{{cluster}}/down/cmd/{{verb}}",
    "a one-shot command: `logs` `{\"id\", \"iid\", \"tail\", \"follow\"}` (or `\"stop\": true`), passed to the "
    "worker holding the instance; `revoke` `{\"node\": name}`: refuse that worker from now on; `volumes` "
    "`{\"delete\": [owner/job/volume...]}`: passed to every worker",
    _object, SERVICE, (CLUSTER,))
CLUSTER_TOKENS: Channel[dict[str, Any]] = Channel(
    f"{BASE}/clusters/{{cluster}}/down/tokens",
    "`{\"tokens\": {id: {\"kind\": \"node\", \"digest\", \"expires\", \"uses\"}}}`: the workers' join tokens, "
    "hashed", _object, SERVICE, (CLUSTER,), retained=True)
CLUSTER_SECRETS: Channel[dict[str, Any]] = Channel(
    f"{BASE}/clusters/{{cluster}}/down/secrets", "`{\"id\", \"iid\", \"node\", \"values\": {name: base64}}` "
    "or `{..., \"error\"}`: the answer, for that worker alone (never retained)", _object, SERVICE, (CLUSTER,))
CLUSTER_ROOT_BEAT: Channel[dict[str, Any]] = Channel(
    f"{BASE}/clusters/{{cluster}}/down/beat", "`{\"n\": count}` every second: the root's heartbeat (a cluster "
    "that has not heard it for a service's `stop_after` fences that service's instances)", _object, SERVICE,
    (CLUSTER,), qos=0)
CLUSTER_CERT: Channel[dict[str, Any]] = Channel(
    f"{BASE}/clusters/{{cluster}}/down/cert", "`{\"cert\": <PEM>}`: the renewed certificate", _object, SERVICE,
    (CLUSTER,))

JOIN_CA: Channel[dict[str, Any]] = Channel(
    f"{BASE}/join/ca", "`{\"ca\": <the fleet's CA>, \"chain\": [<PEM>...]}`: what a newcomer checks against "
    "its fingerprint before it sends its token", _object, SERVICE, (JOIN,), retained=True)
JOIN_REQUEST: Channel[bytes] = Channel(
    f"{BASE}/join/request/{{join}}", "`{\"kind\": \"cluster\" or \"node\", \"name\", \"token\", \"csr\", "
    "\"ca_csr\"?}` (the desk answers a malformed one itself)", _bytes, JOIN)
JOIN_RESPONSE: Channel[dict[str, Any]] = Channel(
    f"{BASE}/join/response/{{join}}", "`{\"ok\": true, \"username\", \"cert\", \"ca\", ...}` or `{\"ok\": "
    "false, \"error\"}`", _object, SERVICE, (JOIN,))

API_REQUEST: Channel[bytes] = Channel(
    f"{BASE}/api/{{user}}/request/{{resource}}/{{action}}",
    "a user's request (docs/api.md; the root answers a malformed one itself)", _bytes, USER, (USER,))
API_RESPONSE: Channel[dict[str, Any]] = Channel(
    f"{BASE}/api/{{user}}/response/{{resource}}/{{action}}",
    "`{\"ok\": true, \"data\", \"transaction\", \"ts\"}` / `{\"ok\": false, \"error\": {\"code\", \"message\"}}`",
    _object, SERVICE, (USER,))
API_SERVICE_STATE: Channel[dict[str, Any]] = Channel(
    f"{BASE}/api/{{user}}/state/services/{{job}}",
    "`service.state`: the service, its overall status, and every instance with cluster, node, status, "
    "reason, cpu, memory, restarts", _envelope("service.state"), SERVICE, (USER,), kind="service.state",
    retained=True)
API_INFRASTRUCTURE: Channel[dict[str, Any]] = Channel(
    f"{BASE}/api/{{user}}/state/infrastructure",
    "`infrastructure`, at most every 2 s when it changed: `clusters` and `nodes` as `clusters/list` and "
    "`nodes/list` give them", _envelope("infrastructure"), SERVICE, (USER,), kind="infrastructure",
    retained=True)
API_EVENTS: Channel[dict[str, Any]] = Channel(
    f"{BASE}/api/{{user}}/events",
    "`events`: `{\"events\": [{\"at\", \"kind\", \"what\", \"service\"?, \"instance\"?, \"cluster\"?, "
    "\"node\"?, \"reason\"?}]}`, a batch at most every 0.5 s: placements, refusals, status changes, workers "
    "and clusters coming and going, rollouts, refused requests (services/root/events.py)",
    _envelope("events"), SERVICE, (USER,), kind="events")
API_EVENTS_RECENT: Channel[dict[str, Any]] = Channel(
    f"{BASE}/api/{{user}}/state/events", "`events`: the user's last 200 events, as `events` sends them",
    _envelope("events"), SERVICE, (USER,), kind="events", retained=True)

# ---- a cluster broker: its workers, and its own side of the bridge ----------------------------------

CLUSTER_SELF_AVAIL: Channel[bool] = Channel(
    f"{BASE}/cluster/avail", "online / offline (the cluster orchestrator's last will)", _avail, SERVICE, (NODE,),
    retained=True)
NODE_AVAIL: Channel[bool] = Channel(
    f"{BASE}/nodes/{{node}}/up/avail", "online / offline (the worker's last will): the worker is gone at once, "
    "and its instances are replaced as their `disconnect` policies say", _avail, NODE, retained=True)
NODE_INFO: Channel[NodeInfo] = Channel(
    f"{BASE}/nodes/{{node}}/up/info", "`node.info`: cpu cores, memory, arch, runtimes (the virtualizations "
    "it can run), location", _envelope("node.info", lambda data: models.load(NodeInfo, data)), NODE,
    kind="node.info", retained=True)
NODE_STATE: Channel[NodeState] = Channel(
    f"{BASE}/nodes/{{node}}/up/state", "`node.state`, on change and every 2 s (`--report-interval`; its "
    "heartbeat: a worker silent for two intervals and a second is gone): cpu/memory/disk use and "
    "`instances` (`{iid: status}`)", _envelope("node.state", NodeState.load), NODE, kind="node.state",
    retained=True)
NODE_ANSWER: Channel[dict[str, Any]] = Channel(
    f"{BASE}/nodes/{{node}}/up/res/{{verb}}", "the answer to a command (log chunks), passed up unchanged",
    _object, NODE)
NODE_CSR: Channel[dict[str, Any]] = Channel(
    f"{BASE}/nodes/{{node}}/up/csr", "`{\"csr\": <PEM>}`: renewal of the worker's certificate", _object, NODE)
NODE_SECRETS_ASK: Channel[dict[str, Any]] = Channel(
    f"{BASE}/nodes/{{node}}/up/secrets", "`{\"id\", \"iid\"}`: the secrets of an instance the worker starts",
    _object, NODE)
NODE_DESIRED: Channel[dict[str, InstanceSpec]] = Channel(
    f"{BASE}/nodes/{{node}}/down/desired", "`desired`: every instance placed on this worker",
    _envelope("desired", _load_desired), SERVICE, (NODE,), kind="desired", retained=True)
NODE_PEERS: Channel[dict[str, Any]] = Channel(
    f"{BASE}/nodes/{{node}}/down/peers", "`peers`: the other workers' probe addresses, for latency",
    _envelope("peers"), SERVICE, (NODE,), kind="peers", retained=True)
NODE_NET: Channel[dict[str, Any]] = Channel(
    f"{BASE}/nodes/{{node}}/down/net", "`net`, when it changed: the worker's overlay `subnet`, its `cluster`, "
    "and the net `table`", _envelope("net"), SERVICE, (NODE,), kind="net", retained=True)
NODE_COMMAND: Channel[dict[str, Any]] = Channel(
    f"{BASE}/nodes/{{node}}/down/cmd/{{verb}}", "the root's one-shot command for an instance on this worker "
    "(`logs`), or for its volumes (`volumes` `{\"delete\": [...]}`)",
    _object, SERVICE, (NODE,))
NODE_SECRETS: Channel[dict[str, Any]] = Channel(
    f"{BASE}/nodes/{{node}}/down/secrets", "`{\"id\", \"iid\", \"values\"}` or `{..., \"error\"}`: the "
    "answer (never retained)", _object, SERVICE, (NODE,))
NODE_CERT: Channel[dict[str, Any]] = Channel(
    f"{BASE}/nodes/{{node}}/down/cert", "`{\"cert\": <PEM>}`: the renewed certificate", _object, SERVICE, (NODE,))

CLUSTER_UP: tuple[Channel[Any], ...] = (
    CLUSTER_AVAIL, CLUSTER_INFO, CLUSTER_STATE, CLUSTER_ANSWER, CLUSTER_TOKEN_USED, CLUSTER_CSR, CLUSTER_SECRETS_ASK,
    CLUSTER_BEAT)
CLUSTER_DOWN: tuple[Channel[Any], ...] = (CLUSTER_DESIRED, CLUSTER_NET, CLUSTER_COMMAND, CLUSTER_TOKENS, CLUSTER_CERT,
                                          CLUSTER_SECRETS, CLUSTER_ROOT_BEAT)
UPSTREAM_BASE, DOWNSTREAM_BASE = f"{BASE}/upstream", f"{BASE}/downstream"


def _mirror(channel: Channel[T], base: str) -> Channel[T]:
    """*channel* as the cluster orchestrator sees it (the bridge carries it: broker/bridge.py in-process, or
    mosquitto's own bridge through the cluster's broker)."""
    tail = "/".join(channel.pattern.split("/")[4:])
    return replace(channel, pattern=f"{base}/{tail}", publisher=SERVICE, readers=(),
                   doc=f"the bridge's side of `{_shown(channel.pattern)}`",
                   delta=_mirror(channel.delta, base) if channel.delta else None)


def _with_deltas(channels: Iterable[Channel[Any]]) -> tuple[Channel[Any], ...]:
    return tuple(c for channel in channels for c in (channel, *((channel.delta,) if channel.delta else ())))


_UP: dict[Channel[Any], Channel[Any]] = {c: _mirror(c, UPSTREAM_BASE) for c in _with_deltas(CLUSTER_UP)}
_DOWN: dict[Channel[Any], Channel[Any]] = {c: _mirror(c, DOWNSTREAM_BASE) for c in _with_deltas(CLUSTER_DOWN)}


def upstream(channel: Channel[T]) -> Channel[T]:
    """The cluster orchestrator's side of one of its ``up`` channels at the root."""
    return _UP[channel]


def downstream(channel: Channel[T]) -> Channel[T]:
    """The cluster orchestrator's side of one of the root's ``down`` channels (where the bridge delivers it)."""
    return _DOWN[channel]


ROOT_BROKER = _with_deltas((
    ROOT_AVAIL, *CLUSTER_UP, *CLUSTER_DOWN, JOIN_CA, JOIN_REQUEST, JOIN_RESPONSE,
    API_REQUEST, API_RESPONSE, API_SERVICE_STATE, API_INFRASTRUCTURE, API_EVENTS, API_EVENTS_RECENT))
CLUSTER_BROKER = tuple(dict.fromkeys(_with_deltas((
    CLUSTER_SELF_AVAIL, NODE_AVAIL, NODE_INFO, NODE_STATE, NODE_ANSWER, NODE_CSR, NODE_SECRETS_ASK,
    NODE_DESIRED, NODE_PEERS, NODE_NET, NODE_COMMAND, NODE_CERT, NODE_SECRETS,
    *_UP.values(), *_DOWN.values(), JOIN_CA, JOIN_REQUEST, JOIN_RESPONSE))))
ALL = tuple(dict.fromkeys(ROOT_BROKER + CLUSTER_BROKER))


def find(topic: str, among: Iterable[Channel[Any]] = ALL) -> tuple[Channel[Any], dict[str, str]] | None:
    """The channel *topic* is on and its placeholders' values, or None for a topic no channel has."""
    for channel in among:
        names = channel.parse(topic)
        if names is not None:
            return channel, names
    return None


BRIDGED_DOWN, BRIDGED_UP = tuple(_DOWN.items()), tuple(_UP.items())


def bridged(topic: str, cluster: str) -> tuple[str, bool] | None:
    """Where the bridge of *cluster* forwards *topic*, and whether retained: the root's ``down`` channels
    to the cluster broker's downstream side, the cluster orchestrator's upstream side to the root."""
    for at_root, local in BRIDGED_DOWN:
        names = at_root.parse(topic)
        if names is not None and names.pop(CLUSTER) == cluster:
            return local.topic(**names), at_root.retained
    for at_root, local in BRIDGED_UP:
        names = local.parse(topic)
        if names is not None:
            return at_root.topic(**names, cluster=cluster), at_root.retained
    return None


def down_filter(cluster: str) -> str:
    """The one subscription that takes every channel the root sends *cluster* (its bridge's)."""
    return common_prefix(c.filter(cluster=cluster) for c in CLUSTER_DOWN) + "/#"


def common_prefix(topics: Iterable[str]) -> str:
    """The levels every topic in *topics* starts with."""
    split = [topic.split("/") for topic in topics]
    out: list[str] = []
    for levels in zip(*split, strict=False):
        if len(set(levels)) != 1 or "+" in levels:
            break
        out.append(levels[0])
    return "/".join(out)


@dataclass(frozen=True)
class Rules:
    """What one identity may do, from the table: publish on these filters, read under these subtrees and
    these exact topics."""

    publish: tuple[str, ...] = ()
    subtrees: tuple[str, ...] = ()
    exact: tuple[str, ...] = field(default_factory=tuple)


@functools.lru_cache(maxsize=8192)
def rules(role: str, name: str, on: tuple[Channel[Any], ...] = ALL) -> Rules:
    """The topic rules of identity *name* of *role*: it publishes the channels it is the publisher of, under
    its own name, and reads the subtree its readable channels share (so ``oak/api/alice/#`` is one
    subscription), and the readable channels that are nobody's (``oak/root/avail``)."""
    publish = tuple(dict.fromkeys(c.filter(**{role: name}) for c in on if c.publisher == role and c.owner == role))
    mine = [c.filter(**{role: name}) for c in on if role in c.readers and c.owner == role]
    exact = tuple(dict.fromkeys(c.pattern for c in on if role in c.readers and not c.names))
    return Rules(publish, (common_prefix(mine),) if mine else (), exact)


def markdown(channels: Iterable[Channel[Any]]) -> str:
    """A table of *channels* for docs/topics.md."""
    head = "| topic | publisher | readers | retained | payload |\n|---|---|---|---|---|"
    rows = [f"| `{_shown(c.pattern)}` | {c.publisher} | "
            f"{', '.join(c.readers) or '-'} | {'yes' if c.retained else 'no'} | {c.doc} |" for c in channels]
    return "\n".join([head, *rows])


if __name__ == "__main__":
    print("## Root broker (default port 10000)\n")
    print(markdown(ROOT_BROKER))
    print("\n## Cluster broker (default port 10003)\n")
    print(markdown(CLUSTER_BROKER))
