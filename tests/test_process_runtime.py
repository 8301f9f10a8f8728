"""The ``process`` runtime through its Runtime protocol, with real processes: start, logs, exit codes,
environment, stop (also of a process ignoring SIGTERM), adoption by a restarted worker, and loading by name.

These run with or without root: as root the instance is sandboxed (namespaces, cgroup), which shows in
how a stopped instance ends (its init exits with 128+signal rather than dying of the signal itself).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

import plugins.runtimes.process as process_module
from plugins.runtimes.cgroups import Cgroup
from plugins.runtimes.process import ProcessRuntime
from services.common import plugins
from services.common.plugin_api import Exit, Handle, LaunchSpec, Runtime
from tests.stack import eventually

pytestmark = pytest.mark.timeout(60)
counter = iter(range(10_000))


class Started:
    """The runtime under test plus every handle it started, all stopped at the end of the test. *warm*: each
    start takes a spare sandbox (made before it), as a worker's usually do."""

    def __init__(self, tmp_path: Path, warm: bool = False) -> None:
        self.tmp_path = tmp_path
        # a worker's name of its own: a runtime sweeps the spares its worker's earlier runs left
        self.rt = ProcessRuntime(str(tmp_path / "data"), f"t{os.getpid()}" if warm else "", spares=1 if warm else 0)
        self.warm = warm
        self.handles: list[Handle] = []

    def spec(self, cmd: list[str], env: tuple[str, ...] = (), number: int = 1) -> LaunchSpec:
        iid = f"p{os.getpid()}x{next(counter)}"
        return LaunchSpec(iid, "app.ns.svc.ns", number, "process", "", tuple(cmd), env, 0, 0.0, False,
                          str(self.tmp_path / "logs" / "deep" / f"{iid}.log"), str(self.tmp_path / "work" / iid))

    async def start(self, spec: LaunchSpec) -> Handle:
        if self.rt.spares is not None:
            await self.rt.spares.filled()
        handle = await self.rt.start(spec)
        self.handles.append(handle)
        return handle

    def took_a_spare(self, handle: Handle) -> bool:
        """Whether *handle*'s instance started in a spare sandbox."""
        return self.rt.spares is not None and str(handle.data["cgroup"]).startswith(self.rt.spares.prefix)


def spare_groups(prefix: str) -> list[str]:
    """The names of the groups, spare or taken, whose names begin with *prefix*."""
    parent = next(iter(Cgroup(prefix).dirs.values())).parent
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(prefix)) if parent.is_dir() else []


@pytest.fixture(params=["cold", "warm"])
async def started(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Started]:
    """A runtime that starts in new sandboxes, or (as root, where there are sandboxes) in spare ones."""
    if request.param == "warm" and (os.geteuid() != 0 or shutil.which("unshare") is None):
        pytest.skip("spare sandboxes are cgroups: they need root (and unshare, for the sandbox)")
    s = Started(tmp_path, warm=request.param == "warm")
    yield s
    for handle in s.handles:
        await ProcessRuntime(str(tmp_path / "data")).stop(handle, 0.5)
        assert not await s.rt.adopt(handle)
    if s.rt.spares is not None:
        prefix = s.rt.spares.prefix
        await s.rt.close()
        assert spare_groups(prefix) == [], "a spare's group outlived its runtime"


def is_signal_exit(end: Exit, sig: signal.Signals) -> bool:
    """True when *end* says the instance died of *sig* (directly, or as its init's 128+N status)."""
    return end.code in (-sig.value, 128 + sig.value) and sig.name in end.reason


def test_is_a_runtime(tmp_path: Path) -> None:
    rt = ProcessRuntime(str(tmp_path))
    assert isinstance(rt, Runtime)
    assert rt.name == "process"
    assert rt.virtualizations == ("process",)


