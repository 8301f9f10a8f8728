"""Scale benchmarks (issue 7): a root, 1 or 10 clusters and 10 to 1,000 simulated workers (``oak sim``).

For each size, in order:

* join: every worker online at the root (``nodes/list``);
* idle: control-plane CPU (% of one core) and RSS, and each broker's message rate, over a window;
* place: 10,000 instances (10 services x 1,000 replicas) deployed at once; per instance the time from
  the deploy request until the root's retained state shows it on a worker (placed) and RUNNING, with
  CPU and peak RSS over the whole burst; meanwhile another user (``lane``, with one small service of
  her own) asks ``services/list`` every 50 ms from a process of her own (bench/lane.py), and the time to
  each answer is the *user lane* (issue 15: user requests never queue behind cluster traffic; under
  100 ms at p99);
* loaded idle: the same window with every instance running;
* failure: ``kill -9`` of up to 100 workers at once (half the fleet when it is smaller); time until
  every instance they held is placed elsewhere (detected and rescheduled) and RUNNING again.

Only the workloads are simulated; root, clusters, brokers, bridges and worker agents are real. They all
share this machine's CPUs, which a burst keeps busy; ``--root-cpus 0`` gives the root (and the user
lane) a CPU of its own, as when the root runs on its own machine, to time the root alone; ``--root-nice
-10`` keeps the CPUs shared but has the scheduler favour the root and the user lane.
Run: ``.venv/bin/python -m bench.scale [--workers 10,100,1000] [--clusters 1,10] [--instances 10000]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import percentile, record
from bench.fleet import Fleet, sample, window
from services.cli.client import CliError, OakClient, Profile, decode_state
from services.common import channels
from tests.stack import REPO, eventually

REPLICAS = 1000  # the most one service may have
LIVE: list[Fleet] = []  # stopped by main() whatever happens


def sla(services: int) -> bytes:
    """One app of *services* simulated services, each instance asking for almost nothing."""
    micro = [{"microserviceID": "", "microservice_name": f"s{i}", "microservice_namespace": "bench",
              "virtualization": "process", "code": "", "cmd": ["sleep", "1"], "memory": 1, "vcpus": 0.001}
             for i in range(services)]
    return json.dumps({"sla_version": "v2.0", "customerID": "bench", "applications": [{
        "applicationID": "", "application_name": "scale", "application_namespace": "bench",
        "application_desc": "", "microservices": micro}]}).encode()


def job(i: int) -> str:
    """The job name of service *i*."""
    return f"scale.bench.s{i}.bench"


@dataclass
class Tracker:
    """Follows the retained states of the services: where each instance is and since when."""

    client: OakClient
    latest: dict[str, tuple[str, str]] = field(default_factory=dict)
    placed_at: dict[str, float] = field(default_factory=dict)
    running_at: dict[str, float] = field(default_factory=dict)
    updates: int = 0

    async def run(self) -> None:
        """Consume state updates until cancelled."""
        while True:
            message = await self.client.updates.get()
            if not message.payload or "/state/services/" not in message.topic:
                continue
            now = time.monotonic()
            self.updates += 1
            for inst in decode_state(message.payload)["instances"]:
                where = (inst.get("node") or "", inst["status"])
                if self.latest.get(inst["iid"]) == where:
                    continue
                self.latest[inst["iid"]] = where
                if where[0]:
                    self.placed_at.setdefault(inst["iid"], now)
                if where[1] == "RUNNING":
                    self.running_at.setdefault(inst["iid"], now)

    def running(self, avoid: Any = None) -> int:
        """How many instances are RUNNING (on a node *avoid* does not reject)."""
        return sum(1 for node, status in self.latest.values()
                   if status == "RUNNING" and not (avoid and avoid(node)))

    def reset(self) -> None:
        """Forget first-seen times (the next phase times from its own start)."""
        self.placed_at.clear()
        self.running_at.clear()


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p90, p99 and max, in seconds (3 decimals)."""
    return {k: round(percentile(values, q), 3) for k, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}


async def online(client: OakClient, count: int) -> bool:
    """True when at least *count* workers are online at the root."""
    return sum(1 for n in await client.request("nodes", "list") if n["online"]) >= count


async def started(fleet: Fleet) -> OakClient:
    """Start *fleet*'s root and clusters; the admin's client once the root is up."""
    fleet.start()
    await eventually(lambda: (fleet.base / "root" / "credentials.json").exists(), 60, what="root up")
    return await OakClient(fleet.stack.profile()).__aenter__()


