"""Joining: a new cluster (at the root) or worker (at a cluster) obtains credentials of its own.

The newcomer connects as ``join.newcomer`` with client id ``<nonce>`` (password: the join token, or
``-`` when joining is open), publishes ``{"kind": "node", "name": "w1"}`` on ``oak/join/request/<nonce>`` and reads its
username and password from ``oak/join/response/<nonce>``; the ACL lets no one else read that topic.
It keeps them in ``<data-dir>/identity.json`` (mode 0600) and uses only them from then on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.credentials import Credentials, new_password
from broker.identity import NEWCOMER, OPEN_JOIN_PASSWORD, Identity
from services.common import topics
from services.common.mqtt import BrokerUrl, Message, MqttError, MqttSession
from services.common.private import write_secret

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
NONCE_FILE = "join-nonce.json"  # the nonce of a join under way: a retry after a timeout asks again with it
RESEND_FIRST, RESEND_MAX = 3.0, 30.0  # a newcomer re-sends its request after 3 s, then backs off to 30 s
ANSWERS_KEPT, ANSWER_TTL = 10_000, 600.0  # join answers kept to answer a repeated request the same way
REFUSED_GRACE = 30.0  # a newcomer refused by the broker tries again for this long before giving up


@dataclass(frozen=True)
class Login:
    """A username and password to connect with."""

    username: str
    password: str


async def obtain_login(
    data_dir: Path, url: BrokerUrl, kind: str, name: str, token: str | None, timeout: float = 30.0
) -> Login:
    """Return this cluster's or worker's login, joining the parent first if it has none yet."""
    path = data_dir / IDENTITY_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        return Login(saved["username"], saved["password"])
    pending = data_dir / NONCE_FILE
    nonce = json.loads(pending.read_text())["nonce"] if pending.exists() else secrets.token_hex(16)
    write_secret(pending, {"nonce": nonce})
    request = json.dumps({"kind": kind, "name": name}).encode()
    refused_until, pause = time.monotonic() + REFUSED_GRACE, 0.5
    while True:
        try:
            answer = await _ask(url, nonce, token, request, timeout, f"{kind} {name!r}")
            break
        except MqttError as exc:
            # A broker oak does not run refuses newcomers until the parent's tier has written its
            # accounts: a refusal is final only after a while (a wrong join token, then).
            if time.monotonic() + pause > refused_until:
                raise
            log.warning("%s; a wrong join token, or the parent has not started yet: asking again", exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)
    if not answer.get("ok"):
        pending.unlink(missing_ok=True)
        raise MqttError(f"{url} refused to let {kind} {name!r} join: {answer.get('error') or answer}")
    login = Login(answer["username"], answer["password"])
    write_secret(path, {"username": login.username, "password": login.password})
    pending.unlink(missing_ok=True)
    log.info("joined %s as %s; credentials kept in %s", url, login.username, path)
    return login


async def _ask(url: BrokerUrl, nonce: str, token: str | None, request: bytes, timeout: float, who: str) -> Any:
    """Send the join request (again and again, backing off) until the desk answers; its answer."""
    async with MqttSession(url, nonce, NEWCOMER, token or OPEN_JOIN_PASSWORD) as session:
        await session.subscribe_confirmed(topics.join_response(nonce))
        wait = RESEND_FIRST
        async with asyncio.timeout(timeout):
            while True:
                # The same nonce each time: the desk answers a repeated request as it did the first one.
                session.publish(topics.join_request(nonce), request)
                try:
                    return json.loads((await session.get(wait)).payload)
                except TimeoutError:
                    log.info("waiting for %s to answer the join request of %s", url, who)
                    wait = min(wait * 2, RESEND_MAX)


class JoinDesk:
    """Answers join requests of one kind of newcomer (``cluster`` at the root, ``node`` at a cluster)."""

    def __init__(self, credentials: Credentials, kind: str) -> None:
        self.credentials = credentials
        self.kind = kind
        # nonce -> (name, when, the login given): a newcomer that re-sends its request (it had no answer
        # in time) gets the same login again instead of "already joined". Bounded in number and age.
        self._given: OrderedDict[str, tuple[str, float, asyncio.Future[Login]]] = OrderedDict()

    def _remember(self, nonce: str, name: str) -> asyncio.Future[Login]:
        now = time.monotonic()
        while self._given:
            _, when, _ = next(iter(self._given.values()))
            if len(self._given) < ANSWERS_KEPT and when >= now - ANSWER_TTL:
                break
            self._given.popitem(last=False)
        given: asyncio.Future[Login] = asyncio.get_running_loop().create_future()
        self._given[nonce] = (name, now, given)
        return given

    async def handle(self, session: MqttSession, message: Message) -> str | None:
        """Answer one request; return the name that joined, if one did."""
        nonce = message.topic.rsplit("/", 1)[-1]
        try:
            request = json.loads(message.payload)
            kind, name = request["kind"], request["name"]
        except (ValueError, KeyError, TypeError):
            return self._answer(session, nonce, error="the join request must be {\"kind\": ..., \"name\": ...}")
        if kind != self.kind:
            return self._answer(session, nonce, error=f"only a {self.kind} can join here, not a {kind}")
        if not isinstance(name, str) or not topics.is_valid_id(name):
            return self._answer(session, nonce, error=f"bad name {name!r}: use letters, digits, '-' and '_'")
        username = Identity(kind, name).username
        known = self._given.get(nonce)
        if known is not None and known[0] == name:
            try:
                login = await asyncio.shield(known[2])  # the first request may still be being answered
            except Exception:  # noqa: BLE001 - the first attempt failed: answer this one afresh
                self._given.pop(nonce, None)
            else:
                log.info("%s %r asked again with the same nonce: answered as before", kind, name)
                self._answer(session, nonce, login=login)
                return None
        if self.credentials.exists(username):
            return self._answer(
                session,
                nonce,
                error=f"a {kind} named {name!r} has already joined; restart it with its own data dir "
                f"(it keeps its credentials in {IDENTITY_FILE}) or choose another name",
            )
        password = new_password()
        given = self._remember(nonce, name)
        try:
            await self.credentials.set_password(username, password)
        except BaseException as exc:
            self._given.pop(nonce, None)
            given.set_exception(exc if isinstance(exc, Exception) else RuntimeError("join cancelled"))
            given.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        given.set_result(Login(username, password))
        if self.credentials.join_token is None:
            log.warning(
                "OPEN JOIN: %s %r joined without a token; start with --join-token to require one", kind, name
            )
        self._answer(session, nonce, login=Login(username, password))
        return name

    @staticmethod
    def _answer(session: MqttSession, nonce: str, *, error: str = "", login: Login | None = None) -> None:
        body = {"ok": True, **login.__dict__} if login else {"ok": False, "error": error}
        session.publish(topics.join_response(nonce), json.dumps(body).encode())
        if error:
            log.warning("join refused: %s", error)
