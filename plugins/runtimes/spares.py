"""Spare sandboxes: a cgroup with a shell already in it, made before a start needs it.

Moving a process into a new cgroup makes the kernel wait for an RCU grace period the first time after a
quiet spell (see BENCHMARKS.md, issue 15's point 5): on a worker whose starts come one at a time, that is
most of an instance's start, and it sat on the path of every deploy. A spare is a shell that entered a
group of its own ahead of time and waits on a pipe for one line. A start that takes it sets the group's
memory limit, then writes the line: send the output to the instance's log, enter its work directory,
export its environment (through the pipe, never in an argv anyone can read) and ``exec`` its command.
The shell becomes the instance as the cold path's does, with the same PID, session and group; the pool
then makes the next spare in the background.

A worker that dies leaves its spares reading a pipe nobody writes: they exit, and the next run of a
worker of that name removes their empty groups.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import shlex
import signal
from dataclasses import dataclass
from pathlib import Path

from plugins.runtimes.cgroups import ENTERING, Cgroup, cmdline, group_name, until_execed

log = logging.getLogger(__name__)

# sh -c WAIT_SCRIPT oak-spare: read one line and run it (it ends with the exec of the instance's command).
WAIT_SCRIPT = 'IFS= read -r line || exit 0; eval "$line"'
WAIT_ARGS = ("/bin/sh", "-c", WAIT_SCRIPT, "oak-spare")
WAITING = "\0".join(WAIT_ARGS).encode()  # how /proc/<pid>/cmdline starts while the spare waits
SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MADE_TIMEOUT = 10.0  # seconds a new spare's shell may take to enter its group (nothing waits for it)
# Seconds after a start before the next spare is made: making one (a fork, a move into a new group) beside
# the start's last steps (its status written and reported) slowed those by as much as the spare saved.
REFILL_DELAY = 0.1


def launch_line(command: list[str], env: dict[str, str], work_dir: str, log_path: str) -> bytes | None:
    """The line a spare runs to become the instance: its log, its directory, exactly *env* (and ``PWD``, as
    the shell that enters a new group gives the cold path's), then *command*.
    None when a shell could not say it on one line (a variable name a shell cannot export, a newline in a
    value or an argument): that start takes the cold path."""
    parts = [*command, *env.values(), work_dir, log_path]
    if not all(SHELL_NAME.fullmatch(name) for name in env) or any("\n" in part for part in parts):
        return None
    exports = "".join(f"export {name}={shlex.quote(value)}; " for name, value in env.items())
    return (f"exec </dev/null >>{shlex.quote(log_path)} 2>&1; cd -- {shlex.quote(work_dir)} || exit 125; "
            f"unset OLDPWD; {exports}exec {shlex.join(command)}\n").encode()


def _waiting(pid: int) -> bool:
    """True when *pid* is a spare's shell still waiting for its line (or is gone)."""
    line = cmdline(pid)
    return line is None or line.startswith(WAITING)


@dataclass
class Spare:
    """A shell waiting in a group of its own."""

    cgroup: Cgroup
    child: asyncio.subprocess.Process

    def end(self) -> None:
        """Close its pipe and kill the shell if it still runs."""
        if self.child.stdin is not None:
            self.child.stdin.close()
        if self.child.returncode is None:  # not reaped: its PID is still its own
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.child.pid, signal.SIGKILL)

    async def remove(self) -> None:
        """End the shell, wait for it, and delete its group."""
        self.end()
        await self.child.wait()
        await asyncio.to_thread(self.cgroup.remove)


class Spares:
    """Up to *count* spares for the worker *owner* whose data is in *data_dir*, made one at a time in the
    background."""

    def __init__(self, owner: str, count: int, data_dir: Path) -> None:
        self.owner = owner
        self.count = count
        # Which worker's spares a sweep may remove: this one's earlier runs' (the same name and data), never
        # those of another worker of the same name on the host (tests, simulations)
        self.scope = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:8]
        self._ready: list[Spare] = []
        self._making: asyncio.Task[None] | None = None
        self._swept = False

    @property
    def prefix(self) -> str:
        """How the names of this worker's spare groups begin."""
        return group_name(f"spare-{self.scope}-", self.owner)

    def take(self) -> Spare | None:
        """A spare to become an instance, or None (none ready); :meth:`fill` makes the next."""
        while self._ready:
            spare = self._ready.pop()
            if spare.child.returncode is None:
                return spare
            spare.end()
            spare.cgroup.remove()  # it ended: nothing in it to wait for
        return None

    def fill(self, after: float = 0.0) -> None:
        """Start making spares until there are *count* (in *after* seconds), unless that is under way."""
        if self.count > len(self._ready) and (self._making is None or self._making.done()):
            self._making = asyncio.get_running_loop().create_task(self._make(after))

    async def _make(self, after: float) -> None:
        try:
            await asyncio.sleep(after)
            if not self._swept:
                self._swept = True
                await asyncio.to_thread(self.sweep)
            while len(self._ready) < self.count:
                spare = await self._spawn(Cgroup(f"{self.prefix}{secrets.token_hex(4)}"))
                if spare is None:
                    return  # starts take the cold path, which says why it fails if it does
                self._ready.append(spare)
        except OSError as exc:
            log.warning("no spare sandbox (starts make their sandbox as they go): %s", exc)

    async def _spawn(self, cgroup: Cgroup) -> Spare | None:
        try:
            await asyncio.to_thread(cgroup.create, 0, 0)
            child = await asyncio.create_subprocess_exec(
                *cgroup.entered_by(list(WAIT_ARGS)), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, env={}, cwd="/", start_new_session=True)
        except OSError as exc:
            log.warning("no spare sandbox (starts make their sandbox as they go): %s", exc)
            await asyncio.to_thread(cgroup.remove)
            return None
        spare = Spare(cgroup, child)
        await until_execed(child, ENTERING, timeout=MADE_TIMEOUT)
        if child.returncode is not None or not _waiting(child.pid) or not cgroup.pids():
            log.warning("no spare sandbox (starts make their sandbox as they go): its shell could not enter %s",
                        cgroup.name)
            await spare.remove()
            return None
        return spare

    async def filled(self) -> None:
        """Make spares until there are *count*, and return once they are ready (or could not be made)."""
        self.fill()
        if self._making is not None:
            await asyncio.shield(self._making)

    def sweep(self) -> None:
        """Remove the groups of spares an earlier run of this worker left behind: empty, or holding only a
        waiting shell. A spare taken by an instance keeps its name, and its group is left alone: the
        instance runs there, and a restarted worker adopts it."""
        parent = next(iter(Cgroup(self.prefix).dirs.values()), None)
        if parent is None or not parent.parent.is_dir():
            return
        for path in parent.parent.iterdir():
            if path.is_dir() and path.name.startswith(self.prefix):
                group = Cgroup(path.name)
                if all(_waiting(pid) for pid in group.pids()):
                    group.remove()

    async def close(self) -> None:
        """Stop making spares (the one being made is finished) and remove those made."""
        self.count = 0
        if self._making is not None:
            with contextlib.suppress(Exception):
                await self._making
        ready, self._ready = self._ready, []
        for spare in ready:
            await spare.remove()
