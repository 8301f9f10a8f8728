"""What the ``process`` and ``container`` runtimes share: an instance is a supervised child process.

The child (the command itself, or ``runc run`` for a container) runs in its own session with its
output appended to the instance's log. It does not die with the worker, so a worker killed with
``-9`` and restarted adopts it again by PID and start time. When the instance has a cgroup, its
limits are enforced there, its usage is read from there, an out-of-memory kill is reported as such,
and whatever is left in it is killed when the instance stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any, BinaryIO

import psutil

from plugins.runtimes.cgroups import ENTERING, Cgroup, group_name, until_execed
from plugins.runtimes.spares import REFILL_DELAY, WAITING, Spares, launch_line
from services.common.plugin_api import Exit, Handle, InstanceStats, LaunchSpec
from services.common.private import private_dir, private_opener

log = logging.getLogger(__name__)
POLL = 0.5
READY_TIMEOUT = 2.0
LOG_MAX_BYTES = 10 * 2**20
LOG_KEEP = 3


def describe(returncode: int) -> str:
    """Say how a process ended, from its return code."""
    if returncode < 0 or returncode > 128:
        number = -returncode if returncode < 0 else returncode - 128
        with contextlib.suppress(ValueError):
            name = signal.Signals(number).name
            return f"killed by signal {name}" if returncode < 0 else f"exited with code {returncode} ({name})"
    return f"exited with code {returncode}"


def rotate(path: Path) -> None:
    """Keep a log under LOG_MAX_BYTES: ``log`` -> ``log.1`` -> ... ``log.<LOG_KEEP>``."""
    if not path.exists() or path.stat().st_size < LOG_MAX_BYTES:
        return
    for i in range(LOG_KEEP - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{i + 1}"))
    path.replace(path.with_name(f"{path.name}.1"))


def open_log(spec: LaunchSpec) -> BinaryIO:
    """Create the instance's directories, rotate its log if it grew too big, and open it for appending."""
    private_dir(Path(spec.work_dir))
    path = Path(spec.log_path)
    private_dir(path.parent)
    rotate(path)
    return open(path, "ab", opener=private_opener)  # noqa: SIM115 - the caller closes it


