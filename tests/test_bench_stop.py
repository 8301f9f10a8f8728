"""Stopping a benchmark leaves nothing running: SIGTERM (``timeout``, a cancelled job) ends one as Ctrl-C does,
through its ``finally`` blocks, and ``make bench`` (bench/run_all.py) passes it on and runs no other."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import psutil

from tests.stack import REPO

MARK = "7032"  # a sleep's argument no other test uses

# A benchmark's shape: asyncio.run over work that started a process and stops it in a finally block.
BENCHMARK = textwrap.dedent(f"""
    import asyncio
    from bench.common import stop_on_sigterm

    async def main() -> None:
        child = await asyncio.create_subprocess_exec("sleep", "{MARK}")
        print("started", flush=True)
        try:
            await asyncio.sleep(60)
        finally:
            child.kill()
            await child.wait()
            print("cleaned up", flush=True)

    stop_on_sigterm()
    asyncio.run(main())
""")


def sleeping() -> list[int]:
    """PIDs of this test's sleep."""
    return [p.pid for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", MARK]]


def test_sigterm_ends_a_benchmark_through_its_cleanup() -> None:
    """SIGTERM by default ends Python at once; after stop_on_sigterm() the finally blocks run first."""
    proc = subprocess.Popen([sys.executable, "-c", BENCHMARK], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "started\n"
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    assert "cleaned up" in out
    assert proc.returncode == 128 + signal.SIGTERM
    assert not sleeping(), "the benchmark's process outlived it"


def test_run_all_passes_sigterm_on_and_runs_no_other() -> None:
    """``make bench`` stopped: the benchmark it runs gets the SIGTERM and ends, and the next one never starts."""
    run_all = subprocess.Popen([sys.executable, "-m", "bench.run_all", "placement", "store"], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    children: list[psutil.Process] = []
    while not children and time.monotonic() < deadline:
        children = psutil.Process(run_all.pid).children()
        time.sleep(0.05)
    assert children, "bench.run_all started no benchmark"
    run_all.terminate()
    _, err = run_all.communicate(timeout=30)
    assert run_all.returncode != 0
    assert "stopped by SIGTERM during bench.placement" in err, err
    assert "bench.store" not in err, "it went on with the next benchmark"
    assert not psutil.pid_exists(children[0].pid), "run_all ended before the benchmark it ran"
