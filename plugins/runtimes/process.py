"""The ``process`` runtime: an instance is a plain OS process in its own process group.

Its stdout and stderr go to the instance's log file; it does not die with the worker (no
``PR_SET_PDEATHSIG``), so a worker killed with ``-9`` and restarted adopts it again by PID and start
time. Namespaces and cgroup limits for this runtime come with the runtimes issue; here memory and
vcpus are used by the schedulers for placement only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any, BinaryIO

import psutil

from services.common.hookspecs import Exit, Handle, InstanceStats, LaunchSpec, hookimpl

NAME = "process"
POLL = 0.5
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _open_log(spec: LaunchSpec) -> BinaryIO:
    """Create the instance's directories and open its log for appending."""
    Path(spec.work_dir).mkdir(parents=True, exist_ok=True)
    Path(spec.log_path).parent.mkdir(parents=True, exist_ok=True)
    return open(spec.log_path, "ab")  # noqa: SIM115 - the caller closes it


class ProcessRuntime:
    """Runs instances as OS processes."""

    name = NAME
    virtualizations = ("process",)

    def __init__(self, data_dir: str) -> None:
        self.data_dir = Path(data_dir)
        self._children: dict[int, asyncio.subprocess.Process] = {}
        self._probes: dict[str, psutil.Process] = {}

    async def start(self, spec: LaunchSpec) -> Handle:
        """Start ``spec.cmd`` with its environment, logging to ``spec.log_path``."""
        if not spec.cmd:
            raise RuntimeError("no cmd to run")
        env = {**BASE_ENV, "HOME": spec.work_dir, "HOSTNAME": f"instance-{spec.instance_number}"}
        env.update(entry.split("=", 1) for entry in spec.environment if "=" in entry)  # type: ignore[misc]
        with _open_log(spec) as log:
            try:
                child = await asyncio.create_subprocess_exec(
                    *spec.cmd, cwd=spec.work_dir, env=env, stdin=asyncio.subprocess.DEVNULL,
                    stdout=log, stderr=log, start_new_session=True,
                )
            except OSError as exc:
                raise RuntimeError(f"cannot start: {exc}") from None
        self._children[child.pid] = child
        try:
            started = psutil.Process(child.pid).create_time()
        except psutil.Error:
            started = 0.0
        return Handle(spec.iid, NAME, child.pid, started)

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
        """Wait for the process to end."""
        child = self._children.get(handle.pid)
        if child is not None:
            code = await child.wait()
            self._children.pop(handle.pid, None)
            self._probes.pop(handle.iid, None)
            return Exit(code, _describe(code))
        while self._same(handle) is not None:
            await asyncio.sleep(POLL)
        self._probes.pop(handle.iid, None)
        return Exit(None, "exited while the worker was away (exit code unknown)")

    async def stop(self, handle: Handle, grace: float) -> None:
        """SIGTERM the process group, SIGKILL it after *grace* seconds."""
        if self._same(handle) is None:
            return
        self._signal_group(handle.pid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while loop.time() < deadline:
            if self._same(handle) is None:
                break
            await asyncio.sleep(0.05)
        else:
            self._signal_group(handle.pid, signal.SIGKILL)
        child = self._children.get(handle.pid)
        if child is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(child.wait(), 5)
        while self._same(handle) is not None:
            await asyncio.sleep(0.05)

    @staticmethod
    def _signal_group(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)

    async def adopt(self, handle: Handle) -> bool:
        """True when the process of a previous worker run still runs."""
        return self._same(handle) is not None

    async def stats(self, handle: Handle) -> InstanceStats | None:
        """CPU and memory of the process and its children."""
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


@hookimpl
def oak_make_runtime(name: str, config: dict[str, Any]) -> ProcessRuntime | None:
    """Build the process runtime when asked for it by name."""
    return ProcessRuntime(data_dir=config["data_dir"]) if name == NAME else None
