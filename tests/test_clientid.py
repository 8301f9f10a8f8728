"""Client ids are bound to identities: one table of cases, checked by the rule itself and by both brokers.

Each broker is asked with Debian's mosquitto_pub, as a script or an attacker would connect; mosquitto
enforces the rule through oak's plugin (broker/mosquitto_login.c), the embedded broker through
broker/acl.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.acl import client_id_allowed
from broker.credentials import Credentials
from broker.identity import NEWCOMER, OPEN_JOIN_PASSWORD, Identity
from broker.mosquitto import MosquittoBroker, MosquittoCredentials
from broker.server import EmbeddedBroker, Listeners
from services.common.store import Store

NONCE = "0123456789abcdef" * 2
# (username, client id or None for "let the broker name it", allowed)
CASES = [
    ("node.w1", "node.w1", True),
    ("node.w2", "node.w1", False),
    ("node.w1", "w1", False),
    ("node.w1", None, False),
    ("node.w1", "node-w1", False),
    ("node.w1", "node.w1-x", False),
    ("cluster.c1", "cluster.c1", True),
    ("cluster.c1", "cluster.c2", False),
    ("cluster.c1", "node.c1", False),
    ("alice", "alice", True),
    ("alice", "alice-cli-1f2e", True),
    ("alice", None, True),
    ("alice", "bob", False),
    ("alice", "alicebob", False),
    ("alice", "root", False),
    ("alice", "cluster", False),
    ("alice", "bridge", False),
    ("alice", "cluster.c1", False),
    ("alice", "node.w1", False),
    ("alice", NONCE, False),
    ("alice", "alice-node.w1", True),
    ("alice", "svc.root", False),
    ("svc.root", "root", True),
    ("svc.root", "anything", True),
    (NEWCOMER, NONCE, True),
    (NEWCOMER, "root", False),
    (NEWCOMER, "node.w1", False),
]
PASSWORDS = {"alice": "alice-password", "node.w1": "w1-password", "node.w2": "w2-password",
             "cluster.c1": "c1-password", NEWCOMER: OPEN_JOIN_PASSWORD}


@pytest.mark.parametrize(("username", "client_id", "allowed"), [c for c in CASES if c[1] is not None])
def test_rule(username: str, client_id: str, allowed: bool) -> None:
    """broker.acl says who may use which client id."""
    assert client_id_allowed(Identity.of(username), client_id) is allowed


@contextlib.asynccontextmanager
async def _broker(kind: str, tmp_path: Path) -> AsyncIterator[tuple[int, Credentials]]:
    store = Store(tmp_path / "db.json")
    if kind == "mosquitto":
        for binary in ("mosquitto", "mosquitto_pub"):
            if shutil.which(binary) is None:
                pytest.skip(f"{binary} is not installed (make test installs it when run as root)")
        credentials: Credentials = MosquittoCredentials(store)
    else:
        if shutil.which("mosquitto_pub") is None:
            pytest.skip("mosquitto_pub is not installed (make test installs it when run as root)")
        credentials = Credentials(store)
    await credentials.load()
    credentials.service_password("svc.root")
    for username, password in PASSWORDS.items():
        if username != NEWCOMER:
            await credentials.set_password(username, password)
    try:
        if kind == "mosquitto":
            assert isinstance(credentials, MosquittoCredentials)
            async with MosquittoBroker(Listeners(port=0), credentials, tmp_path / "mosquitto") as mosquitto:
                plugins = list((tmp_path / "mosquitto").glob("oak_login-*.so"))
                if not plugins:
                    pytest.skip("oak's mosquitto plugin could not be built here "
                                "(needs gcc, mosquitto-dev and libmosquitto-dev)")
                yield mosquitto.port, credentials
        else:
            async with EmbeddedBroker(Listeners(port=0), credentials) as embedded:
                yield embedded.port, credentials
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["embedded", "mosquitto"])
async def test_brokers_apply_the_rule(kind: str, tmp_path: Path) -> None:
    """Every case of the table, as a CONNECT from mosquitto_pub: admitted exactly when the rule says."""
    async with _broker(kind, tmp_path) as (port, credentials):
        wrong = []
        for username, client_id, allowed in CASES:
            password = PASSWORDS.get(username) or credentials.service_password(username)
            args = ["mosquitto_pub", "-V", "mqttv311", "-p", str(port), "-u", username, "-P", password,
                    "-t", "oak/x", "-m", "x", *(["-i", client_id] if client_id is not None else [])]
            process = await asyncio.create_subprocess_exec(*args, stdout=PIPE, stderr=PIPE)
            _, err = await asyncio.wait_for(process.communicate(), 10)
            if (process.returncode == 0) is not allowed:
                wrong.append((username, client_id, allowed, err.decode().strip()))
        assert not wrong, f"{kind} disagrees with the rule on: {wrong}"
