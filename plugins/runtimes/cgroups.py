"""Per-instance cgroups: memory and CPU limits, usage, throttling and OOM kills, on cgroup v1 or v2.

Groups live under the worker's own cgroup, in ``oakling/<instance id>`` (relative paths, as runc's
``cgroupsPath`` without a leading slash), so they nest inside whatever the worker was given and runc
and this module agree on where a container's group is. On a hybrid host (v1 controllers beside a
cgroup v2 mount, usually ``/sys/fs/cgroup/unified``) an instance also joins ``oakling/<instance id>``
there, as runc's containers do: the worker's socket load balancing hangs off that v2 tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PARENT = "oakling"
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")
V1_OPTIONAL = ("blkio",)  # disk I/O accounting, where the controller is mounted
CPU_PERIOD_US = 100_000


def version() -> int | None:
    """2 for a unified hierarchy with the memory and cpu controllers, 1 for v1 controllers, None if neither."""
    controllers = ROOT / "cgroup.controllers"
    if controllers.exists() and {"memory", "cpu"} <= set(controllers.read_text().split()):
        return 2
    if (ROOT / "memory" / "memory.limit_in_bytes").exists() and (ROOT / "cpu").exists():
        return 1
    return None


def process_path(controller: str, pid: int | str = "self") -> str:
    """The cgroup path of process *pid* (this one by default) for *controller* ('' for the unified hierarchy),
    relative to the hierarchy's root."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if (controller == "" and names == "") or controller in names.split(","):
            return path.lstrip("/")
    return ""


def cgroup2_mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup``, or ``.../unified`` on a hybrid host)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "cgroup2":
            return Path(fields[4])
    return None


def instances_cgroup2() -> Path | None:
    """The cgroup v2 directory holding every instance's group (None without a cgroup v2 mount)."""
    mount = cgroup2_mount()
    return mount / process_path("") / PARENT if mount else None


def group_name(iid: str, owner: str = "") -> str:
    """The group of instance *iid* on worker *owner*: ``<owner>.<iid>``, so two workers on one host (tests,
    simulations, or an instance replaced while its original still runs) never share, or empty, one group."""
    return f"{owner}.{iid}" if owner else iid


def relative_path(name: str) -> str:
    """The group of *name* relative to the worker's own cgroup (runc's ``cgroupsPath``)."""
    return f"{PARENT}/{name}"


def absolute_path(name: str) -> str | None:
    """The group of *name* as one absolute path, when the worker sits at the same place in every
    hierarchy it uses (so a runtime started by someone else, e.g. a system containerd, puts the
    group where :class:`Cgroup` looks); None when it does not."""
    if version() == 2:
        return "/" + "/".join(p for p in (process_path(""), relative_path(name)) if p)
    own = {process_path(c) for c in V1_CONTROLLERS + tuple(c for c in V1_OPTIONAL if (ROOT / c).exists())}
    if len(own) != 1:
        return None
    return "/" + "/".join(p for p in (own.pop(), relative_path(name)) if p)


@dataclass(frozen=True)
class Usage:
    """A reading of a group: total CPU time, memory in use, throttled periods and OOM kills so far, and
    bytes read from and written to block devices (0 where the kernel does not account them)."""

    cpu_seconds: float
    memory_bytes: int
    throttled: int
    oom_kills: int
    at: float
    io_bytes: int = 0


# sh -c ENTER_SCRIPT oak-cgroup N PROCS_1 .. PROCS_N COMMAND...: join the groups, then become COMMAND.
ENTER_SCRIPT = ('n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || { echo "oak: cannot enter the cgroup $1" >&2; '
                'exit 125; }; shift; n=$((n - 1)); done; exec "$@"')
ENTERING_ARGS = ("/bin/sh", "-c", ENTER_SCRIPT, "oak-cgroup")
ENTERING = "\0".join(ENTERING_ARGS).encode()  # how /proc/<pid>/cmdline starts while the shell has not exec'd
BECOME_TIMEOUT = 2.0  # seconds one of the runtime's shells may take to exec the command it was given


def cmdline(pid: int) -> bytes | None:
    """The command line of *pid* as procfs has it (NUL-separated; empty between two programs, or ended and
    not yet reaped); None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


async def until_execed(child: asyncio.subprocess.Process, *shells: bytes, timeout: float = BECOME_TIMEOUT) -> None:
    """Wait until *child*, whose command line starts with one of *shells* while it is one of the runtime's
    shells, has exec'd what that shell runs (or ended). An empty command line is a process between two
    programs (or ended, not yet reaped): waited for too."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while child.returncode is None and (line := cmdline(child.pid)) is not None \
                    and (not line or line.startswith(shells)):
                await asyncio.sleep(0.0005)


