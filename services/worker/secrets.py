"""The worker's side of secrets: fetch an instance's values as it starts it, and lay them out for it.

Values are asked for over MQTT (``oak/nodes/<node>/up/secrets``, answered on ``.../down/secrets``; see
services/root/secrets.py) each time the instance starts, kept in memory only, and given to the runtime:
variables in :attr:`LaunchSpec.secret_env`, files written to ``<data dir>/secrets/<iid>/`` (a tmpfs of
its own when the worker is root, so they never reach a disk) which the runtime mounts read-only where
the SLA says (a VM gets them in a copy of its initramfs kept there too). The directory goes with the
instance.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common import channels
from services.common.inbox import Received
from services.common.mqtt import MqttSession
from services.common.private import private_dir, write_mode
from services.common.sla import VM_VIRTUALIZATIONS, ServiceSpec, registry_of

log = logging.getLogger(__name__)
WAIT = 15.0  # seconds for an answer (it goes up to the root and back)
ROOM = "4m"  # an instance's secrets tmpfs holds at most this (only what is written takes memory)
VM_ROOM = "512m"  # a VM's holds its image's initramfs too, copied with the secret files appended


class SecretFetcher:
    """Asks for the secrets of an instance and waits for the answer."""

    def __init__(self, session: MqttSession, node: str, wait: float = WAIT) -> None:
        self.session, self.node, self.wait = session, node, wait
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def fetch(self, iid: str) -> dict[str, bytes]:
        """The values of the secrets of *iid* by name; RuntimeError saying why they did not come."""
        ask_id = secrets.token_hex(8)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ask_id] = answer
        self.session.send(channels.NODE_SECRETS_ASK, {"id": ask_id, "iid": iid}, node=self.node)
        try:
            async with asyncio.timeout(self.wait):
                body = await answer
        except TimeoutError:
            raise RuntimeError(f"its secrets did not arrive within {self.wait:g} s (is the root reachable?)") from None
        finally:
            self._waiting.pop(ask_id, None)
        if body.get("error"):
            raise RuntimeError(f"its secrets were refused: {str(body['error'])[:200]}")
        values = body.get("values")
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            raise RuntimeError("its secrets came malformed")
        try:
            return {str(name): base64.b64decode(value, validate=True) for name, value in values.items()}
        except ValueError:
            raise RuntimeError("its secrets came malformed") from None

    async def answer(self, answered: Received[dict[str, Any]]) -> None:
        """The cluster's answer to one of our questions."""
        body = answered.body or {}
        waiting = self._waiting.get(str(body.get("id", "")))
        if waiting is not None and not waiting.done():
            waiting.set_result(body)


@dataclass(frozen=True)
class Laid:
    """An instance's secrets as its runtime takes them (:class:`~services.common.plugin_api.LaunchSpec`)."""

    secret_env: tuple[str, ...]
    secret_files: tuple[tuple[str, str], ...]  # (the file on the worker, where the instance sees it)
    secret_dir: str
    registry_auth: str = ""


def lay_out(spec: ServiceSpec, values: dict[str, bytes], where: Path) -> Laid:
    """The variables and files of *spec*'s secrets, and its registry credential: files written under
    *where* (a private tmpfs)."""
    env: list[str] = []
    files: list[tuple[str, str]] = []
    _private_tmpfs(where, VM_ROOM if spec.virtualization in VM_VIRTUALIZATIONS else ROOM)
    auth = _registry_auth(spec, values, where) if spec.registry_secret else ""
    for ref in spec.secrets:
        value = values.get(ref.name)
        if value is None:
            raise RuntimeError(f"secret {ref.name!r} did not come")
        if ref.env:
            try:
                text = value.decode()
            except UnicodeDecodeError:
                text = "\0"
            if "\0" in text or "\n" in text:
                raise RuntimeError(f"secret {ref.name!r} is not one line of text, so it cannot be a variable: give "
                                   "it as a file")
            env.append(f"{ref.env}={text}")
            continue
        path = where / ref.name
        write_mode(path, value, 0o444)
        files.append((str(path), ref.file))
    return Laid(tuple(env), tuple(files), str(where), auth)


def _registry_auth(spec: ServiceSpec, values: dict[str, bytes], where: Path) -> str:
    """A skopeo auth file for the registry of *spec*'s image, from the ``user:password`` secret."""
    value = values.get(spec.registry_secret, b"")
    if b":" not in value or b"\n" in value.strip():
        raise RuntimeError(f"secret {spec.registry_secret!r} (the registry_secret) must be user:password")
    doc = {"auths": {registry_of(spec.code): {"auth": base64.b64encode(value.strip()).decode()}}}
    path = where / ".registry-auth.json"
    write_mode(path, json.dumps(doc), 0o400)
    return str(path)


def _private_tmpfs(where: Path, room: str) -> Path:
    """*where*, a directory only we may read: a tmpfs of its own (at most *room*) when we are root."""
    private_dir(where)
    if os.geteuid() == 0 and not os.path.ismount(where) and shutil.which("mount"):
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room},mode=0700,nosuid,nodev,noexec",
                               "oak-secrets", str(where)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log.warning("secrets of %s are on disk: cannot mount a tmpfs (%s)", where.name, done.stderr.strip())
    return where


def clear(where: Path) -> None:
    """Remove an instance's secret files (and their tmpfs)."""
    if os.path.ismount(where):
        with contextlib.suppress(OSError):
            subprocess.run(["umount", str(where)], capture_output=True, check=False)
    shutil.rmtree(where, ignore_errors=True)
