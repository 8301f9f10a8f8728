"""Users' secrets at the root: kept encrypted, and handed out only for an instance that needs them.

Each value is encrypted with Fernet (the ``cryptography`` library: AES-128-CBC and HMAC-SHA256) under
a key made at the root's first start, ``secrets.key`` in its data directory (mode 0600); TinyDB holds
only the ciphertext. A value is never logged, answered to a user or put in a retained topic: a worker
asks for those of an instance as it starts it (``oak/nodes/<node>/up/secrets``), its cluster passes the
question up only for an instance it placed on that worker, and the root answers only for an instance it
placed on that cluster, with the secrets its revision's spec names (services/cluster/secrets.py relays
the answer to that worker alone).
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from services.common import channels
from services.common.inbox import Received
from services.common.mqtt import MqttSession
from services.common.private import private_dir
from services.common.store import Store
from services.root.catalog import Catalog, NotFound

log = logging.getLogger(__name__)
TABLE = "secrets"
KEY_FILE = "secrets.key"
MAX_BYTES = 64 * 1024


def key_at(data_dir: Path) -> Fernet:
    """The root's secrets key, made (0600) at first start."""
    path = private_dir(data_dir) / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return Fernet(path.read_bytes().strip())
    with os.fdopen(fd, "wb") as handle:
        handle.write(Fernet.generate_key())
    log.info("made the secrets key %s", path)
    return Fernet(path.read_bytes().strip())


@dataclass(frozen=True)
class Secret:
    """What is known of a secret without its value: owner, name, version, when set and its size."""

    owner: str
    name: str
    version: int
    at: float
    size: int


class Secrets:
    """Every user's secrets, encrypted at rest."""

    def __init__(self, store: Store, key: Fernet) -> None:
        self.store, self.key = store, key
        self._docs: dict[str, dict[str, Any]] = {}

    async def load(self) -> None:
        """Read the (encrypted) records."""
        self._docs = await self.store.load(TABLE)

    @staticmethod
    def _key(owner: str, name: str) -> str:
        return f"{owner}/{name}"

    def of(self, owner: str) -> list[Secret]:
        """A user's secrets, by name (no values)."""
        return sorted((Secret(d["owner"], d["name"], d["version"], d["at"], d["size"])
                       for d in self._docs.values() if d["owner"] == owner), key=lambda s: s.name)

    def exists(self, owner: str, name: str) -> bool:
        """Whether *owner* has a secret *name*."""
        return self._key(owner, name) in self._docs

    async def set(self, owner: str, name: str, value: bytes) -> Secret:
        """Store *value* as the user's secret *name* (a new version when it exists)."""
        if len(value) > MAX_BYTES:
            raise ValueError(f"a secret holds at most {MAX_BYTES // 1024} KiB (this one is {len(value)} bytes)")
        old = self._docs.get(self._key(owner, name))
        secret = Secret(owner, name, (old["version"] + 1) if old else 1, time.time(), len(value))
        doc = {**dataclasses.asdict(secret), "token": self.key.encrypt(value).decode()}
        await self.store.put(TABLE, self._key(owner, name), doc)
        self._docs[self._key(owner, name)] = doc
        return secret

    async def delete(self, owner: str, name: str) -> None:
        """Forget the user's secret *name*."""
        if not self.exists(owner, name):
            raise NotFound(f"no secret {name!r}")
        await self.store.delete(TABLE, self._key(owner, name))
        del self._docs[self._key(owner, name)]

    def value(self, owner: str, name: str) -> bytes:
        """The decrypted value (NotFound when there is none, or it cannot be decrypted with this key)."""
        doc = self._docs.get(self._key(owner, name))
        if doc is None:
            raise NotFound(f"no secret {name!r}")
        try:
            return self.key.decrypt(doc["token"].encode())
        except InvalidToken:
            raise NotFound(f"secret {name!r} cannot be decrypted with this root's key") from None


class SecretDesk:
    """Answers a cluster asking for the secrets of one of its instances."""

    def __init__(self, secrets: Secrets, catalog: Catalog, session: MqttSession) -> None:
        self.secrets, self.catalog, self.session = secrets, catalog, session

    async def ask(self, asked: Received[dict[str, Any]]) -> None:
        """``{"id", "iid", "node"}`` from cluster *sender*: the values, or why not, to that cluster only."""
        body, cluster = asked.body or {}, asked.sender
        iid, node, ask_id = str(body.get("iid", "")), str(body.get("node", "")), str(body.get("id", ""))
        answer: dict[str, Any] = {"id": ask_id, "iid": iid, "node": node}
        instance = self.catalog.instances.get(iid)
        if instance is None or instance.cluster != cluster:
            log.warning("cluster %s asked for the secrets of %r, which is not one of its instances", cluster, iid)
            answer["error"] = f"instance {iid!r} is not on cluster {cluster}"
        else:
            service = self.catalog.services[instance.sid]
            try:
                spec = self.catalog.instance_spec(instance).service
                answer["values"] = {name: base64.b64encode(self.secrets.value(service.owner, name)).decode()
                                    for name in spec.secret_names}
            except NotFound as exc:
                answer["error"] = str(exc)
        self.session.send(channels.CLUSTER_SECRETS, answer, cluster=cluster)
