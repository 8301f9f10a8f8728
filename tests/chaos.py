"""Chaos for a whole fleet of real processes: kill -9, SIGSTOP and restart the root, clusters and workers at
random, one fault at a time, and check after each that the fleet converges to every replica RUNNING
exactly once, counted in the process table. Shared by tests/test_chaos.py (a few faults, in CI) and
bench/chaos.py (many, timed).

A run is decided by its seed alone (:func:`plan`), printed first, so a failure can be replayed with
``OAK_CHAOS_SEED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from plugins.runtimes.cgroups import Cgroup, group_name
from services.cli.client import CliError, OakClient
from services.worker.kernel import namespace_of, namespaces
from tests.stack import Stack, eventually
from tests.test_three_tiers import sleeps

CLUSTERS = {"c1": ("w11", "w12"), "c2": ("w21", "w22")}
KINDS = ("kill", "freeze", "restart")
# Three services of three replicas, one per disconnect policy that changes what happens to a replica.
SERVICES = {"plain": {}, "original": {"reconcile": "keep_original"}, "stay": {"replace": False}}
REPLICAS = 3
SCALED = "plain"  # the service scaled between faults (what was acknowledged must hold at the end)
CONVERGE_TIMEOUT = 90.0
ASK_TIMEOUT = 2.0  # a request lost while the root was down is asked again after this, not after the CLI's 15 s


@dataclass(frozen=True)
class Fault:
    """One fault: *kind* on the process *target*, lasting *seconds* (down or frozen), after *gap* seconds."""

    kind: str
    target: str
    seconds: float
    gap: float

    def __str__(self) -> str:
        return f"{self.kind} {self.target} for {self.seconds:.1f} s after {self.gap:.1f} s"


def plan(seed: int, count: int) -> list[Fault]:
    """*count* faults drawn from *seed*: which process, what, for how long (bounded: 0.5-8 s each)."""
    rng = random.Random(seed)
    targets = ["root", *CLUSTERS, *(w for workers in CLUSTERS.values() for w in workers)]
    faults = []
    for _ in range(count):
        kind = rng.choice(KINDS)
        seconds = round(rng.uniform(1.0, 8.0) if kind == "freeze" else rng.uniform(0.5, 3.0), 1)
        faults.append(Fault(kind, rng.choice(targets), seconds, round(rng.uniform(0.0, 2.0), 1)))
    return faults


def job(name: str) -> str:
    return f"chaos.test.{name}.test"


def token(name: str) -> str:
    return str(9100 + list(SERVICES).index(name))


@dataclass
class Chaos:
    """A fleet under faults, and what it saw."""

    stack: Stack
    client: OakClient
    replicas: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SERVICES, REPLICAS))
    iids: set[str] = field(default_factory=set)  # every instance id seen (for the leftovers check)
    recoveries: list[float] = field(default_factory=list)

    @classmethod
    async def start(cls, stack: Stack, client: OakClient) -> Chaos:
        """The fleet's processes are started; deploy the services and wait until all run."""
        micro = [{"microserviceID": "", "microservice_name": name, "microservice_namespace": "test",
                  "virtualization": "process", "code": "", "cmd": ["sleep", token(name)], "memory": 10, "vcpus": 0.05,
                  "disconnect": policy} for name, policy in SERVICES.items()]
        sla = {"sla_version": "v2.0", "customerID": "Admin", "applications": [{
            "applicationID": "", "application_name": "chaos", "application_namespace": "test",
            "application_desc": "", "microservices": micro}]}
        await client.request("apps", "create", raw=json.dumps(sla).encode())
        for name in SERVICES:
            await client.request("services", "deploy", {"service": job(name), "replicas": REPLICAS})
        chaos = cls(stack, client)
        await eventually(chaos.converged, CONVERGE_TIMEOUT, 0.25, what="every replica RUNNING once")
        return chaos

    async def converged(self) -> bool:
        """Every service has its replicas RUNNING in the root's state, each process running exactly once."""
        for name, replicas in self.replicas.items():
            try:
                answer = await asyncio.wait_for(self.client.request("services", "inspect", {"service": job(name)}),
                                                ASK_TIMEOUT)
                rows = answer["instances"]
            except (CliError, OSError, TimeoutError):
                return False
            self.iids |= {row["iid"] for row in rows}
            if len(rows) != replicas or any(row["status"] != "RUNNING" for row in rows):
                return False
            if len(sleeps(token(name), self.stack.base)) != replicas:
                return False
        return True

    async def inflict(self, fault: Fault) -> float:
        """Make *fault*, then return the seconds from its end until the fleet converged."""
        await asyncio.sleep(fault.gap)
        proc = self.stack.procs[fault.target]
        if fault.kind == "freeze":
            proc.freeze()
            await asyncio.sleep(fault.seconds)
            proc.thaw()
        else:
            proc.kill9() if fault.kind == "kill" else proc.stop()
            await asyncio.sleep(fault.seconds)
            proc.start()
        ended = time.monotonic()
        await self.scale_again()
        await eventually(self.converged, CONVERGE_TIMEOUT, 0.25, what=f"convergence after {fault}")
        took = time.monotonic() - ended
        self.recoveries.append(took)
        return took

    async def scale_again(self) -> None:
        """Scale one service between 3 and 4 replicas, asking the same again until the root acknowledges it
        (one that went unanswered may have been done: asking the same twice is harmless): the last
        acknowledged count must be what runs in the end."""
        wanted = REPLICAS + 1 if self.replicas[SCALED] == REPLICAS else REPLICAS
        deadline = time.monotonic() + CONVERGE_TIMEOUT
        while True:
            with contextlib.suppress(CliError, OSError, TimeoutError):
                await asyncio.wait_for(self.client.request(
                    "services", "scale", {"service": job(SCALED), "replicas": wanted}), ASK_TIMEOUT)
                self.replicas[SCALED] = wanted
                return
            if time.monotonic() > deadline:
                raise AssertionError("the root did not answer a scale request within the timeout")
            await asyncio.sleep(0.5)


def leftovers(base: Path, iids: set[str]) -> list[str]:
    """What the fleet left behind after it stopped: instance processes, cgroups, namespaces, mounts."""
    left = [f"process sleep {token(n)}" for n in SERVICES for _ in sleeps(token(n), base)]
    workers = [w for ws in CLUSTERS.values() for w in ws]
    left += [f"cgroup {w}.{iid}" for iid in iids for w in workers if Cgroup(group_name(iid, w)).exists()]
    left += [f"namespace {namespace_of(iid)}" for iid in iids if namespace_of(iid) in namespaces()]
    left += [f"mount {line.split()[1]}" for line in Path("/proc/mounts").read_text().splitlines()
             if str(base) in line]
    return left


def start_fleet(stack: Stack) -> None:
    """The root, the clusters and their workers (quick to stop: a restart does not wait the default grace)."""
    stack.root()
    for cluster in CLUSTERS:
        stack.cluster(cluster)
    for cluster, workers in CLUSTERS.items():
        for worker in workers:
            stack.worker(worker, cluster, "--stop-grace", "1")
