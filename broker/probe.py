"""Does a broker accept a login? One bare MQTT 3.1.1 CONNECT/CONNACK, no client library.

Used to learn when a broker has re-read its password file: a login written for that reload only is
accepted once it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl


def _field(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def connect_packet(client_id: str, username: str, password: str, keepalive: int = 10,
                   will: tuple[str, str] | None = None) -> bytes:
    """A clean-session CONNECT packet with a username and password, and a retained QoS 1 *will*
    (topic, message) if given."""
    flags = 0xC2 | (0x2C if will else 0)  # username, password, clean session; will flag, QoS 1, retain
    body = _field("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + _field(client_id)
    if will:
        body += _field(will[0]) + _field(will[1])
    body += _field(username) + _field(password)
    size, length = len(body), bytearray()
    while True:  # the remaining length, as MQTT's variable-length integer
        byte, size = size % 128, size // 128
        length.append(byte | (0x80 if size else 0))
        if not size:
            return bytes([0x10]) + bytes(length) + body


async def accepts(host: str, port: int, username: str, password: str, timeout: float = 2.0,
                  tls: bool = False) -> bool:
    """True when the broker at *host*:*port* accepts this login (CONNACK with return code 0)."""
    context = ssl.create_default_context() if tls else None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=context)
            try:
                writer.write(connect_packet(f"oak-probe-{os.getpid()}", username, password))
                connack = await reader.readexactly(4)
                writer.write(b"\xe0\x00")  # DISCONNECT
                await writer.drain()
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
        return False
    return connack[0] == 0x20 and connack[3] == 0
