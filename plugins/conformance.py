"""What the worker relies on a runtime for, as tests a runtime plugin's author runs against their plugin
(as pytest plugin authors run theirs with pytester).

Subclass :class:`RuntimeConformance` in a test module (pytest collects it by its ``Test`` name) and say
how to build your runtime, and, if its instances do not run the SLA's ``cmd`` as a command line on
their own, what ``code`` they need::

    from plugins.conformance import RuntimeConformance

    class TestMyRuntime(RuntimeConformance):
        def make_runtime(self, data_dir: Path) -> Runtime:
            return MyRuntime(str(data_dir))

        code = "/srv/images/busybox"   # an image whose PATH has sh, sleep, echo, true and dd
        limits_memory = True           # it enforces memory_mb (skip that test when False)

A runtime whose ``cmd`` is not a command line maps each behaviour the tests need (:data:`COMMANDS`:
fail with output, succeed, run, ignore SIGTERM, cannot start, allocate) its own way in :meth:`command` or
:meth:`make_spec`, as Oakling's VM runtime does with kernel arguments.

Each test starts real instances (``sh``, ``sleep``, ``echo``, ``dd``) and checks: exit codes and output
in the instance's log, ``stop`` (also of an instance ignoring SIGTERM), adoption by a new runtime object
on the same data directory (a restarted worker), a readable failure for a command that cannot start,
``stats`` of a running instance, and, when it applies, the memory limit. Needs pytest-asyncio (auto mode).
Oakling runs it against its own process, container and VM runtimes (tests/test_conformance.py).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.common.plugin_api import Exit, Handle, LaunchSpec, Runtime

_numbers = itertools.count()


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


#: What each behaviour the tests need is, as a command line (the default :meth:`RuntimeConformance.command`).
COMMANDS: dict[str, list[str]] = {
    "fail": ["sh", "-c", "echo out; echo err >&2; exit 3"],  # output on stdout and stderr, then fail
    "succeed": ["true"],
    "run": ["sleep", "300"],  # run until stopped
    "ignore-term": ["sh", "-c", "trap '' TERM; sleep 300"],  # run, ignoring SIGTERM
    "missing": ["/nonexistent/oak-conformance"],  # cannot start
    "allocate": ["dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1"],  # 200 MB at once
}


class RuntimeConformance:
    """The conformance tests; a subclass provides :meth:`make_runtime` (and ``code``, ``limits_memory``,
    and for runtimes whose ``cmd`` is not a command line, :meth:`command` or :meth:`make_spec`)."""

    code = ""  # LaunchSpec.code for every instance (an image, for runtimes that need one)
    limits_memory = False  # whether the runtime enforces LaunchSpec.memory_mb
    log_wait = 5.0  # seconds the last lines of output may take to reach the log after the instance ends
    failure_code: int | None = 3  # the exit code "fail" ends with (None: the runtime cannot tell one)
    failure_output: tuple[str, ...] = ("out", "err")  # lines "fail" leaves in the log (among others)
    timeout = 30.0  # seconds an instance may take to end

    def make_runtime(self, data_dir: Path) -> Runtime:
        """The runtime under test, keeping its state in *data_dir* (called again there for adoption)."""
        raise NotImplementedError

    def command(self, behaviour: str) -> list[str]:
        """The ``cmd`` making an instance behave as *behaviour* (a key of :data:`COMMANDS`) says."""
        return COMMANDS[behaviour]

    def make_spec(self, tmp_path: Path, behaviour: str, memory_mb: int = 0) -> LaunchSpec:
        """An instance that behaves as *behaviour* says (override for runtimes that need more than
        ``code`` and :meth:`command`)."""
        iid = f"conf{os.getpid()}x{next(_numbers)}"
        kind = self._runtime.virtualizations[0]
        return LaunchSpec(iid, "conformance.test.svc.test", 1, kind, self.code, tuple(self.command(behaviour)), (),
                          memory_mb, 0.0, False, str(tmp_path / "logs" / f"{iid}.log"),
                          str(tmp_path / "work" / iid))

    @pytest.fixture(autouse=True)
    async def _runtime_under_test(self, tmp_path: Path) -> AsyncIterator[None]:
        self._data_dir = tmp_path / "runtime"
        self._runtime = self.make_runtime(self._data_dir)
        self._started: list[Handle] = []
        yield
        for handle in self._started:  # nothing the tests started outlives them
            if await self._runtime.adopt(handle):
                await self._runtime.stop(handle, 0.5)

    async def _start(self, spec: LaunchSpec) -> Handle:
        handle = await self._runtime.start(spec)
        self._started.append(handle)
        return handle

    async def _log_lines(self, spec: LaunchSpec, at_least: int) -> list[str]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.log_wait
        while True:
            lines = await asyncio.to_thread(_lines, Path(spec.log_path))
            if len(lines) >= at_least or loop.time() > deadline:
                return lines
            await asyncio.sleep(0.05)

    async def test_an_exit_code_and_the_output_come_through(self, tmp_path: Path) -> None:
        """stdout and stderr land in the instance's log; ``wait`` gives the exit code, with a reason."""
        spec = self.make_spec(tmp_path, "fail")
        end = await asyncio.wait_for(self._runtime.wait(await self._start(spec)), self.timeout)
        assert isinstance(end, Exit)
        assert end.code == self.failure_code, end
        assert end.reason, "an end says why"
        lines = await self._log_lines(spec, len(self.failure_output))
        assert all(line in lines for line in self.failure_output), lines[-20:]

    async def test_an_instance_that_succeeds_exits_zero(self, tmp_path: Path) -> None:
        """A command that succeeds ends with code 0."""
        spec = self.make_spec(tmp_path, "succeed")
        end = await asyncio.wait_for(self._runtime.wait(await self._start(spec)), self.timeout)
        assert end.code == 0, end

    async def test_stop_ends_even_an_instance_that_ignores_sigterm(self, tmp_path: Path) -> None:
        """``stop`` kills what ignores SIGTERM after the grace; afterwards nothing is left to adopt."""
        handle = await self._start(self.make_spec(tmp_path, "ignore-term"))
        await asyncio.wait_for(self._runtime.stop(handle, 0.5), self.timeout)
        assert not await self._runtime.adopt(handle), "a stopped instance cannot be adopted"

    async def test_a_restarted_worker_adopts_a_running_instance(self, tmp_path: Path) -> None:
        """A new runtime object on the same data directory adopts the running instance and can stop it."""
        handle = await self._start(self.make_spec(tmp_path, "run"))
        again = self.make_runtime(self._data_dir)
        assert await again.adopt(handle), "the instance runs on and is adopted"
        await asyncio.wait_for(again.stop(handle, 0.5), self.timeout)
        assert not await again.adopt(handle)

    async def test_a_command_that_cannot_start_fails_readably(self, tmp_path: Path) -> None:
        """A command that does not exist either fails ``start`` with a RuntimeError saying why, or ends at
        once with a non-zero code and a reason: never a hang, never another exception."""
        spec = self.make_spec(tmp_path, "missing")
        try:
            handle = await self._start(spec)
        except RuntimeError as exc:
            why = str(exc)
            assert why, "the error says why"
            return
        end = await asyncio.wait_for(self._runtime.wait(handle), self.timeout)
        assert end.code != 0, end
        assert end.reason

    async def test_a_running_instance_can_be_measured(self, tmp_path: Path) -> None:
        """``stats`` of a running instance is a sample with sane numbers, or None where it cannot measure."""
        handle = await self._start(self.make_spec(tmp_path, "run"))
        await asyncio.sleep(0.5)  # a sample needs a window to measure CPU over
        stats = await self._runtime.stats(handle)
        if stats is not None:
            assert stats.cpu_percent >= 0
            assert stats.memory_mb >= 0

    async def test_the_memory_limit_holds(self, tmp_path: Path) -> None:
        """An instance allocating past ``memory_mb`` is killed, and the reason says out of memory."""
        if not self.limits_memory:
            pytest.skip("this runtime does not enforce memory limits (limits_memory = False)")
        spec = self.make_spec(tmp_path, "allocate", memory_mb=40)
        end = await asyncio.wait_for(self._runtime.wait(await self._start(spec)), self.timeout)
        assert end.code != 0, end
        assert "out of memory" in end.reason, end
