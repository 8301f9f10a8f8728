"""The ``process`` runtime: a command in its own PID, mount, UTS and IPC namespaces, with cgroup limits.

As root, the command runs under ``unshare --pid --mount --uts --ipc --fork --mount-proc`` in its own
cgroup (memory limit = the SLA's ``memory`` MB, CPU quota = its ``vcpus``), behind a tiny shell init
that passes SIGTERM on (a PID 1 without a handler would ignore it) and exits with the command's status.
Without root it degrades, with a warning, to a plain process in its own session: no namespaces and
no limits. With the overlay network the command also runs in the instance's network namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import psutil

from plugins.runtimes import nvidia
from plugins.runtimes.cgroups import cmdline
from plugins.runtimes.supervised import READY_TIMEOUT, SupervisedRuntime
from services.common.plugin_api import Handle, LaunchSpec, hookimpl

log = logging.getLogger(__name__)
NAME = "process"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# PID 1 of the namespace: forward TERM/INT to the command, then exit with the command's status.
INIT = (
    'trap \'kill -TERM "$child" 2>/dev/null\' TERM INT; '
    '"$@" & child=$!; '
    'wait "$child"; status=$?; '
    'while kill -0 "$child" 2>/dev/null; do wait "$child"; status=$?; done; '
    'exit "$status"'
)


def _children(pid: int) -> list[int]:
    """The children of single-threaded process *pid*: from procfs directly (a few microseconds; psutil's
    ``children()`` scans every process, some 2 ms, polled here every millisecond)."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:  # a kernel without CONFIG_PROC_CHILDREN, or the process is gone
        return [p.pid for p in psutil.Process(pid).children()] if psutil.pid_exists(pid) else []
    except OSError:
        return []


def _runs_command(pid: int) -> bool:
    """Whether unshare *pid* (or nsenter become unshare) has an init shell whose child has exec'd the
    command. A TERM to the child between its fork and its exec is lost: it still holds the init's trap,
    which it drops at the exec (and the init does not know the child's PID yet)."""
    for init in _children(pid):
        shell = cmdline(init)
        if any(cmdline(command) not in (shell, b"", None) for command in _children(init)):
            return True
    return False


def _mounts(spec: LaunchSpec) -> str:
    """Shell lines for the namespace's init: each volume bind-mounted where the SLA says, and each secret
    file read-only, inside the instance's own mount namespace (the mount point, made on the worker when
    missing, is an empty directory or file; the mount itself is the instance's alone)."""
    lines = []
    for source, target in spec.volumes:
        src, dst = shlex.quote(source), shlex.quote(target)
        lines.append(f"mkdir -p {dst} && mount --bind {src} {dst} || exit 126; ")
    for source, target in spec.secret_files:
        src, dst = shlex.quote(source), shlex.quote(target)
        lines.append(f'mkdir -p "$(dirname {dst})" && {{ [ -e {dst} ] || : > {dst}; }} && '
                     f"mount --bind {src} {dst} && mount -o remount,bind,ro {dst} || exit 126; ")
    return "".join(lines)


class ProcessRuntime(SupervisedRuntime):
    """Runs instances as sandboxed OS processes."""

    name = NAME
    virtualizations = ("process",)

    def __init__(self, data_dir: str, owner: str = "", spares: int = 0) -> None:
        super().__init__(data_dir, owner, spares)
        if not self.sandboxed:
            log.warning("process runtime: not running as root, so instances get no namespaces and no "
                        "memory/CPU limits")
        elif shutil.which("unshare") is None:
            log.warning("process runtime: unshare (util-linux) is missing; instances get no namespaces")

    @property
    def namespaced(self) -> bool:
        """Whether instances get their own namespaces (root, and unshare installed)."""
        return self.sandboxed and shutil.which("unshare") is not None

    def command(self, spec: LaunchSpec) -> list[str]:
        """The command, inside new namespaces behind the shell init when sandboxed."""
        if not spec.cmd:
            raise RuntimeError("no cmd to run")
        if not self.namespaced:
            return list(spec.cmd)
        enter = ["nsenter", f"--net={spec.netns}"] if spec.netns else []
        return [*enter, "unshare", "--pid", "--mount", "--uts", "--ipc", "--fork", "--mount-proc", "--",
                "/bin/sh", "-c", _mounts(spec) + INIT, "oak-init", *spec.cmd]

    async def ready(self, child: asyncio.subprocess.Process) -> None:
        """Return once the namespace's init runs the command, and so has its TERM handler: a PID 1 without
        one ignores TERM, so a stop right after start would otherwise wait for the SIGKILL."""
        if not self.namespaced:
            return
        with contextlib.suppress(TimeoutError, psutil.Error):
            async with asyncio.timeout(READY_TIMEOUT):
                while child.returncode is None and not _runs_command(child.pid):
                    await asyncio.sleep(0.001)

    def exec_command(self, handle: Handle, argv: tuple[str, ...]) -> list[str]:
        """*argv* entered into the namespaces of the instance's init (sandboxed), else as it is."""
        if not self.namespaced:
            return list(argv)
        deadline = time.monotonic() + READY_TIMEOUT  # unshare forks the init right after start
        while not (init := next(iter(_children(handle.pid)), 0)) and time.monotonic() < deadline:
            time.sleep(0.01)
        if not init:
            raise RuntimeError("the instance has no init process")
        return ["nsenter", f"--target={init}", "--pid", "--mount", "--uts", "--ipc", "--net", "--", *argv]

    def environment(self, spec: LaunchSpec) -> dict[str, str]:
        """A minimal environment plus the SLA's, with HOSTNAME=instance-<n>."""
        env = {"PATH": BASE_PATH, "LANG": "C.UTF-8", "HOME": spec.work_dir,
               "HOSTNAME": f"instance-{spec.instance_number}"}
        env.update(entry.split("=", 1) for entry in (*spec.environment, *spec.secret_env)  # type: ignore[misc]
                   if "=" in entry)
        return env | nvidia.environment(spec.gpus)

    def prepare(self, spec: LaunchSpec) -> None:
        """Refuse an empty command before anything is created."""
        if not spec.cmd:
            raise RuntimeError("no cmd to run")
        if shutil.which(spec.cmd[0], path=BASE_PATH) is None:  # inside the sandbox it would only exit 127
            raise RuntimeError(f"cannot start: [Errno 2] No such file or directory: {spec.cmd[0]!r}")
        if (spec.secret_files or spec.volumes) and not self.namespaced:
            raise RuntimeError("secret files and volumes need the sandbox (root and unshare): they are mounted "
                               "in the instance's own mount namespace")


@hookimpl
def oak_make_runtime(name: str, config: dict[str, Any]) -> ProcessRuntime | None:
    """Build the process runtime when asked for it by name (with ``spares`` sandboxes made ahead of starts,
    when the config asks for them: a worker does)."""
    if name != NAME:
        return None
    return ProcessRuntime(data_dir=config["data_dir"], owner=str(config.get("node", "")),
                          spares=int(config.get("spares", 0)))