async def test_start_adopt_stats_stop(started: Started) -> None:
    """A running instance is adoptable and measurable; once stopped it ends by a signal and is gone."""
    handle = await started.start(started.spec(["sleep", "30"]))
    assert handle.runtime == "process"
    assert handle.iid.startswith("p")
    assert abs(handle.started_at - psutil.Process(handle.pid).create_time()) < 0.01
    assert os.getpgid(handle.pid) == handle.pid  # its own process group
    assert await started.rt.adopt(handle)  # start returns once the command runs: no wait needed
    stats = await started.rt.stats(handle)
    assert stats is not None
    assert stats.memory_mb > 0
    assert stats.cpu_percent >= 0
    await started.rt.stop(handle, 2.0)
    end = await asyncio.wait_for(started.rt.wait(handle), 10)
    assert is_signal_exit(end, signal.SIGTERM), end
    assert not await started.rt.adopt(handle)
    assert await started.rt.stats(handle) is None
    assert not psutil.pid_exists(handle.pid) or psutil.Process(handle.pid).create_time() != handle.started_at


async def test_a_stop_right_after_start_is_a_term(started: Started) -> None:
    """start returns once the instance can take a TERM: a stop at once (a deploy undone at once) ends it by
    TERM, never by the KILL after the grace (the namespace's init ignores TERM until its handler is set)."""
    for _ in range(5):
        handle = await started.start(started.spec(["sleep", "30"]))
        await started.rt.stop(handle, 5.0)
        end = await asyncio.wait_for(started.rt.wait(handle), 10)
        assert not is_signal_exit(end, signal.SIGKILL), end
        assert is_signal_exit(end, signal.SIGTERM), end


