"""A simulated fleet for scale benchmarks: root, clusters and ``oak sim`` processes, and their meters.

Every process is started here and stopped by :meth:`Fleet.stop` (by its own PID), whatever happens.
Workers are spread evenly over the clusters; on each cluster the workers meant to fail together run
in one ``oak sim`` process of their own (the *victims*), so a ``kill -9`` of it drops them all at once.
The bench starts the ``oak sim`` processes one after the other, each once the previous one's workers
are online (a rollout): a thousand workers joining in the same second overwhelm a cluster's join desk.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.stack import Proc, Stack, oak

SIM_CHUNK = 100  # simulated workers per ``oak sim`` process, started one process after the other
STATS_RE = re.compile(r"broker stats: t=([\d.]+) published=(\d+) delivered=(\d+)")


def spread(total: int, parts: int) -> list[int]:
    """*total* split into *parts* counts that differ by at most one."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@dataclass
class Fleet:
    """Root, *clusters* clusters and *workers* simulated workers, *victims* of them killable at once."""

    base: Path
    workers: int
    clusters: int
    victims: int
    report_interval: float = 5.0
    broker: str = "embedded"  # the root's and clusters' --broker
    root_cpus: frozenset[int] = frozenset()  # CPUs for the root alone (the rest for everything else); none: shared
    root_nice: int = 0  # the root's (and the user lane's) niceness: below 0, the CPU scheduler favours them
    stack: Stack = field(init=False)
    sims: list[Proc] = field(default_factory=list)
    victim_sims: list[Proc] = field(default_factory=list)
    victim_prefixes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stack = Stack(self.base, env={"OAK_BROKER_STATS": "1"})

    @property
    def cluster_names(self) -> list[str]:
        """c01, c02, ..."""
        return [f"c{i + 1:02d}" for i in range(self.clusters)]

    def start(self) -> None:
        """Start the root and the clusters (and with *root_cpus*, give the root those CPUs and this process,
        whose children the clusters and workers are, the others)."""
        root = self.stack.root("--broker", self.broker)
        assert root.popen is not None
        self.favour(root.popen.pid)
        if self.root_cpus:
            os.sched_setaffinity(0, os.sched_getaffinity(0) - self.root_cpus)
        for name in self.cluster_names:
            self.stack.cluster(name, "--broker", self.broker)

    def favour(self, pid: int) -> None:
        """Give process *pid* (started before it made threads, which inherit it) the root's CPUs, if it has
        its own, and the root's niceness."""
        if self.root_cpus:
            os.sched_setaffinity(pid, self.root_cpus)
        if self.root_nice:
            os.setpriority(os.PRIO_PROCESS, pid, self.root_nice)

    def plan(self) -> list[tuple[str, str, int]]:
        """The ``oak sim`` processes to start: (cluster, worker-name prefix, workers), victims first."""
        out = []
        for name, count, doomed in zip(self.cluster_names, spread(self.workers, self.clusters),
                                       spread(self.victims, self.clusters), strict=True):
            if doomed:
                out.append((name, f"{name}v", doomed))
            rest = count - doomed
            out += [(name, f"{name}s{k}", n) for k, n in enumerate(spread(rest, -(-rest // SIM_CHUNK))) if n]
        return out

    def start_sims(self, cluster: str, prefix: str, count: int) -> None:
        """Start one ``oak sim`` process of *count* workers named PREFIX-0001..."""
        proc = self._sim(cluster, prefix, count)
        if prefix.endswith("v"):
            self.victim_sims.append(proc)
            self.victim_prefixes.append(f"{prefix}-")
        else:
            self.sims.append(proc)

    def _sim(self, cluster: str, prefix: str, count: int) -> Proc:
        proc = Proc(f"sim-{prefix}", oak(
            "sim", "--workers", str(count), "--prefix", prefix,
            "--cluster", f"127.0.0.1:{self.stack.cluster_ports[cluster]}",
            "--data-dir", str(self.base / "sims"), "--report-interval", str(self.report_interval),
            f"--join-token={self.stack.token}", *self.stack.pin()), self.base,
            self.stack.env).start()
        self.stack.procs[proc.name] = proc
        return proc

    def is_victim(self, node: str) -> bool:
        """True when *node* runs in a victim process."""
        return any(node.startswith(p) for p in self.victim_prefixes)

    def kill_victims(self) -> None:
        """``kill -9`` every victim process (their workers drop without a goodbye)."""
        for proc in self.victim_sims:
            proc.kill9()

    def control_plane(self) -> dict[str, Proc]:
        """The root and the clusters."""
        return {n: p for n, p in self.stack.procs.items() if not n.startswith("sim-")}

    def stop(self) -> None:
        """Stop every process started here."""
        self.stack.stop()


@dataclass
class Sample:
    """CPU seconds and RSS of processes, and broker counters, at one moment."""

    at: float
    cpu: dict[str, float]
    rss_mb: dict[str, float]
    brokers: dict[str, tuple[float, int, int]]


def sample(fleet: Fleet) -> Sample:
    """Now: CPU time and RSS of every live process of *fleet*, and the latest broker counters."""
    cpu, rss, brokers = {}, {}, {}
    for name, proc in fleet.stack.procs.items():
        if proc.popen is None or proc.popen.poll() is not None:
            continue
        try:
            ps = psutil.Process(proc.popen.pid)
            # with --broker mosquitto the broker is a child of the root or cluster: count it with them
            family = [ps] if name.startswith("sim-") else [ps, *ps.children(recursive=True)]
            cpu[name] = sum(p.cpu_times().user + p.cpu_times().system for p in family)
            rss[name] = sum(p.memory_info().rss for p in family) / 2**20
        except psutil.NoSuchProcess:
            continue
        if not name.startswith("sim-"):
            last = _last_stats(proc.log)
            if last:
                brokers[name] = last
    return Sample(time.monotonic(), cpu, rss, brokers)


def _last_stats(log: Path) -> tuple[float, int, int] | None:
    """(time, published, delivered) of the last broker statistics line in *log*."""
    with open(log, "rb") as handle:
        handle.seek(0, 2)
        handle.seek(max(0, handle.tell() - 65536))
        tail = handle.read().decode(errors="replace")
    found = STATS_RE.findall(tail)
    return (float(found[-1][0]), int(found[-1][1]), int(found[-1][2])) if found else None


def window(a: Sample, b: Sample) -> dict[str, dict[str, float]]:
    """Per process between two samples: % of one core, RSS at the end, broker messages/s in and out."""
    seconds = b.at - a.at
    out: dict[str, dict[str, float]] = {}
    for name in b.cpu:
        if name not in a.cpu:
            continue
        row = {"cpu_percent": round((b.cpu[name] - a.cpu[name]) / seconds * 100, 1),
               "rss_mb": round(b.rss_mb[name], 1)}
        if name in a.brokers and name in b.brokers and b.brokers[name][0] > a.brokers[name][0]:
            (t0, p0, d0), (t1, p1, d1) = a.brokers[name], b.brokers[name]
            row["broker_in_per_s"] = round((p1 - p0) / (t1 - t0), 1)
            row["broker_out_per_s"] = round((d1 - d0) / (t1 - t0), 1)
        out[name] = row
    return out
