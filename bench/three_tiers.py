"""Benchmarks of the three tiers with the process runtime (issue 2).

* submit-to-RUNNING: ``services/deploy`` of a one-replica process service through root -> cluster ->
  worker until the root's retained state says RUNNING, against spawning the same process directly, and
  against the process runtime starting it alone (as root: in its sandbox, as the worker does);
* worker death to RUNNING elsewhere: kill -9 a worker and time until its instances run on the other;
* idle footprint of a 1-DOC stack (``oak up``): RSS and CPU of the process tree.

Run: ``.venv/bin/python -m bench.three_tiers [--rounds N] [--broker mosquitto]`` (``--broker``: the root's and
the cluster's broker for submit-to-RUNNING, recorded as ``submit_to_running_mosquitto``; embedded by default)
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil

from bench.common import record, summary
from broker.backend import EMBEDDED, MOSQUITTO
from plugins.runtimes.process import ProcessRuntime
from services.cli.client import OakClient, Profile, decode_state
from services.common import channels
from services.common.plugin_api import LaunchSpec
from tests.stack import Proc, Stack, eventually, free_port, oak


def sla(app: str, name: str, cmd: list[str]) -> bytes:
    service = {"microserviceID": "", "microservice_name": name, "microservice_namespace": "bench",
               "virtualization": "process", "code": "", "cmd": cmd, "memory": 10, "vcpus": 0.01}
    return json.dumps({"sla_version": "v2.0", "customerID": "bench", "applications": [{
        "applicationID": "", "application_name": app, "application_namespace": "bench", "application_desc": "",
        "microservices": [service]}]}).encode()


async def client_for(stack: Stack) -> OakClient:
    await eventually(lambda: (stack.base / "root" / "credentials.json").exists(), 30, what="root up")
    client = OakClient(stack.profile())
    return await client.__aenter__()


async def wait_status(client: OakClient, job: str, want: str) -> float:
    """Return the monotonic time at which *job*'s retained state first says *want*."""
    topic = channels.API_SERVICE_STATE.topic(user=client.profile.username, job=job)
    while True:
        message = await asyncio.wait_for(client.updates.get(), 30)
        if message.topic == topic and message.payload and decode_state(message.payload)["status"] == want:
            return time.monotonic()


async def spawn_baseline(rounds: int) -> list[float]:
    """Milliseconds to start ``sleep`` directly and see it running."""
    out = []
    for _ in range(rounds):
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec("sleep", "30")
        psutil.Process(proc.pid).status()
        out.append((time.monotonic() - t0) * 1000)
        proc.kill()
        await proc.wait()
    return out


async def runtime_baseline(rounds: int, data_dir: Path) -> list[float]:
    """Milliseconds for the process runtime alone (in this process, no tiers) to start the same ``sleep``
    as an instance: as root that is its sandbox (namespaces, its own cgroup), what a worker does too."""
    runtime = ProcessRuntime(str(data_dir), "bench")
    out = []
    for n in range(rounds):
        work = data_dir / "work" / f"b{n}"
        work.mkdir(parents=True)
        spec = LaunchSpec(iid=f"bench-{n}", job_name="bench.bench.svc.bench", instance_number=0,
                          virtualization="process", code="", cmd=("sleep", "3600"), environment=(), memory_mb=10,
                          vcpus=0.01, one_shot=False, log_path=str(data_dir / f"b{n}.log"), work_dir=str(work))
        t0 = time.monotonic()
        handle = await runtime.start(spec)
        out.append((time.monotonic() - t0) * 1000)
        await runtime.stop(handle, 1.0)
    return out


async def deploy_rounds(client: OakClient, app: str, rounds: int) -> list[float]:
    """Milliseconds from ``services/deploy`` of a one-replica ``sleep`` service until its retained state
    says RUNNING, *rounds* times; each round then undeploys it and waits until the cluster has reported the
    instance gone, so the next one measures a deploy on an idle stack (the root says UNDEPLOYED before the
    worker has stopped it)."""
    await client.request("apps", "create", raw=sla(app, "svc", ["sleep", "3600"]))
    job = f"{app}.bench.svc.bench"
    await client.session.subscribe_confirmed(channels.API_SERVICE_STATE.topic(user=client.profile.username, job=job))
    latencies = []
    for _ in range(rounds):
        t0 = time.monotonic()
        await client.request("services", "deploy", {"service": job, "replicas": 1})
        latencies.append((await wait_status(client, job, "RUNNING") - t0) * 1000)
        await client.request("services", "undeploy", {"service": job})
        await wait_status(client, job, "UNDEPLOYED")
        await eventually(lambda: _no_instances(client), 30, 0.01, what="the undeploy reported")
    return latencies


async def _no_instances(client: OakClient) -> bool:
    return all(cluster["instances"] == 0 for cluster in await client.request("clusters", "list"))


async def submit_to_running(rounds: int, broker: str = EMBEDDED) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp), root_args=("--broker", broker), cluster_args=("--broker", broker))
        try:
            stack.root()
            stack.cluster("c1")
            stack.worker("w1", "c1")
            client = await client_for(stack)
            await eventually(lambda: _online(client, 1), 30, what="worker online")
            latencies = await deploy_rounds(client, "lat", rounds)
            baseline = await spawn_baseline(rounds)
            await client.__aexit__(None, None, None)
        finally:
            stack.stop()
        sandboxed = await runtime_baseline(rounds, Path(tmp) / "runtime")
    lat, base, alone = summary(latencies), summary(baseline), summary(sandboxed)
    name, command = "submit_to_running", "python -m bench.three_tiers"
    if broker != EMBEDDED:
        name, command = f"{name}_{broker}", f"{command} --broker {broker}"
    record(name, {
        "command": command, "broker": broker, "unit": "ms", "orchestrated": lat, "direct_spawn": base,
        "ratio_median": lat["median"] / base["median"], "added_median_ms": lat["median"] - base["median"],
        "runtime_start": alone, "ratio_to_runtime_start": lat["median"] / alone["median"],
        "added_to_runtime_start_ms": lat["median"] - alone["median"],
        "goal": "p50 under 40 ms",
    })