class Cgroup:
    """The cgroup of one instance."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.version = version()
        if self.version == 2:
            self.dirs = {"": ROOT / process_path("") / relative_path(name)}
        elif self.version == 1:
            controllers = V1_CONTROLLERS + tuple(c for c in V1_OPTIONAL if (ROOT / c).exists())
            self.dirs = {c: ROOT / c / process_path(c) / relative_path(name) for c in controllers}
            unified = instances_cgroup2()
            if unified is not None:
                self.dirs["unified"] = unified / name
        else:
            self.dirs = {}

    def _file(self, controller: str, v1: str, v2: str) -> Path:
        return self.dirs[""] / v2 if self.version == 2 else self.dirs[controller] / v1

    def create(self, memory_mb: int, vcpus: float) -> None:
        """Create the group with a memory limit (MB, 0 = none) and a CPU quota (vCPUs, 0 = none)."""
        if self.version is None:
            raise OSError("no usable cgroup hierarchy (need v1 memory+cpu or v2 with them enabled)")
        if self.version == 2:
            parent = self.dirs[""].parent
            parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                (parent / "cgroup.subtree_control").write_text("+memory +cpu +pids")
            with contextlib.suppress(OSError):  # disk I/O accounting, where the io controller is available
                (parent / "cgroup.subtree_control").write_text("+io")
        for path in self.dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        self.limit_memory(memory_mb)
        self.limit_cpu(vcpus)

    def limit_memory(self, memory_mb: int) -> None:
        """Set the group's memory limit (MB, 0 = none), swap included."""
        if not memory_mb:
            return
        limit = str(memory_mb * 2**20)
        self._file("memory", "memory.limit_in_bytes", "memory.max").write_text(limit)
        if self.version == 1:
            with contextlib.suppress(OSError):  # absent without swap accounting
                (self.dirs["memory"] / "memory.memsw.limit_in_bytes").write_text(limit)
        else:
            with contextlib.suppress(OSError):
                (self.dirs[""] / "memory.swap.max").write_text("0")

    def limit_cpu(self, vcpus: float) -> None:
        """Set the group's CPU quota (vCPUs, 0 = none)."""
        if not vcpus:
            return
        quota = max(1000, int(vcpus * CPU_PERIOD_US))
        if self.version == 2:
            (self.dirs[""] / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
        else:
            (self.dirs["cpu"] / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            (self.dirs["cpu"] / "cpu.cfs_quota_us").write_text(str(quota))

    def cpu_limit(self) -> float:
        """The group's CPU quota in vCPUs (0.0: none)."""
        try:
            if self.version == 2:
                quota, period = (self.dirs[""] / "cpu.max").read_text().split()
            else:
                quota = (self.dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip()
                period = (self.dirs["cpu"] / "cpu.cfs_period_us").read_text().strip()
        except (OSError, ValueError):
            return 0.0
        return 0.0 if quota in ("max", "-1") else int(quota) / int(period)

    def add(self, pid: int) -> None:
        """Move process *pid* into the group."""
        for path in self.dirs.values():
            (path / "cgroup.procs").write_text(str(pid))

    def entered_by(self, command: list[str]) -> list[str]:
        """*command*, run by a shell that first moves itself into the group, so the group's limits hold from
        the command's first instruction (SupervisedRuntime.start sets the CPU quota later). A ``preexec_fn``
        would do the same, but it makes every start a fork of the whole worker (some 10 ms of the event loop
        each); a shell is spawned with vfork. A group the shell cannot enter ends it with status 125, saying
        why in the instance's log."""
        procs = [str(path / "cgroup.procs") for path in self.dirs.values()]
        return [*ENTERING_ARGS, str(len(procs)), *procs, *command]

    def exists(self) -> bool:
        """True while any of the group's directories exists."""
        return any(path.exists() for path in self.dirs.values())

    def usage(self) -> Usage | None:
        """Read the group, or None when it is gone."""
        try:
            if self.version == 2:
                cpu = dict(line.split() for line in (self.dirs[""] / "cpu.stat").read_text().splitlines())
                events = dict(line.split() for line in (self.dirs[""] / "memory.events").read_text().splitlines())
                return Usage(int(cpu["usage_usec"]) / 1e6, int((self.dirs[""] / "memory.current").read_text()),
                             int(cpu.get("nr_throttled", 0)), int(events.get("oom_kill", 0)), time.monotonic(),
                             self._io_bytes())
            cpu_ns = int((self.dirs["cpuacct"] / "cpuacct.usage").read_text())
            stat = dict(line.split() for line in (self.dirs["cpu"] / "cpu.stat").read_text().splitlines())
            oom = dict(line.split() for line in (self.dirs["memory"] / "memory.oom_control").read_text().splitlines())
            memory = int((self.dirs["memory"] / "memory.usage_in_bytes").read_text())
            return Usage(cpu_ns / 1e9, memory, int(stat.get("nr_throttled", 0)), int(oom.get("oom_kill", 0)),
                         time.monotonic(), self._io_bytes())
        except (OSError, KeyError, ValueError):
            return None

    def _io_bytes(self) -> int:
        """Bytes read from and written to storage by the group: v2 ``io.stat`` (rbytes + wbytes), v1
        ``blkio.throttle.io_service_bytes`` (Read + Write); where v1 accounts nothing (recent kernels
        count only throttled groups there), the I/O accounting of the group's processes (their
        ``/proc/<pid>/io``, which includes the children they reaped)."""
        with contextlib.suppress(OSError, ValueError):
            if self.version == 2:
                return sum(int(value) for line in (self.dirs[""] / "io.stat").read_text().splitlines()
                           for key, _, value in (field.partition("=") for field in line.split()[1:])
                           if key in ("rbytes", "wbytes"))
            if "blkio" in self.dirs:
                counted = sum(int(parts[2]) for line in
                              (self.dirs["blkio"] / "blkio.throttle.io_service_bytes").read_text().splitlines()
                              if len(parts := line.split()) == 3 and parts[1] in ("Read", "Write"))
                if counted:
                    return counted
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError, ValueError, KeyError):
                fields = dict(line.split(": ", 1) for line in Path(f"/proc/{pid}/io").read_text().splitlines())
                total += int(fields["read_bytes"]) + int(fields["write_bytes"])
        return total

    def pids(self) -> list[int]:
        """Processes still in the group."""
        path = next(iter(self.dirs.values()), None)
        try:
            return [int(p) for p in (path / "cgroup.procs").read_text().split()] if path else []
        except OSError:
            return []

    def remove(self) -> None:
        """Kill what is left in the group and delete it."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        for path in self.dirs.values():
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
