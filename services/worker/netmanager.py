"""The NetManager's local API: the overlay served to the NodeEngine over JSON lines on 127.0.0.1.

Each request is one JSON object on one line, ``{"op": ..., ...}``; each answer is one line,
``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``. Operations: ``status``, ``endpoint``,
``update`` (subnet, cluster, table), ``attach`` (iid, ports), ``detach`` (iid). The seed's
``NetManager -p 6000`` serves it; ``NodeEngine -n 6000`` uses it through :class:`RemoteNetwork`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from services.worker.overlay import Attachment, Overlay

log = logging.getLogger("NetManager")


async def _answer(overlay: Overlay, request: dict[str, Any]) -> dict[str, Any]:
    op = request.get("op")
    if op == "status":
        return {"ok": True, "overlay": True, "subnet": overlay.subnet, "endpoint": await overlay.endpoint()}
    if op == "endpoint":
        return {"ok": True, "endpoint": await overlay.endpoint()}
    if op == "update":
        overlay.node = str(request.get("node") or overlay.node)
        await overlay.update(str(request["subnet"]), str(request["cluster"]), dict(request["table"]))
        return {"ok": True}
    if op == "attach":
        place = await overlay.attach(str(request["iid"]), str(request.get("ports", "")))
        return {"ok": True, "netns": place.netns, "ip": place.ip, "gateway": place.gateway, "host": place.host}
    if op == "detach":
        await overlay.detach(str(request["iid"]))
        return {"ok": True}
    return {"ok": False, "error": f"unknown operation {op!r}"}


Answer = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


async def _listen(answer: Answer, port: int, host: str, what: str) -> None:
    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    reply = await answer(request if isinstance(request, dict) else {})
                except (ValueError, KeyError, TypeError, RuntimeError) as exc:
                    reply = {"ok": False, "error": str(exc)}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(client, host, port)
    log.info("NetManager listening on %s:%d; %s", host, port, what)
    async with server:
        await server.serve_forever()


async def serve(overlay: Overlay, port: int, host: str = "127.0.0.1") -> None:
    """Serve *overlay* on *host*:*port* until cancelled."""
    await _listen(lambda request: _answer(overlay, request), port, host, f"overlay endpoint {await overlay.endpoint()}")


async def serve_status(port: int, reason: str, host: str = "127.0.0.1") -> None:
    """Serve a NetManager without the overlay: ``status`` says why; everything else is refused."""

    async def answer(request: dict[str, Any]) -> dict[str, Any]:
        if request.get("op") == "status":
            return {"ok": True, "overlay": False, "reason": reason}
        return {"ok": False, "error": f"no overlay: {reason}"}

    await _listen(answer, port, host, "no overlay")


class RemoteNetwork:
    """The overlay of a NetManager process, as a :class:`~services.worker.overlay.Network`."""

    def __init__(self, port: int, node: str, host: str = "127.0.0.1") -> None:
        self.host, self.port, self.node = host, port, node
        self._lock = asyncio.Lock()

    async def _ask(self, op: str, **fields: Any) -> dict[str, Any]:
        async with self._lock:  # one request at a time on a fresh connection: simple and robust
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError as exc:
                raise RuntimeError(f"NetManager on port {self.port} does not answer: {exc}") from None
            try:
                writer.write(json.dumps({"op": op, **fields}).encode() + b"\n")
                await writer.drain()
                reply = json.loads(await reader.readline() or b"{}")
            finally:
                writer.close()
        if not reply.get("ok"):
            raise RuntimeError(f"NetManager: {reply.get('error', 'no answer')}")
        return dict(reply)

    async def status(self) -> dict[str, Any]:
        """The NetManager's ``status`` answer (``overlay``, ``endpoint`` or ``reason``)."""
        return await self._ask("status")

    async def endpoint(self) -> str:
        """The worker's VXLAN endpoint."""
        return str((await self._ask("endpoint"))["endpoint"])

    async def update(self, subnet: str, cluster: str, table: dict[str, Any]) -> None:
        """Pass the cluster's subnet and net table on."""
        await self._ask("update", subnet=subnet, cluster=cluster, table=table, node=self.node)

    async def attach(self, iid: str, ports: str) -> Attachment:
        """Ask for instance *iid*'s namespace and IP."""
        reply = await self._ask("attach", iid=iid, ports=ports)
        return Attachment(str(reply["netns"]), str(reply["ip"]), str(reply["gateway"]), str(reply.get("host", "")))

    async def detach(self, iid: str) -> None:
        """Release instance *iid*'s namespace and IP."""
        await self._ask("detach", iid=iid)
