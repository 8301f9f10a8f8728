"""What TLS on every link costs (issue 14): this tree against one without TLS, in the same run.

For each version, on loopback, with root, cluster and worker as separate processes:

* submit-to-RUNNING: ``services/deploy`` of a one-replica process service until the root's retained
  state says RUNNING, then undeploy, *rounds* times;
* idle CPU of the three processes over *idle* seconds, once the worker is online;
* join time of *workers* simulated workers (``oak sim``): from their start until the root lists them
  all online.

Both versions are git revisions (``--rev``, default HEAD, against ``--baseline-rev``, default b4f8e5f,
the last commit before TLS), each checked out in a temporary worktree and run with the same
interpreter, so that editing the tree meanwhile changes nothing. Goal: TLS adds under 10 % to the p50 of
submit-to-RUNNING and under 0.5 % of a core at idle.

Run: ``.venv/bin/python -m bench.tls [--baseline-rev REV] [--rounds 20] [--idle 30] [--workers 1000]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.common import record, summary
from bench.three_tiers import deploy_rounds
from services.cli.client import OakClient, Profile
from tests.stack import eventually, free_port

REPO = Path(__file__).resolve().parents[1]
BEFORE_TLS = "b4f8e5f"


@dataclass
class Version:
    """A source tree to run, and the flags its tiers need to let this benchmark's newcomers join."""

    name: str
    tree: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def has_tls(self) -> bool:
        """True for a tree with the CA and join tokens."""
        return (self.tree / "broker" / "tokens.py").exists()

    def start(self, base: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
        """``oak ARGS`` from this tree, its output in base/<name>.log."""
        with open(base / f"{name}.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", *args], cwd=self.tree, stdout=log,
                                    stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        """Stop every process this version started (workers first)."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        self.procs.clear()


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """*rev* checked out in a temporary git worktree."""
    where = Path(tempfile.mkdtemp(prefix="oak-baseline-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(where), rev], cwd=REPO, check=True,
                   capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=REPO, capture_output=True)
        shutil.rmtree(where, ignore_errors=True)


@contextlib.asynccontextmanager
async def stack(version: Version, base: Path, worker: bool = True) -> AsyncIterator[tuple[OakClient, int]]:
    """Root and cluster c1 (and worker w1) of *version*; the admin's client and the cluster's port."""
    root, cluster = free_port(), free_port()
    join = ["--open-join"] if version.has_tls else []
    version.start(base, "root", "root", "--data-dir", str(base / "root"), "--host", "127.0.0.1", "--port", str(root),
                  *join)
    version.start(base, "c1", "cluster", "--name", "c1", "--data-dir", str(base / "c1"), "--host", "127.0.0.1",
                  "--port", str(cluster), "--root", f"127.0.0.1:{root}", *join)
    if worker:
        version.start(base, "w1", "worker", "--name", "w1", "--data-dir", str(base / "w1"), "--cluster",
                      f"127.0.0.1:{cluster}")
    client: OakClient | None = None
    try:
        await eventually(lambda: (base / "root" / "credentials.json").exists(), 60, what="root up")
        client = await OakClient(Profile.load(base / "root")).__aenter__()
        if worker:
            await eventually(lambda: _online(client, 1), 60, what="worker online")
        yield client, cluster
    finally:
        if client is not None:
            await client.__aexit__(None, None, None)
        version.stop()


async def _online(client: OakClient, count: int) -> bool:
    return sum(1 for n in await client.request("nodes", "list") if n["online"]) >= count


async def submit_to_running(version: Version, rounds: int, idle: float) -> tuple[list[float], float]:
    """Milliseconds from deploy to RUNNING, *rounds* times; then the stack's idle CPU (% of one core)."""
    with tempfile.TemporaryDirectory() as tmp:
        async with stack(version, Path(tmp)) as (client, _):
            latencies = await deploy_rounds(client, "tls", rounds)
            await asyncio.sleep(5)  # settle
            procs = [psutil.Process(p.pid) for p in version.procs]
            cpu0 = sum(sum(p.cpu_times()[:2]) for p in procs)
            await asyncio.sleep(idle)
            cpu = (sum(sum(p.cpu_times()[:2]) for p in procs) - cpu0) / idle * 100
    return latencies, cpu


async def join_time(version: Version, workers: int) -> float:
    """Seconds from starting *workers* simulated workers until the root lists them all online."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        async with stack(version, base, worker=False) as (client, cluster):
            t0 = time.monotonic()
            version.start(base, "sim", "sim", "--workers", str(workers), "--cluster", f"127.0.0.1:{cluster}",
                          "--data-dir", str(base / "sim"), "--report-interval", "5")
            await eventually(lambda: _online(client, workers), 600, interval=1.0, what=f"{workers} workers online")
            return time.monotonic() - t0


async def measure(version: Version, rounds: int, idle: float, workers: int) -> dict[str, object]:
    """Every figure of *version*."""
    latencies, cpu = await submit_to_running(version, rounds, idle)
    joined = await join_time(version, workers) if workers else float("nan")
    print(f"{version.name}: submit-to-RUNNING p50 {summary(latencies)['median']:.1f} ms, idle {cpu:.2f} %, "
          f"{workers} joined in {joined:.1f} s", file=sys.stderr, flush=True)
    return {"submit_to_running_ms": summary(latencies), "idle_cpu_percent_of_one_core": round(cpu, 2),
            "join_seconds": round(joined, 1)}


async def run(rev: str, baseline: str, rounds: int, idle: float, workers: int) -> None:
    """Both versions, one after the other."""
    with worktree(baseline) as old, worktree(rev) as new:
        plain, tls = Version(f"plain ({baseline})", old), Version(f"tls ({rev})", new)
        results = {"plain": await measure(plain, rounds, idle, workers),
                   "tls": await measure(tls, rounds, idle, workers)}
    p50 = {k: v["submit_to_running_ms"]["median"] for k, v in results.items()}  # type: ignore[index]
    idle_cpu = {k: v["idle_cpu_percent_of_one_core"] for k, v in results.items()}
    joins = {k: v["join_seconds"] for k, v in results.items()}
    record("tls_cost", {
        "command": f"python -m bench.tls --rev {rev} --baseline-rev {baseline} --rounds {rounds} --idle {idle} "
                   f"--workers {workers}",
        "revisions": {"tls": _commit(rev), "plain": _commit(baseline)},
        **results, "ratio_p50_tls_vs_plain": p50["tls"] / p50["plain"],
        "idle_added_percent_of_one_core": float(idle_cpu["tls"]) - float(idle_cpu["plain"]),  # type: ignore[arg-type]
        "ratio_join_tls_vs_plain": float(joins["tls"]) / float(joins["plain"]) if workers else None,  # type: ignore[arg-type]
        "goal": "TLS adds under 10 % to the p50 and under 0.5 % of a core at idle",
    })


def _commit(rev: str) -> str:
    return subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, capture_output=True, text=True).stdout.strip()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rev", default="HEAD", help="the revision with TLS (default HEAD)")
    p.add_argument("--baseline-rev", default=BEFORE_TLS, help=f"a revision without TLS (default {BEFORE_TLS})")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--idle", type=float, default=30.0)
    p.add_argument("--workers", type=int, default=1000)
    args = p.parse_args()
    asyncio.run(run(args.rev, args.baseline_rev, args.rounds, args.idle, args.workers))


if __name__ == "__main__":
    main()
