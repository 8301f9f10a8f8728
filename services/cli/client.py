"""Talks to the root's user API over MQTT, exactly as any script would."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from services.common import envelope, models, topics
from services.common.mqtt import BrokerUrl, MqttError, MqttSession

REQUEST_TIMEOUT = 15.0


class CliError(Exception):
    """An error to print as one line before exiting non-zero."""


def oak_home(data_dir: str | None) -> Path:
    """The data directory: ``--data-dir``, else ``$OAK_HOME``, else ``~/.oak``."""
    return Path(data_dir or os.environ.get("OAK_HOME") or Path.home() / ".oak").expanduser()


@dataclass(frozen=True)
class Profile:
    """Who the CLI is and where the root is."""

    username: str
    password: str
    root: BrokerUrl

    @classmethod
    def load(cls, data_dir: Path, root: str | None = None) -> Profile:
        """Read ``credentials.json`` from *data_dir* (written by ``oak up``/``oak root``)."""
        path = data_dir / "credentials.json"
        try:
            saved = json.loads(path.read_text())
            url = root or saved.get("root") or "mqtt://127.0.0.1:10000"
            return cls(saved["username"], saved["password"], BrokerUrl.parse(url, 10000))
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
    """A user session with the root: ``async with OakClient(profile) as oak: await oak.request(...)``."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.session = MqttSession(
            profile.root, f"oak-cli-{secrets.token_hex(4)}", profile.username, profile.password,
            retry_first_connect=False,
        )

    async def __aenter__(self) -> OakClient:
        try:
            await self.session.__aenter__()
        except MqttError as exc:
            raise CliError(str(exc)) from None
        self.session.subscribe(f"{topics.BASE}/api/{self.profile.username}/response/#")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.session.close()

    async def request(self, resource: str, action: str, body: dict[str, Any] | None = None,
                      raw: bytes | None = None) -> Any:
        """Send one request and return its ``data``; raise :class:`ApiFailure` when refused."""
        transaction = secrets.token_hex(6)
        if raw is not None:  # sent as is (the root judges it), with our transaction when it is an object
            try:
                document = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                document = None
            payload = json.dumps({**document, "transaction": transaction}).encode() if isinstance(
                document, dict) else raw
        else:
            payload = json.dumps({**(body or {}), "transaction": transaction}).encode()
        self.session.publish(topics.api_request(self.profile.username, resource, action), payload)
        response_topic = topics.api_response(self.profile.username, resource, action)
        try:
            while True:
                message = await self.session.get(REQUEST_TIMEOUT)
                if message.topic != response_topic:
                    continue
                answer = json.loads(message.payload)
                if answer.get("transaction") not in (transaction, None):
                    continue
                if not answer.get("ok"):
                    error = answer.get("error", {})
                    raise ApiFailure(error.get("code", "error"), error.get("message", "refused"))
                return answer.get("data")
        except TimeoutError:
            raise CliError(f"the root at {self.profile.root} did not answer within {REQUEST_TIMEOUT:.0f} s") from None

    async def wait_until_running(
        self, job_name: str, timeout: float, on_update: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any]:
        """Follow a service's retained state until every instance is RUNNING (or COMPLETED)."""
        topic = topics.api_service_state(self.profile.username, job_name)
        self.session.subscribe(topic)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await self.session.get(timeout)
                    if message.topic != topic or not message.payload:
                        continue
                    state = decode_state(message.payload)
                    on_update(state)
                    if state["status"] in (models.RUNNING, models.COMPLETED):
                        return state
        except TimeoutError:
            raise CliError(f"{job_name} did not reach RUNNING within {timeout:.0f} s") from None


def decode_state(payload: bytes) -> dict[str, Any]:
    """The ``data`` of a retained service state message."""
    return envelope.decode(payload, "service.state").data