async def join(fleet: Fleet, client: OakClient, timeout: float) -> None:
    """Start *fleet*'s ``oak sim`` processes one after the other, each once the workers before are online."""
    expected = 0
    for cluster, prefix, count in fleet.plan():
        fleet.start_sims(cluster, prefix, count)
        expected += count
        await eventually(functools.partial(online, client, expected), timeout, 0.5, what=f"{expected} workers online")


async def measure(fleet: Fleet, seconds: float) -> dict[str, Any]:
    """CPU, RSS and broker rates of every process over *seconds*."""
    a = sample(fleet)
    await asyncio.sleep(seconds)
    return window(a, sample(fleet))


async def lane_user(client: OakClient, admin: Profile) -> Profile:
    """Another user, with one small service of her own (not deployed): what she lists is hers alone."""
    await client.request("users", "create", {"username": "lane", "password": "lane-password-1"})
    profile = Profile("lane", "lane-password-1", admin.root, admin.ca)
    async with OakClient(profile) as lane:
        await lane.request("apps", "create", raw=sla(1).replace(b'"scale"', b'"lane"'))
    return profile


async def user_lane(profile: Profile, fleet: Fleet) -> asyncio.subprocess.Process:
    """Start the user lane (bench/lane.py) in a process of its own, favoured as the root is (a user's client
    is not on the fleet's machines either); return once it has connected."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.lane", str(profile.root), profile.username, profile.password,
        *([str(profile.ca)] if profile.ca else []), cwd=REPO,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    fleet.favour(proc.pid)
    assert proc.stderr is not None
    ready = await asyncio.wait_for(proc.stderr.readline(), 30)
    if ready.strip() != b"ready":
        raise CliError(f"the user lane did not start: {ready.decode(errors='replace')}")
    return proc


async def lane_answers(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    """Stop the user lane; its answers' times (seconds) and how many were busy."""
    assert proc.stdin is not None
    proc.stdin.close()
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    if proc.returncode:
        raise CliError(f"the user lane failed: {err.decode(errors='replace')[-500:]}")
    return dict(json.loads(out))


