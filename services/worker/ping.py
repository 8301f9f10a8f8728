"""Ping over a raw ICMP socket: which addresses answer, from a chosen source address, within a wait.

The worker uses it to learn whether a peer can be reached without VXLAN (direct routing ``auto``):
the ping goes from its VXLAN address to the peer's, so it carries overlay addresses on the link.
Synchronous; it runs in the thread that has entered the worker's host namespace.
"""

from __future__ import annotations

import random
import select
import socket
import struct
import time


def echo_request(ident: int, sequence: int) -> bytes:
    """An ICMP echo request (type 8) with its checksum."""
    body = struct.pack("!HH", ident, sequence) + b"oakling direct routing probe"
    header = struct.pack("!BBH", 8, 0, 0) + body
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return struct.pack("!BBH", 8, 0, ~total & 0xFFFF) + body


def answering(targets: set[str], source: str, wait: float) -> set[str]:
    """Which of *targets* answer a ping from *source* within *wait* seconds (in this thread's namespace)."""
    ident, answered = random.randrange(1 << 16), set[str]()
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as probe:
        probe.bind((source, 0))
        for sequence, target in enumerate(sorted(targets)):
            probe.sendto(echo_request(ident, sequence), (target, 0))
        deadline = time.monotonic() + wait
        while answered != targets and (left := deadline - time.monotonic()) > 0:
            if not select.select([probe], [], [], left)[0]:
                break
            packet, (sender, _) = probe.recvfrom(2048)
            icmp = packet[(packet[0] & 0x0F) * 4:]  # past the IP header
            if len(icmp) >= 8 and icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident and sender in targets:
                answered.add(sender)
    return answered
