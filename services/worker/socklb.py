"""Service IPs translated at the socket: a cgroup ``connect4`` BPF program (Cilium's socket LB, in small).

When an instance connects a TCP socket to a round-robin or closest service IP, the kernel runs this
program before the connection starts; it swaps the address for one of the service's backends, the
next in turn. The connection then goes straight to the backend: no DNAT and no connection tracking
on any of its packets, in the instance or anywhere else. The nftables DNAT stays underneath for what
the program does not see (UDP, processes outside the instances' cgroup, VM guests), so correctness
never depends on it.

The program is attached (as a BPF link, gone with the worker's process) to the cgroup v2 directory
that holds every instance's group (``oakling``, where runc puts them). Several workers on one machine
may share that directory, so each worker's program acts only in the network namespaces of its own
instances, known by their netns cookies. Two maps hold the worker's view: ``namespaces`` (cookie -> 1)
and ``services`` (service IP -> backend count, turn counter, up to :data:`MAX_BACKENDS` backend IPs).

The program is written out below instruction by instruction; it needs no compiler. A socket so
translated reports its backend, not the service IP, as its peer (``getpeername``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import struct
from pathlib import Path

log = logging.getLogger(__name__)
MAX_BACKENDS = 64  # services with more replicas are left to the nftables DNAT
MAX_SERVICE_IPS = 8192
MAX_NAMESPACES = 4096

# bpf(2) commands, types and helpers (linux/bpf.h)
_MAP_CREATE, _MAP_UPDATE, _MAP_DELETE, _PROG_LOAD, _LINK_CREATE = 0, 2, 3, 5, 28
_MAP_HASH, _PROG_SOCK_ADDR, _INET4_CONNECT = 1, 18, 10
_LOOKUP, _NETNS_COOKIE = 1, 122
_SOCK_STREAM_OFFSET, _USER_IP4_OFFSET = 32, 4  # struct bpf_sock_addr: type, user_ip4
_NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "riscv64": 280}
_VALUE = struct.Struct(f"<II{4 * MAX_BACKENDS}s")  # backend count, turn counter, backend IPs

_libc = ctypes.CDLL(None, use_errno=True)


class BalancerError(OSError):
    """The kernel refused a BPF call."""


def _bpf(command: int, attr: bytes) -> int:
    buffer = ctypes.create_string_buffer(attr, 128)
    result = _libc.syscall(_NR_BPF.get(os.uname().machine, 321), command, buffer, 128)
    if result < 0:
        errno = ctypes.get_errno()
        raise BalancerError(errno, f"bpf command {command}: {os.strerror(errno)}")
    return int(result)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _program(namespaces_fd: int, services_fd: int) -> bytes:
    """The connect4 program: r6 = context, r7 = the service's map value, r8 = its backend count."""
    def load_map(fd: int) -> bytes:  # r1 = the map (a 16-byte load of its fd)
        return _insn(0x18, 1, 1, 0, fd) + _insn(0)

    done = 31  # the index of "r0 = 1; exit" (allow the connect, translated or not)
    code = [
        _insn(0xBF, 6, 1),                              # 0  r6 = r1
        _insn(0x61, 2, 6, _SOCK_STREAM_OFFSET),         # 1  r2 = ctx->type
        None,                                           # 2  if r2 != SOCK_STREAM goto done
        _insn(0xBF, 1, 6),                              # 3  r1 = r6
        _insn(0x85, imm=_NETNS_COOKIE),                 # 4  r0 = bpf_get_netns_cookie(ctx)
        _insn(0x7B, 10, 0, -8),                         # 5  *(u64 *)(fp - 8) = r0
        _insn(0xBF, 2, 10), _insn(0x07, 2, imm=-8),     # 6, 7  r2 = fp - 8
        load_map(namespaces_fd),                        # 8, 9
        _insn(0x85, imm=_LOOKUP),                       # 10 r0 = lookup(namespaces, cookie)
        None,                                           # 11 if r0 == 0 goto done
        _insn(0x61, 2, 6, _USER_IP4_OFFSET),            # 12 r2 = ctx->user_ip4
        _insn(0x63, 10, 2, -12),                        # 13 *(u32 *)(fp - 12) = r2
        _insn(0xBF, 2, 10), _insn(0x07, 2, imm=-12),    # 14, 15  r2 = fp - 12
        load_map(services_fd),                          # 16, 17
        _insn(0x85, imm=_LOOKUP),                       # 18 r0 = lookup(services, ip)
        None,                                           # 19 if r0 == 0 goto done
        _insn(0xBF, 7, 0),                              # 20 r7 = r0
        _insn(0x61, 8, 7, 0),                           # 21 r8 = value->count
        None,                                           # 22 if r8 == 0 goto done
        _insn(0xB7, 1, imm=1),                          # 23 r1 = 1
        _insn(0xC3, 7, 1, 4, 1),                        # 24 r1 = atomic_fetch_add(&value->turn, r1)
        _insn(0x9C, 1, 8),                              # 25 w1 %= w8
        _insn(0x54, 1, imm=MAX_BACKENDS - 1),           # 26 w1 &= 63 (for the verifier: within the array)
        _insn(0x67, 1, imm=2),                          # 27 r1 <<= 2
        _insn(0x0F, 7, 1),                              # 28 r7 += r1
        _insn(0x61, 1, 7, 8),                           # 29 r1 = value->backends[turn % count]
        _insn(0x63, 6, 1, _USER_IP4_OFFSET),            # 30 ctx->user_ip4 = r1
        _insn(0xB7, 0, imm=1),                          # 31 r0 = 1
        _insn(0x95),                                    # 32 exit
    ]
    flat: list[bytes | None] = []
    for item in code:  # a map load is two instructions
        flat += [item[:8], item[8:]] if item is not None and len(item) == 16 else [item]
    jumps = {2: (0x55, 2, 1), 11: (0x15, 0, 0), 19: (0x15, 0, 0), 22: (0x15, 8, 0)}  # code, register, value
    for index, (op, register, value) in jumps.items():
        flat[index] = _insn(op, register, 0, done - index - 1, value)
    return b"".join(item for item in flat if item is not None)