async def test_the_cpu_quota_is_set_once_the_instance_is_ready(started: Started) -> None:
    """The SLA's vcpus become the group's CPU quota, set once the sandbox runs the command (so the
    runtime's own wrappers start at full speed), and set again by a runtime that adopts the instance."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("cgroups and namespaces need root and unshare")
    handle = await started.start(replace(started.spec(["sleep", "30"]), vcpus=0.5))
    group = ProcessRuntime.cgroup(handle)
    await eventually(lambda: group.cpu_limit() == 0.5, 5, 0.01, what="the CPU quota set")
    group.limit_cpu(2.0)  # as a worker that ended before its instance was ready left it
    assert await ProcessRuntime(str(started.tmp_path / "data")).adopt(handle)
    assert group.cpu_limit() == 0.5


async def test_output_lands_in_the_log(started: Started) -> None:
    spec = started.spec(["sh", "-c", "echo to-stdout; echo to-stderr >&2"])
    Path(spec.log_path).parent.mkdir(parents=True)
    Path(spec.log_path).write_text("earlier\n")  # appended to, not truncated
    end = await asyncio.wait_for(started.rt.wait(await started.start(spec)), 10)
    assert end == Exit(0, "exited with code 0")
    lines = Path(spec.log_path).read_text().splitlines()
    assert lines[0] == "earlier"
    assert sorted(lines[1:]) == ["to-stderr", "to-stdout"]
    assert Path(spec.work_dir).is_dir()


@pytest.mark.parametrize(("cmd", "expected"), [
    (["sh", "-c", "exit 3"], Exit(3, "exited with code 3")),
    (["true"], Exit(0, "exited with code 0")),
])
async def test_exit_codes(started: Started, cmd: list[str], expected: Exit) -> None:
    end = await asyncio.wait_for(started.rt.wait(await started.start(started.spec(cmd))), 10)
    assert end == expected


async def test_killed_by_a_signal(started: Started) -> None:
    handle = await started.start(started.spec(["sleep", "30"]))
    os.killpg(handle.pid, signal.SIGKILL)
    end = await asyncio.wait_for(started.rt.wait(handle), 10)
    assert is_signal_exit(end, signal.SIGKILL), end


async def test_missing_executable_is_a_readable_error(started: Started) -> None:
    with pytest.raises(RuntimeError, match=r"cannot start: .*No such file or directory: 'nosuchcmd'"):
        await started.start(started.spec(["nosuchcmd", "x"]))


async def test_empty_cmd_is_refused(started: Started) -> None:
    with pytest.raises(RuntimeError, match="no cmd to run"):
        await started.start(started.spec([]))


async def test_environment_and_hostname(started: Started) -> None:
    spec = started.spec(["sh", "-c", 'echo "$GREETING|$EMPTY|$HOSTNAME|$LANG"; test -n "$PATH"'],
                        env=("GREETING=hello world", "EMPTY="), number=7)
    end = await asyncio.wait_for(started.rt.wait(await started.start(spec)), 10)
    assert end.code == 0, Path(spec.log_path).read_text()
    assert Path(spec.log_path).read_text().strip() == "hello world||instance-7|C.UTF-8"


async def test_worker_environment_does_not_leak(started: Started, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OAK_SECRET_OF_THE_WORKER", "leaked")
    spec = started.spec(["sh", "-c", 'echo "[$OAK_SECRET_OF_THE_WORKER]"'])
    await asyncio.wait_for(started.rt.wait(await started.start(spec)), 10)
    assert Path(spec.log_path).read_text().strip() == "[]"


async def test_restarted_worker_adopts_and_waits(started: Started) -> None:
    """A new runtime object (the worker after a restart) adopts the instance and sees it end."""
    handle = await started.start(started.spec(["sleep", "30"]))
    again = ProcessRuntime(str(started.tmp_path / "data"))
    assert await again.adopt(handle)
    assert await again.stats(handle) is not None
    waiting = asyncio.create_task(again.wait(handle))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    os.killpg(handle.pid, signal.SIGKILL)
    end = await asyncio.wait_for(waiting, 10)
    assert end.code is None
    assert end.reason.startswith("exited while the worker was away")
    assert not await again.adopt(handle)


async def test_reused_pid_is_not_adopted_nor_signalled(started: Started) -> None:
    """A handle whose start time does not match the process behind its PID is treated as gone."""
    handle = await started.start(started.spec(["sleep", "30"]))
    # an old instance whose PID now belongs to another process (here: another instance)
    stale = Handle(handle.iid + "-old", "process", handle.pid, handle.started_at - 100.0)
    again = ProcessRuntime(str(started.tmp_path / "data"))
    assert not await again.adopt(stale)
    assert await again.stats(stale) is None
    end = await asyncio.wait_for(again.wait(stale), 5)
    assert end.code is None
    await again.stop(stale, 0.5)
    assert await started.rt.adopt(handle)  # the real instance was left alone


async def test_stop_kills_what_ignores_sigterm(started: Started) -> None:
    handle = await started.start(started.spec(["sh", "-c", "trap '' TERM; sleep 30"]))
    def sleeping() -> bool:  # the trap comes before the sleep (in a sandbox the first child is the namespace's init)
        return any(p.name() == "sleep" for p in psutil.Process(handle.pid).children(recursive=True))

    await eventually(sleeping, 5, 0.02, what="the trap set (sleep started)")
    loop = asyncio.get_running_loop()
    began = loop.time()
    await started.rt.stop(handle, 0.5)
    took = loop.time() - began
    assert 0.4 < took < 10, took
    assert not await started.rt.adopt(handle)
    end = await asyncio.wait_for(started.rt.wait(handle), 10)
    assert end.code != 0


async def test_stop_when_already_gone(started: Started) -> None:
    handle = await started.start(started.spec(["true"]))
    await asyncio.wait_for(started.rt.wait(handle), 10)
    await started.rt.stop(handle, 0.5)  # does not raise
    await ProcessRuntime(str(started.tmp_path / "data")).stop(handle, 0.5)


def test_loads_by_name_through_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OAK_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    if "process" not in plugins.available("runtime"):
        pytest.skip("entry points not installed (run: pip install -e .)")
    rt = plugins.load_runtime(plugins.make_manager(), "process", {"data_dir": str(tmp_path)})
    assert isinstance(rt, ProcessRuntime)


def test_loads_when_registered_directly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OAK_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = plugins.make_manager()
    pm.register(process_module)
    rt = plugins.load_runtime(pm, "process", {"data_dir": str(tmp_path)})
    assert isinstance(rt, ProcessRuntime)
    assert pm.hook.oak_make_runtime(name="container-or-other", config={"data_dir": str(tmp_path)}) is None
    with pytest.raises(plugins.PluginError, match="no runtime plugin named 'nope'"):
        plugins.load_runtime(pm, "nope", {"data_dir": str(tmp_path)})


def memory_limit_mb(group: Cgroup) -> int:
    """The memory limit of *group*, in MB."""
    path = group.dirs[""] / "memory.max" if group.version == 2 else group.dirs["memory"] / "memory.limit_in_bytes"
    return int(path.read_text()) // 2**20


async def test_the_instance_gets_exactly_its_environment_limit_and_log(started: Started) -> None:
    """Cold or from a spare, the instance's process has exactly the environment the runtime gives (nothing of
    the worker's, secrets never in an argv; the shell entering its group adds PWD), its own memory limit, and
    a private log."""
    spec = replace(started.spec(["sleep", "30"], env=("GREETING=hello 'world'", "SECRET=s3cr3t $x")), memory_mb=64)
    handle = await started.start(spec)
    assert started.took_a_spare(handle) == started.warm, handle.data

    def environ_of_pid() -> dict[str, str] | None:  # empty while the kernel is still exec'ing it
        entries = Path(f"/proc/{handle.pid}/environ").read_bytes().split(b"\0")
        environ = dict(e.decode().split("=", 1) for e in entries if e)
        return environ if "HOSTNAME" in environ else None

    environ = await eventually(environ_of_pid, 5, 0.01, what="the instance's environment readable")
    assert environ.pop("PWD", spec.work_dir) == spec.work_dir  # the shell entering the group exports it
    assert environ == started.rt.environment(spec)
    assert b"s3cr3t" not in Path(f"/proc/{handle.pid}/cmdline").read_bytes()
    assert Path(spec.log_path).stat().st_mode & 0o777 == 0o600
    if started.rt.sandboxed:
        group = ProcessRuntime.cgroup(handle)
        assert handle.pid in group.pids()
        assert memory_limit_mb(group) == 64


async def test_a_start_a_spare_cannot_take_goes_cold(started: Started) -> None:
    """A command a shell cannot carry on one line (a newline in an argument) starts the usual way."""
    if not started.warm:
        pytest.skip("about spare sandboxes")
    spec = started.spec(["sh", "-c", 'printf "%s" "$0" | wc -l', "two\nlines"])
    assert started.rt.spares is not None
    await started.rt.spares.filled()
    handle = await started.rt.start(spec)
    started.handles.append(handle)
    assert not started.took_a_spare(handle)
    assert handle.data["cgroup"] == started.rt.group(spec.iid)
    assert await asyncio.wait_for(started.rt.wait(handle), 10) == Exit(0, "exited with code 0")
    assert Path(spec.log_path).read_text().strip() == "1"


async def test_spares_of_a_dead_worker_end_and_are_swept(tmp_path: Path) -> None:
    """A worker killed with -9 leaves its spare reading a pipe nobody writes: it exits, and the next run of
    that worker removes its group; the group of a spare an instance took is that instance's and stays."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("spare sandboxes are cgroups: they need root (and unshare, for the sandbox)")
    owner = f"dead{os.getpid()}"
    first = ProcessRuntime(str(tmp_path / "data"), owner, spares=1)
    assert first.spares is not None
    prefix = first.spares.prefix
    await first.spares.filled()
    spec = LaunchSpec(f"i{next(counter)}", "app.ns.svc.ns", 1, "process", "", ("sleep", "30"), (), 0, 0.0, False,
                      str(tmp_path / "i.log"), str(tmp_path / "work"))
    instance = await first.start(spec)  # takes the spare; another is made
    await first.spares.filled()
    left = first.spares.take()  # as the worker dies: its end of the pipe closes
    assert left is not None
    assert left.child.stdin is not None
    left.child.stdin.close()
    assert await asyncio.wait_for(left.child.wait(), 5) == 0
    assert left.cgroup.name in spare_groups(prefix)
    await first.spares.close()
    again = ProcessRuntime(str(tmp_path / "data"), owner, spares=1)
    assert again.spares is not None
    await again.spares.filled()
    assert left.cgroup.name not in spare_groups(prefix)  # swept
    assert instance.data["cgroup"] in spare_groups(prefix)  # the instance's, left alone
    assert await again.adopt(instance)
    await again.stop(instance, 0.5)
    await again.close()
    assert spare_groups(prefix) == []