async def _online(client: OakClient, count: int) -> bool:
    return sum(1 for n in await client.request("nodes", "list") if n["online"]) >= count


async def worker_death(rounds: int) -> None:
    durations = []
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp))
        try:
            stack.root()
            stack.cluster("c1")
            stack.worker("wa", "c1")
            stack.worker("wb", "c1")
            client = await client_for(stack)
            await eventually(lambda: _online(client, 2), 30, what="workers online")
            await client.request("apps", "create", raw=sla("fail", "svc", ["sleep", "3601"]))
            job = "fail.bench.svc.bench"
            await client.request("services", "deploy", {"service": job, "replicas": 4})
            for _ in range(rounds):
                state = await eventually(lambda: _all_running(client, job, 4), 30, what="all running")
                victim = max({i["node"] for i in state["instances"]},
                             key=lambda n: sum(i["node"] == n for i in state["instances"]))
                moved = {i["iid"] for i in state["instances"] if i["node"] == victim}
                t0 = time.monotonic()
                stack.procs[victim].kill9()
                for proc in psutil.process_iter(["cmdline"]):
                    if proc.info["cmdline"] == ["sleep", "3601"] and proc.parent() is None:
                        proc.kill()
                await eventually(functools.partial(_moved, client, job, moved, victim), 30, 0.02, what="moved")
                durations.append(time.monotonic() - t0)
                stack.procs[victim].start()
                await eventually(lambda: _online(client, 2), 30, what="victim back")
            await client.__aexit__(None, None, None)
        finally:
            stack.stop()
    record("worker_death_to_running", {
        "command": "python -m bench.three_tiers", "unit": "s", "failover": summary(durations),
        "baseline": "Oakestra: 30-45 s (30 s inactivity threshold + 15 s redeploy tick)",
        "ratio_median_vs_oakestra_30s": summary(durations)["median"] / 30.0, "goal": "under 5 s",
    })


async def _all_running(client: OakClient, job: str, n: int) -> dict | None:
    state = await client.request("services", "inspect", {"service": job})
    ok = len(state["instances"]) == n and all(i["status"] == "RUNNING" for i in state["instances"])
    return state if ok else None


async def _moved(client: OakClient, job: str, iids: set[str], victim: str) -> bool:
    state = await client.request("services", "inspect", {"service": job})
    return all(i["status"] == "RUNNING" and i["node"] != victim for i in state["instances"] if i["iid"] in iids)


async def idle_up(seconds: float, *flags: str, during: Callable[[], Awaitable[None]] | None = None
                  ) -> tuple[float, float]:
    """% of one core and RSS (MB) of an idle ``oak up FLAGS`` over *seconds*, once its worker is online, with
    *during* running meanwhile (e.g. a scraper)."""
    with tempfile.TemporaryDirectory() as tmp:
        port, cport = free_port(), free_port()
        proc = Proc("up", oak("up", "--data-dir", tmp, "--host", "127.0.0.1", "--port", str(port),
                              "--cluster-port", str(cport), "--name", "bench-worker", *flags), Path(tmp)).start()
        side = None
        try:
            await eventually(lambda: (Path(tmp) / "credentials.json").exists(), 30, what="up")
            client = await OakClient(Profile.load(Path(tmp))).__aenter__()
            await eventually(lambda: _online(client, 1), 30, what="worker online")
            await client.__aexit__(None, None, None)
            side = asyncio.ensure_future(during()) if during else None
            await asyncio.sleep(5)  # settle
            ps = psutil.Process(proc.popen.pid)  # type: ignore[union-attr]
            cpu0 = sum(ps.cpu_times()[:2])
            await asyncio.sleep(seconds)
            cpu = (sum(ps.cpu_times()[:2]) - cpu0) / seconds * 100
            rss = ps.memory_info().rss / 2**20
        finally:
            if side:
                side.cancel()
            proc.stop()
    return cpu, rss


async def idle_footprint(seconds: float) -> None:
    cpu, rss = await idle_up(seconds)
    record("idle_footprint_1doc", {
        "command": "python -m bench.three_tiers", "rss_mb": round(rss, 1), "cpu_percent_of_one_core": round(cpu, 2),
        "window_s": seconds, "processes": 1, "baseline": "Oakestra's control plane: 0.5-1 GB RSS (paper)",
        "ratio_rss_vs_oakestra_512mb": round(rss / 512, 3), "goal": "under 150 MB and under 2 % of a core",
    })


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--failovers", type=int, default=5)
    p.add_argument("--idle-seconds", type=float, default=30)
    p.add_argument("--broker", choices=(EMBEDDED, MOSQUITTO), default=EMBEDDED,
                   help="the root's and the cluster's broker for submit-to-RUNNING")
    args = p.parse_args()
    asyncio.run(submit_to_running(args.rounds, args.broker))
    if args.failovers:
        asyncio.run(worker_death(args.failovers))
    if args.idle_seconds > 0:
        asyncio.run(idle_footprint(args.idle_seconds))


if __name__ == "__main__":
    main()