def _create_map(key_size: int, value_size: int, entries: int) -> int:
    return _bpf(_MAP_CREATE, struct.pack("<IIIII", _MAP_HASH, key_size, value_size, entries, 0))


def _load(code: bytes) -> int:
    instructions = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 16)
    attr = struct.pack("<IIQQIIQII16sII", _PROG_SOCK_ADDR, len(code) // 8, ctypes.addressof(instructions),
                       ctypes.addressof(license_), 1, len(log), ctypes.addressof(log), 0, 0, b"oak_connect4", 0,
                       _INET4_CONNECT)
    try:
        return _bpf(_PROG_LOAD, attr)
    except BalancerError as exc:
        raise BalancerError(exc.errno, f"{exc.strerror}: {log.value.decode(errors='replace')[-400:]}") from None


def _update(map_fd: int, key: bytes, value: bytes) -> None:
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value, len(value))
    _bpf(_MAP_UPDATE, struct.pack("<IIQQQ", map_fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))


def _delete(map_fd: int, key: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _bpf(_MAP_DELETE, struct.pack("<IIQ", map_fd, 0, ctypes.addressof(k)))
    except BalancerError as exc:
        if exc.errno != 2:  # ENOENT: not there, as wanted
            raise


def _maps_and_program(namespaces: int, service_ips: int) -> list[int]:
    """The two maps (holding up to *namespaces* and *service_ips* entries) and the program reading them,
    as file descriptors ``[namespaces map, services map, program]``; on failure none is left open."""
    fds: list[int] = []
    try:
        fds.append(_create_map(8, 4, namespaces))
        fds.append(_create_map(4, _VALUE.size, service_ips))
        fds.append(_load(_program(fds[0], fds[1])))
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def netns_cookie() -> int:
    """The cookie of the network namespace the calling thread is in."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        return int.from_bytes(probe.getsockopt(socket.SOL_SOCKET, 71, 8), "little")  # SO_NETNS_COOKIE


class SocketBalancer:
    """One worker's connect4 program on the instances' cgroup, and the maps it reads."""

    def __init__(self, cgroup: Path) -> None:
        self.cgroup = cgroup
        self.fds: list[int] = []
        self.services: dict[str, tuple[str, ...]] = {}

    def open(self) -> None:
        """Create the maps, load the program and attach it to the cgroup; BalancerError if the kernel says no."""
        try:
            self.cgroup.mkdir(parents=True, exist_ok=True)
            self.fds = _maps_and_program(MAX_NAMESPACES, MAX_SERVICE_IPS)
            self._namespaces, self._services, program = self.fds
            directory = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                self.fds.append(_bpf(_LINK_CREATE, struct.pack("<IIII", program, directory, _INET4_CONNECT, 0)))
            finally:
                os.close(directory)
        except OSError as exc:
            self.close()
            raise BalancerError(exc.errno, f"socket load balancing unavailable: {exc.strerror}") from None

    def set_services(self, services: dict[str, tuple[str, ...]]) -> None:
        """Make the map say *services* (service IP -> backend IPs); only what changed is written."""
        wanted = {ip: backends for ip, backends in services.items() if 0 < len(backends) <= MAX_BACKENDS}
        for ip in self.services.keys() - wanted.keys():
            _delete(self._services, socket.inet_aton(ip))
        for ip, backends in wanted.items():
            if self.services.get(ip) != backends:
                addresses = b"".join(socket.inet_aton(b) for b in backends)
                _update(self._services, socket.inet_aton(ip), _VALUE.pack(len(backends), 0, addresses))
        self.services = wanted

    def add_namespace(self, cookie: int) -> None:
        """Translate connections made in the network namespace with *cookie*."""
        _update(self._namespaces, cookie.to_bytes(8, "little"), b"\1\0\0\0")

    def remove_namespace(self, cookie: int) -> None:
        """Stop translating in the namespace with *cookie*."""
        _delete(self._namespaces, cookie.to_bytes(8, "little"))

    def close(self) -> None:
        """Detach the program and free the maps (closing the link detaches it)."""
        for fd in reversed(self.fds):
            os.close(fd)
        self.fds = []


def unavailable() -> str:
    """Why this kernel cannot run the program ("" when it can): loads it once, attached nowhere."""
    try:
        fds = _maps_and_program(1, 1)
    except OSError as exc:
        return f"the kernel refused the connect4 program: {exc.strerror}"
    for fd in fds:
        os.close(fd)
    return ""


def open_balancer(cgroup: Path | None) -> SocketBalancer | None:
    """A balancer attached to *cgroup* (the instances' cgroup v2 directory), or None, with the reason
    logged, where this host or kernel cannot have one: service IPs are then translated by nftables only."""
    if cgroup is None:
        log.info("no cgroup v2 mount: service IPs are translated by nftables only")
        return None
    balancer = SocketBalancer(cgroup)
    try:
        balancer.open()
    except BalancerError as exc:
        log.warning("%s; service IPs are translated by nftables only", exc.strerror)
        return None
    log.info("service IPs are translated at the socket (connect4 on %s)", cgroup)
    return balancer
