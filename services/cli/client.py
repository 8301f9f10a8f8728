"""Talks to the root's user API over MQTT, exactly as any script would."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from services.common import channels, envelope, models
from services.common.mqtt import BrokerUrl, Message, MqttError, MqttSession, tls_context

REQUEST_TIMEOUT = 15.0


class CliError(Exception):
    """An error to print as one line before exiting non-zero."""


def oak_home(data_dir: str | None) -> Path:
    """The data directory: ``--data-dir``, else ``$OAK_HOME``, else ``~/.oak``."""
    return Path(data_dir or os.environ.get("OAK_HOME") or Path.home() / ".oak").expanduser()


@dataclass(frozen=True)
class Profile:
    """Who the CLI is, where the root is, and the CA that proves it is the root (for ``mqtts://``)."""

    username: str
    password: str
    root: BrokerUrl
    ca: Path | None = None

    @classmethod
    def load(cls, data_dir: Path, root: str | None = None) -> Profile:
        """Read ``credentials.json`` from *data_dir* (written by ``oak up``/``oak root``)."""
        path = data_dir / "credentials.json"
        try:
            saved = json.loads(path.read_text())
            url = BrokerUrl.parse(root or saved.get("root") or "mqtts://127.0.0.1:10000", 10000)
            if root and "://" not in root and saved.get("ca"):
                url = BrokerUrl(url.host, url.port, tls=True)  # --root HOST:PORT of a root that runs TLS
            ca = Path(saved["ca"]) if saved.get("ca") else None
            return cls(saved["username"], saved["password"], url, ca)
        except FileNotFoundError:
            raise CliError(f"no credentials at {path}: start the root with `oak up` or `oak root`, "
                           "or point --data-dir/OAK_HOME at its data directory") from None
        except (ValueError, KeyError) as exc:
            raise CliError(f"unreadable credentials in {path}: {exc}") from None


class ApiFailure(CliError):
    """The root refused a request."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class OakClient:
    """A user session with the root: ``async with OakClient(profile) as oak: await oak.request(...)``.

    Answers are matched to requests by transaction; every other message (retained service states the
    caller subscribed to) is queued on :attr:`updates`.
    """

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.session = MqttSession(
            profile.root, f"{profile.username}-cli-{secrets.token_hex(4)}", profile.username, profile.password,
            retry_first_connect=False, tls=tls_context(profile.ca) if profile.root.tls and profile.ca else None,
        )
        self.updates: asyncio.Queue[Message] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.last_lag: float | None = None  # how late the last answer looked on arrival, by the root's clock

    async def __aenter__(self) -> OakClient:
        try:
            await self.session.__aenter__()
        except MqttError as exc:
            raise CliError(str(exc)) from None
        await self.session.subscribe_confirmed(channels.API_RESPONSE.filter(user=self.profile.username),
                                               channels.ROOT_AVAIL.topic())
        # The root says online once it serves requests (retained): wait for it, so none is lost.
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                while True:
                    message = await self.session.get(REQUEST_TIMEOUT)
                    if channels.ROOT_AVAIL.parse(message.topic) is not None and envelope.is_online(message.payload):
                        break
        except TimeoutError:
            await self.session.close()
            raise CliError(f"the root at {self.profile.root} is not serving (no online announcement within "
                           f"{REQUEST_TIMEOUT:.0f} s)") from None
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reader:
            self._reader.cancel()
        await self.session.close()

    async def _read(self) -> None:
        async for message in self.session.messages():
            if channels.API_RESPONSE.parse(message.topic) is None:
                self.updates.put_nowait(message)
                continue
            try:
                answer = json.loads(message.payload)
                waiter = self._pending.pop(answer.get("transaction"), None)
            except (ValueError, AttributeError, TypeError):
                waiter = None
            if waiter and not waiter.done():
                self.last_lag = message.lag
                waiter.set_result(answer)
            else:  # not ours to match (another client of this user, or a request sent without a transaction)
                self.updates.put_nowait(message)

    async def request(self, resource: str, action: str, body: dict[str, Any] | None = None,
                      raw: bytes | None = None, transaction: str | None = None) -> Any:
        """Send one request and return its ``data``; raise :class:`ApiFailure` when refused."""
        transaction = transaction or secrets.token_hex(6)
        if raw is not None:  # sent as is (the root judges it), with our transaction when it is an object
            try:
                document = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                document = None
            if not isinstance(document, dict):
                raise CliError("the SLA file must hold a JSON object")
            payload = json.dumps({**document, "transaction": transaction}).encode()
        else:
            payload = json.dumps({**(body or {}), "transaction": transaction}).encode()
        deadline = time.monotonic() + REQUEST_TIMEOUT
        while True:
            answer = await self._ask(channels.API_REQUEST.topic(user=self.profile.username, resource=resource,
                                                                action=action), payload, transaction, deadline)
            error: dict[str, Any] = answer["error"] if isinstance(answer.get("error"), dict) else {}
            retry_after = error.get("retry_after")
            if answer.get("ok") or error.get("code") != "busy" or not isinstance(retry_after, int | float) \
                    or time.monotonic() + retry_after > deadline:
                break
            await asyncio.sleep(retry_after)  # the root is catching up: ask again when it said
        if not answer.get("ok"):
            raise ApiFailure(error.get("code", "error"), error.get("message", "refused"))
        return answer.get("data")

    async def _ask(self, topic: str, payload: bytes, transaction: str, deadline: float) -> dict[str, Any]:
        """Publish one request and wait, until *deadline*, for the answer with its transaction."""
        waiter = self._pending[transaction] = asyncio.get_running_loop().create_future()
        self.session.publish(topic, payload)
        try:
            return dict(await asyncio.wait_for(waiter, max(0.0, deadline - time.monotonic())))
        except TimeoutError:
            raise CliError(f"the root at {self.profile.root} did not answer within {REQUEST_TIMEOUT:.0f} s") from None
        finally:
            self._pending.pop(transaction, None)

    async def stream(self, resource: str, action: str, body: dict[str, Any]) -> tuple[Any, AsyncIterator[dict]]:
        """Send a request answered many times (``services/logs``): its first answer's data, and the rest."""
        transaction = secrets.token_hex(6)
        first = await self.request(resource, action, body, transaction=transaction)
        topic = channels.API_RESPONSE.topic(user=self.profile.username, resource=resource, action=action)

        async def rest() -> AsyncIterator[dict]:
            while True:
                message = await self.updates.get()
                if message.topic != topic:
                    continue
                try:
                    answer = json.loads(message.payload)
                except ValueError:
                    continue
                if answer.get("transaction") == transaction:
                    yield answer

        return first, rest()

    async def wait_until_running(
        self, job_name: str, timeout: float, on_update: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any]:
        """Follow a service's retained state until every instance is RUNNING (or COMPLETED)."""
        return await self.follow(job_name, timeout, on_update,
                                 lambda state: state["status"] in (models.RUNNING, models.COMPLETED), "reach RUNNING")

    async def follow(self, job_name: str, timeout: float, on_update: Callable[[dict[str, Any]], None],
                     done: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """Follow a service's retained state until *done* says so; CliError saying it did not *what* in time."""
        topic = channels.API_SERVICE_STATE.topic(user=self.profile.username, job=job_name)
        await self.session.subscribe_confirmed(topic)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await self.updates.get()
                    if message.topic != topic or not message.payload:
                        continue
                    state = decode_state(message.payload)
                    on_update(state)
                    if done(state):
                        return state
        except TimeoutError:
            raise CliError(f"{job_name} did not {what} within {timeout:.0f} s") from None


def decode_state(payload: bytes) -> dict[str, Any]:
    """The ``data`` of a retained service state message."""
    return channels.API_SERVICE_STATE.decode(payload)