async def place(fleet: Fleet, client: OakClient, tracker: Tracker, instances: int, timeout: float) -> dict[str, Any]:
    """Deploy *instances* at once and time them to placed and RUNNING, and a user's requests meanwhile;
    CPU over the burst."""
    services = -(-instances // REPLICAS)
    await client.request("apps", "create", raw=sla(services))
    await client.session.subscribe_confirmed(
        *(channels.API_SERVICE_STATE.topic(user=client.profile.username, job=job(i)) for i in range(services)))
    tracker.reset()
    lane = await user_lane(await lane_user(client, fleet.stack.profile()), fleet)
    before, peak = sample(fleet), dict[str, float]()
    t0 = time.monotonic()
    late = 0
    for i in range(services):
        try:
            replicas = min(REPLICAS, instances - i * REPLICAS)
            await client.request("services", "deploy", {"service": job(i), "replicas": replicas})
        except CliError:  # the root answers late (15 s) but goes on; the instances are what is timed
            late += 1
    deployed = time.monotonic() - t0
    while tracker.running() < instances and time.monotonic() - t0 < timeout:
        await asyncio.sleep(0.5)
        now = sample(fleet)
        peak = {n: max(peak.get(n, 0.0), r) for n, r in now.rss_mb.items()}
    done = time.monotonic() - t0
    asked = await lane_answers(lane)
    answered = asked["answered"]
    usage = window(before, sample(fleet))
    for name, row in usage.items():
        row["peak_rss_mb"] = round(peak.get(name, row["rss_mb"]), 1)
    return {"instances": instances, "running": tracker.running(), "all_running_s": round(done, 2),
            "requests_s": round(deployed, 2), "requests_unanswered_in_15s": late,
            "reached": tracker.running() >= instances,
            "placed_latency_s": percentiles([t - t0 for t in tracker.placed_at.values()]),
            "running_latency_s": percentiles([t - t0 for t in tracker.running_at.values()]),
            "state_updates": tracker.updates, "usage": usage,
            "user_lane_ms": {k: round(percentile(answered, q) * 1000, 1)
                             for k, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}
            | {"answers": len(answered), "busy": asked["busy"]}}


async def offline_times(fleet: Fleet, client: OakClient, t0: float, timeout: float) -> list[float]:
    """Seconds from *t0* until the root lists each victim offline (polled every 0.25 s)."""
    seen: dict[str, float] = {}
    while len(seen) < fleet.victims and time.monotonic() - t0 < timeout:
        with contextlib.suppress(CliError):
            for node in await client.request("nodes", "list"):
                if fleet.is_victim(node["name"]) and not node["online"]:
                    seen.setdefault(node["name"], time.monotonic() - t0)
        await asyncio.sleep(0.25)
    return sorted(seen.values())


async def fail(fleet: Fleet, client: OakClient, tracker: Tracker, instances: int, timeout: float) -> dict[str, Any]:
    """Kill the victim workers at once; time until the root lists them offline, until their instances
    are placed elsewhere, and until those are RUNNING."""
    doomed = {iid for iid, (node, _) in tracker.latest.items() if fleet.is_victim(node)}
    t0 = time.monotonic()
    fleet.kill_victims()
    offline = asyncio.create_task(offline_times(fleet, client, t0, timeout))
    detected = running = None
    while time.monotonic() - t0 < timeout and running is None:
        await asyncio.sleep(0.05)
        moved = [tracker.latest[i] for i in doomed]
        if detected is None and all(node and not fleet.is_victim(node) for node, _ in moved):
            detected = time.monotonic() - t0
        if detected is not None and tracker.running(avoid=fleet.is_victim) >= instances:
            running = time.monotonic() - t0
    seen = await offline
    return {"victims": fleet.victims, "instances_moved": len(doomed),
            "offline_at_root_s": {"first": round(seen[0], 2) if seen else None,
                                  "last": round(seen[-1], 2) if seen else None, "count": len(seen)},
            "detected_and_placed_s": None if detected is None else round(detected, 2),
            "all_running_again_s": None if running is None else round(running, 2), "timeout_s": timeout}


async def run_case(workers: int, clusters: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every phase for one size; the processes are stopped whatever happens."""
    result: dict[str, Any] = {"workers": workers, "clusters": clusters}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) if not args.keep else Path(args.keep) / f"{args.name}-{workers}x{clusters}"
        fleet = Fleet(base, workers, clusters, min(args.fail, workers // 2), args.report_interval, args.broker,
                      frozenset(int(c) for c in args.root_cpus.split(",") if c), args.root_nice)
        LIVE.append(fleet)
        try:
            t0 = time.monotonic()
            client = await started(fleet)
            tracker = Tracker(client)
            follow = asyncio.create_task(tracker.run())
            try:
                await join(fleet, client, args.join_timeout)
                result["join_s"] = round(time.monotonic() - t0, 1)
                await asyncio.sleep(args.settle)
                result["idle"] = await measure(fleet, args.idle_seconds)
                result["place"] = await place(fleet, client, tracker, args.instances, args.place_timeout)
                if result["place"]["reached"]:
                    await asyncio.sleep(args.settle)
                    result["loaded_idle"] = await measure(fleet, args.idle_seconds)
                    if fleet.victims:
                        result["failure"] = await fail(fleet, client, tracker, args.instances, args.place_timeout)
            finally:
                follow.cancel()
                await client.__aexit__(None, None, None)
        except (AssertionError, TimeoutError, OSError, CliError) as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            fleet.stop()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="10,100,1000", help="comma-separated fleet sizes")
    p.add_argument("--clusters", default="1,10", help="comma-separated cluster counts")
    p.add_argument("--instances", type=int, default=10_000)
    p.add_argument("--fail", type=int, default=100, help="workers killed at once (at most half the fleet)")
    p.add_argument("--idle-seconds", type=float, default=20)
    p.add_argument("--settle", type=float, default=5)
    p.add_argument("--report-interval", type=float, default=5.0, help="simulated workers' report interval")
    p.add_argument("--join-timeout", type=float, default=300)
    p.add_argument("--place-timeout", type=float, default=180)
    p.add_argument("--name", default="scale", help="results file bench/results/NAME.json")
    p.add_argument("--keep", default="", metavar="DIR", help="keep the processes' logs and data under DIR")
    p.add_argument("--broker", default="embedded", help="the control plane's broker: embedded or mosquitto")
    p.add_argument("--root-cpus", default="", metavar="N,...",
                   help="CPUs for the root (and the user lane) alone, as on a machine of its own; the clusters, "
                        "the simulated workers and the benchmark share the others (default: all share all)")
    p.add_argument("--root-nice", type=int, default=0, metavar="N",
                   help="the root's and the user lane's niceness (below 0 needs root: the CPU scheduler favours "
                        "them over the fleet, as when the root runs on a machine of its own; default: 0)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    cases = []
    try:
        for clusters in (int(c) for c in args.clusters.split(",")):
            for workers in (int(w) for w in args.workers.split(",")):
                case = asyncio.run(run_case(workers, clusters, args))
                print(json.dumps(case), flush=True)
                cases.append(case)
    finally:
        for fleet in LIVE:
            fleet.stop()
    record(args.name, {"command": "python -m bench.scale " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "broker": args.broker,
        "goal": "1,000 workers on one cluster: cluster under 50 % of a core at idle; 10,000 instances "
                "RUNNING within 60 s", "cases": cases})


if __name__ == "__main__":
    main()