class SupervisedRuntime:
    """Base of runtimes whose instance is one child process (plus its cgroup)."""

    name = "supervised"
    virtualizations: tuple[str, ...] = ()

    def __init__(self, data_dir: str, owner: str = "", spares: int = 0) -> None:
        self.data_dir = Path(data_dir)
        self.owner = owner  # the worker's name, in its instances' cgroup names (cgroups.group_name)
        # sandboxes made ahead of the starts that take them (spares.py); only where it makes the cgroups
        self.spares = Spares(owner, spares, self.data_dir) if spares and self.sandboxed else None
        self._children: dict[int, asyncio.subprocess.Process] = {}
        self._settling: dict[int, asyncio.Task[None]] = {}  # started instances not yet ready (see start)
        self._probes: dict[str, psutil.Process] = {}
        self._last: dict[str, tuple[float, float]] = {}

    # ---- what subclasses provide ----------------------------------------------------------------

    def command(self, spec: LaunchSpec) -> list[str]:
        """The argv of the supervised child."""
        raise NotImplementedError

    def environment(self, spec: LaunchSpec) -> dict[str, str]:
        """The child's environment."""
        return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8"}

    def limits(self, spec: LaunchSpec) -> tuple[int, float]:
        """The cgroup's memory limit (MB) and CPU quota (vCPUs): the SLA's, unless the runtime needs room."""
        return spec.memory_mb, spec.vcpus

    def makes_cgroup(self, virtualization: str) -> bool:
        """True when this runtime creates the cgroup of an instance of *virtualization* itself (and enters its
        child into it); False where the child makes its own (runc)."""
        return True

    def prepare(self, spec: LaunchSpec) -> None:
        """Get ready to start (e.g. unpack an image); raise RuntimeError with a readable reason."""

    async def terminate(self, handle: Handle) -> None:
        """Ask the instance to stop gracefully."""
        self._signal_group(handle.pid, signal.SIGTERM)

    async def kill(self, handle: Handle) -> None:
        """Stop the instance now."""
        self._signal_group(handle.pid, signal.SIGKILL)

    def cleanup(self, handle: Handle) -> None:
        """Remove what the instance left behind (bundles, state)."""

    def exec_command(self, handle: Handle, argv: tuple[str, ...]) -> list[str]:
        """The command that runs *argv* inside the instance behind *handle* (may block: it runs in a thread)."""
        return list(argv)

    # ---- the Runtime protocol ---------------------------------------------------------------------

    async def start(self, spec: LaunchSpec) -> Handle:
        """Start the instance's child process: in a spare sandbox when one is ready, else in a new one."""
        await asyncio.to_thread(self.prepare, spec)
        owned = self.makes_cgroup(spec.virtualization) and self.sandboxed
        memory_mb, vcpus = self.limits(spec)
        command, env = self.command(spec), self.environment(spec)
        with open_log(spec) as log_file:
            warm = await self._start_warm(spec, command, env, memory_mb) if owned else None
            child, cgroup = warm or await self._start_cold(spec, command, env, log_file, memory_mb, owned)
        if self.spares is not None:
            self.spares.fill(REFILL_DELAY)  # for the next start, once this one is reported
        # The instance runs (its sandbox's first process, as a container's init); what it still sets up on
        # its way to the command is awaited apart, and the CPU quota set then: stop waits for it.
        settling = asyncio.create_task(self._settle(child, cgroup, vcpus))
        self._settling[child.pid] = settling
        settling.add_done_callback(lambda _: self._settling.pop(child.pid, None))
        self._children[child.pid] = child
        try:
            started = psutil.Process(child.pid).create_time()
        except psutil.Error:
            started = 0.0
        return Handle(spec.iid, self.name, child.pid, started,
                      {"memory_mb": spec.memory_mb, "vcpus": vcpus,
                       "cgroup": cgroup.name if cgroup else self.group(spec.iid),
                       "own_cgroup": cgroup is not None, **self.remembered(spec)})

    async def _start_warm(self, spec: LaunchSpec, command: list[str], env: dict[str, str], memory_mb: int
                          ) -> tuple[asyncio.subprocess.Process, Cgroup] | None:
        """Start the instance by handing *command* to a spare sandbox (its group's memory limit set first;
        the spare opens the log itself); None when no spare is ready or this start cannot use one."""
        if self.spares is None:
            return None
        line = launch_line(command, env, spec.work_dir, spec.log_path)
        spare = self.spares.take() if line else None
        if spare is None or line is None:
            return None
        try:
            spare.cgroup.limit_memory(memory_mb)
        except OSError:
            await spare.remove()
            return None
        assert spare.child.stdin is not None
        spare.child.stdin.write(line)
        spare.child.stdin.close()
        await until_execed(spare.child, ENTERING, WAITING)  # it may still be entering its group
        return spare.child, spare.cgroup

    async def _start_cold(self, spec: LaunchSpec, command: list[str], env: dict[str, str], log_file: BinaryIO,
                          memory_mb: int, owned: bool) -> tuple[asyncio.subprocess.Process, Cgroup | None]:
        """Start the instance in a group made now (when *owned*), or none, its output going to *log_file*."""
        cgroup = Cgroup(self.group(spec.iid)) if owned else None
        if cgroup is not None:
            try:
                # Memory is limited from the command's first instruction; the CPU quota once the instance
                # is ready (_settle): under a quota of a tenth of a vCPU the runtime's own wrappers (the
                # shell entering the group, unshare, the namespace's init) took some 200 ms to reach the
                # command.
                cgroup.create(memory_mb, 0)
            except OSError as exc:
                raise RuntimeError(f"cannot create the cgroup: {exc}") from None
        try:
            child = await asyncio.create_subprocess_exec(
                *(cgroup.entered_by(command) if cgroup else command), cwd=spec.work_dir, env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True,
            )
        except OSError as exc:
            if cgroup:
                cgroup.remove()
            raise RuntimeError(f"cannot start: {exc}") from None
        if cgroup:  # the shell joins it before the command runs; the move is made here too, at once and on
            # the loop (the first move into a new group costs the kernel some 16 ms; left to the shell alone,
            # starts measured slower), and start returns once the shell has become the command, as it did
            # with a preexec_fn
            with contextlib.suppress(OSError):
                cgroup.add(child.pid)
            await until_execed(child, ENTERING)
        return child, cgroup

    async def close(self) -> None:
        """When the worker stops: remove the spare sandboxes (its instances are stopped by now)."""
        if self.spares is not None:
            await self.spares.close()

    def remembered(self, spec: LaunchSpec) -> dict[str, Any]:
        """What else the handle of *spec*'s instance keeps (for a restarted worker)."""
        return {}

    def group(self, iid: str) -> str:
        """The cgroup name of instance *iid* on this worker."""
        return group_name(iid, self.owner)

    @staticmethod
    def cgroup(handle: Handle) -> Cgroup:
        """The cgroup of the instance behind *handle* (named by its instance id alone before groups had
        their worker's name)."""
        return Cgroup(str(handle.data.get("cgroup") or handle.iid))

    async def _settle(self, child: asyncio.subprocess.Process, cgroup: Cgroup | None, vcpus: float) -> None:
        """Wait until the instance is :meth:`ready`, then set its CPU quota."""
        await self.ready(child)
        if cgroup is None:
            return
        try:
            cgroup.limit_cpu(vcpus)
        except OSError as exc:
            log.error("cannot set the CPU quota of %s (%s): stopping it", cgroup.name, exc)
            self._signal_group(child.pid, signal.SIGKILL)

    async def _settled(self, handle: Handle) -> None:
        """Return once the instance started as *handle* is past :meth:`ready` (at once for most)."""
        settling = self._settling.get(handle.pid)
        if settling is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(settling), READY_TIMEOUT)

    @property
    def sandboxed(self) -> bool:
        """True when instances get namespaces and cgroups (needs root)."""
        return os.geteuid() == 0

    def _same(self, handle: Handle) -> psutil.Process | None:
        """The live process behind *handle*, or None (gone, zombie, or the PID was reused)."""
        try:
            proc = psutil.Process(handle.pid)
            if abs(proc.create_time() - handle.started_at) > 0.05 or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None

    async def wait(self, handle: Handle) -> Exit:
        """Wait for the instance to end; say why it ended, out-of-memory kills included."""
        child = self._children.get(handle.pid)
        if child is not None:
            code: int | None = await child.wait()
            self._children.pop(handle.pid, None)
            reason = describe(code) if code is not None else "ended"
        else:
            while self._same(handle) is not None:
                await asyncio.sleep(POLL)
            code, reason = None, "exited while the worker was away (exit code unknown)"
        self._probes.pop(handle.iid, None)
        usage = self.cgroup(handle).usage()
        if usage is not None and usage.oom_kills:
            reason = f"out of memory: killed at its {handle.data.get('memory_mb', '?')} MB limit ({reason})"
        await asyncio.to_thread(self._release, handle)
        return Exit(code, reason)

    def _release(self, handle: Handle) -> None:
        self.cleanup(handle)
        cgroup = self.cgroup(handle)
        if cgroup.exists():
            cgroup.remove()

    async def stop(self, handle: Handle, grace: float) -> None:
        """Ask the instance to stop, kill it after *grace* seconds, and remove what it leaves."""
        if self._same(handle) is not None:
            await self._settled(handle)  # a TERM before the instance is ready could be lost
            await self.terminate(handle)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            while self._same(handle) is not None and loop.time() < deadline:
                await asyncio.sleep(0.05)
            if self._same(handle) is not None:
                await self.kill(handle)
            child = self._children.get(handle.pid)
            if child is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(child.wait(), 5)
            while self._same(handle) is not None:
                await asyncio.sleep(0.05)
        await asyncio.to_thread(self._release, handle)

    async def exec(self, handle: Handle, argv: tuple[str, ...], timeout: float) -> Exit:
        """Run *argv* inside the instance (see :meth:`exec_command`); kill it after *timeout* seconds."""
        command = await asyncio.to_thread(self.exec_command, handle, argv)
        try:
            child = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True, env={"PATH": os.environ.get("PATH", "")})
        except OSError as exc:
            return Exit(None, f"cannot run: {exc.strerror or exc}")
        try:
            async with asyncio.timeout(timeout):
                output, _ = await child.communicate()
        except TimeoutError:
            self._signal_group(child.pid, signal.SIGKILL)
            await child.wait()
            return Exit(None, f"did not end within {timeout:g} s")
        except asyncio.CancelledError:
            self._signal_group(child.pid, signal.SIGKILL)
            raise
        said = output.decode(errors="replace").strip()[-200:]
        code = child.returncode
        return Exit(code, describe(code if code is not None else -9) + (f": {said}" if said else ""))

    async def ready(self, child: asyncio.subprocess.Process) -> None:
        """Return once the instance can be stopped as :meth:`terminate` stops it (a wrapper of the command
        has set up its signal handling), at most READY_TIMEOUT after :meth:`start`; until then
        :meth:`stop` waits, and the CPU quota is not set (the wrappers start at full speed). Nothing to
        wait for here."""

    @staticmethod
    def _signal_group(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)

    async def adopt(self, handle: Handle) -> bool:
        """True when the instance of a previous worker run still runs (its CPU quota set again, in case that
        run ended before it was)."""
        running = self._same(handle) is not None
        vcpus = handle.data.get("vcpus")
        owned = handle.data.get("own_cgroup", self.makes_cgroup(""))  # handles of older workers lack it
        if running and vcpus and handle.pid not in self._children and owned and self.sandboxed:
            with contextlib.suppress(OSError, ValueError, TypeError):
                self.cgroup(handle).limit_cpu(float(vcpus))
        return running

    async def stats(self, handle: Handle) -> InstanceStats | None:
        """CPU, memory and disk I/O of the instance: from its cgroup when it has one, else (CPU and memory
        only) from its processes."""
        usage = self.cgroup(handle).usage()
        if usage is not None:
            previous = self._last.get(handle.iid)
            self._last[handle.iid] = (usage.cpu_seconds, usage.at)
            cpu = 0.0
            if previous and usage.at > previous[1]:
                cpu = 100.0 * (usage.cpu_seconds - previous[0]) / (usage.at - previous[1])
            return InstanceStats(round(cpu, 1), round(usage.memory_bytes / 2**20, 1), round(usage.io_bytes / 2**20, 1))
        proc = self._probes.get(handle.iid)
        if proc is None or proc.pid != handle.pid:
            proc = self._same(handle)
            if proc is None:
                return None
            self._probes[handle.iid] = proc
        try:
            procs = [proc, *proc.children(recursive=True)]
            cpu = sum(p.cpu_percent(interval=None) for p in procs)
            memory = sum(p.memory_info().rss for p in procs) / 2**20
        except psutil.Error:
            return None
        return InstanceStats(round(cpu, 1), round(memory, 1))
