"""A root under hostile and bursty load (issues 20 and 21), on the embedded broker and on mosquitto.

For each broker, a root (with a cluster and a worker, for the deploys) on loopback; the user ``bob``,
connected all along, asks ``services/list`` over and over, and its latency is measured:

* idle: nothing else happening (the baseline every other figure is a ratio to, from the same run);
* password flood: 25 CONNECTs a second for ``admin`` with a wrong password, for *flood* seconds;
* idle sockets: *sockets* TCP connections to the TLS port that never send anything, from 100 loopback
  addresses (within the embedded broker's per-address limit), held while bob is measured;
* burst: 1,000 requests published by ``mosquitto_pub -l``, which exits at once; also how many of them
  were answered.

And what short-lived clients pay: the time of a TLS CONNECT/CONNACK for a user, the first one (its
password is hashed: 100,000 rounds of PBKDF2) against the next ones (it is remembered); and 50
concurrent ``services/deploy`` requests from 5 users, each from a client that connects, asks and leaves
as the CLI does.

Run: ``.venv/bin/python -m bench.load [--flood 10] [--sockets 10000]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.common import percentile, record, summary
from bench.three_tiers import sla
from broker.probe import connect_packet
from services.cli.client import CliError, OakClient, Profile
from services.common.mqtt import tls_context
from tests.conftest import answers_by_transaction, subscribed
from tests.stack import Stack, end, eventually

USERS = 5
DEPLOYS = 50
BURST = 1000


def app_sla(app: str, count: int) -> bytes:
    """An application *app* of *count* sleeping process services, s0, s1, ..."""
    document = json.loads(sla(app, "s0", ["sleep", "3600"]))
    document["applications"][0]["microservices"] = [
        json.loads(sla(app, f"s{n}", ["sleep", "3600"]))["applications"][0]["microservices"][0] for n in range(count)]
    return json.dumps(document).encode()


def _ms(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(percentile(values, 50), 2), "p99": round(percentile(values, 99), 2)}


async def login_ms(port: int, username: str, password: str, context: ssl.SSLContext,
                   source: str = "127.0.0.1") -> float:
    """Milliseconds of one TLS connection, CONNECT and CONNACK (raises unless accepted)."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, local_addr=(source, 0))
    try:
        writer.write(connect_packet(f"{username}-{time.perf_counter_ns()}", username, password))
        accepted = (await reader.readexactly(4))[3] == 0
        writer.write(b"\xe0\x00")
        await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    if not accepted:
        raise PermissionError(f"{username} refused")
    return (time.perf_counter() - started) * 1000


async def sample(client: OakClient, until: Callable[[], bool]) -> list[float]:
    """bob's services/list latencies (ms), one after another, until *until*() is true (one the root did not
    answer counts as the 15 s the client waited)."""
    latencies = []
    while not until():
        started = time.perf_counter()
        with contextlib.suppress(CliError):  # unanswered in 15 s: counted as the 15 s it took
            await client.request("services", "list")
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


async def during(client: OakClient, load: Awaitable[Any]) -> tuple[list[float], Any]:
    """bob's latencies while *load* runs, and what it returned."""
    task = asyncio.ensure_future(load)
    latencies = await sample(client, task.done)
    return latencies, await task


async def flood(port: int, context: ssl.SSLContext, seconds: float, rate: float = 25.0) -> int:
    """Wrong passwords for admin at *rate* a second for *seconds*; how many were refused."""
    refused = 0

    async def attempt() -> None:
        nonlocal refused
        try:
            await login_ms(port, "admin", "wrong-password", context)
        except (PermissionError, OSError, ssl.SSLError, asyncio.IncompleteReadError):
            refused += 1

    attempts = []
    for _ in range(int(seconds * rate)):
        attempts.append(asyncio.ensure_future(attempt()))
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*attempts)
    return refused


async def idle_sockets(port: int, count: int, hold: float) -> int:
    """Open *count* connections that send nothing, from 100 loopback addresses; hold them *hold* seconds
    once open; how many were open then."""
    writers = []
    for n in range(count):
        with contextlib.suppress(OSError):
            writers.append((await asyncio.open_connection("127.0.0.1", port,
                                                          local_addr=(f"127.0.1.{n % 100 + 1}", 0)))[1])
    await asyncio.sleep(hold)
    for writer in writers:
        writer.close()
    return len(writers)


def burst(base: Path, port: int, profile: Profile) -> int:
    """BURST requests by mosquitto_pub -l (QoS 1), which exits at once; how many were answered."""
    out = base / "burst.txt"
    login = ["-V", "mqttv311", "-h", "127.0.0.1", "-p", str(port), "--cafile", str(profile.ca),
             "-u", profile.username, "-P", profile.password]
    answers = subscribed(["mosquitto_sub", *login, "-i", f"{profile.username}-burst-answers", "-q", "1",
                          "-t", f"oak/api/{profile.username}/response/services/list"], out)

    def answered() -> int:
        return sum(1 for t in answers_by_transaction(out.read_text()) if t.startswith("b"))

    try:
        requests = "".join(json.dumps({"transaction": f"b{n}"}) + "\n" for n in range(BURST))
        subprocess.run(["mosquitto_pub", *login, "-i", f"{profile.username}-burst", "-q", "1", "-l",
                        "-t", f"oak/api/{profile.username}/request/services/list"], input=requests, text=True,
                       check=True, timeout=60)
        deadline = time.monotonic() + 30
        while answered() < BURST and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        end(answers)
    return answered()


async def deploys(profiles: list[Profile]) -> list[float]:
    """DEPLOYS concurrent deploys, spread over the users, each from a client that connects, asks and
    leaves; milliseconds from connecting to the answer."""

    async def one(profile: Profile, n: int) -> float:
        started = time.perf_counter()
        async with OakClient(profile) as client:
            await client.request("services", "deploy", {"service": f"{profile.username}.bench.s{n}.bench",
                                                        "replicas": 1})
        return (time.perf_counter() - started) * 1000

    return list(await asyncio.gather(*(one(profiles[n % len(profiles)], n // len(profiles))
                                       for n in range(DEPLOYS))))


@contextlib.asynccontextmanager
async def root_stack(base: Path, broker: str) -> AsyncIterator[Stack]:
    """Root, cluster c1 and worker w1 on *broker*."""
    args = ("--broker", "mosquitto") if broker == "mosquitto" else ()
    stack = Stack(base, root_args=args, cluster_args=args)
    try:
        stack.root()
        stack.cluster("c1")
        stack.worker("w1", "c1")
        await eventually(lambda: (base / "root" / "credentials.json").exists(), 60, what="root up")
        yield stack
    finally:
        stack.stop()


async def measure(broker: str, flood_seconds: float, sockets: int) -> dict[str, Any]:
    """Every figure on *broker*."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        async with root_stack(base, broker) as stack:
            admin_profile = stack.profile()
            async with OakClient(admin_profile) as admin:
                await eventually(lambda: _online(admin), 60, what="the worker online")
                profiles = []
                for name in ("bob", *(f"u{n}" for n in range(USERS)), "carol"):
                    await admin.request("users", "create", {"username": name, "password": f"{name}-password"})
                    profiles.append(Profile(name, f"{name}-password", admin_profile.root, admin_profile.ca))
                bob, users = profiles[0], profiles[1:-1]  # carol has not logged in yet
                for user in users:
                    async with OakClient(user) as client:
                        await client.request("apps", "create", raw=app_sla(user.username, DEPLOYS // USERS))
            port = admin_profile.root.port
            context = tls_context(admin_profile.ca)
            first = await login_ms(port, "carol", "carol-password", context)
            again = [await login_ms(port, "carol", "carol-password", context) for _ in range(30)]
            async with OakClient(bob) as client:
                end = time.monotonic() + 10
                idle = await sample(client, lambda: time.monotonic() > end)
                flooded, refused = await during(client, flood(port, context, flood_seconds))
                held, opened = await during(client, idle_sockets(port, sockets, 3.0))
                bursty, answered = await during(client, asyncio.to_thread(burst, base, port, admin_profile))
            deployed = await deploys(users)
    base_p50, base_p99 = percentile(idle, 50), percentile(idle, 99)
    figures: dict[str, Any] = {"idle_ms": _ms(idle)}
    for name, values in (("password_flood", flooded), ("idle_sockets", held), ("burst", bursty)):
        figures[f"{name}_ms"] = {**_ms(values), "ratio_p50": round(percentile(values, 50) / base_p50, 2),
                                 "ratio_p99": round(percentile(values, 99) / base_p99, 2)}
    figures["password_flood_ms"]["refused"] = refused
    figures["idle_sockets_ms"]["open"] = opened
    figures["burst_ms"]["answered"] = f"{answered}/{BURST}"
    figures["connect_ms"] = {"first": round(first, 2), "again": _ms(again),
                             "ratio_first_to_again": round(first / percentile(again, 50), 1)}
    figures["deploys_50_from_5_users_ms"] = {k: round(v, 1) for k, v in summary(deployed).items()}
    print(broker, json.dumps(figures), flush=True)
    return figures


async def _online(client: OakClient) -> bool:
    return any(n["online"] for n in await client.request("nodes", "list"))


async def run(flood_seconds: float, sockets: int) -> None:
    """Both brokers, one after the other."""
    results = {broker: await measure(broker, flood_seconds, sockets) for broker in ("embedded", "mosquitto")}
    record("load", {"command": f"python -m bench.load --flood {flood_seconds} --sockets {sockets}", **results,
                    "goal": "under each load bob's p99 stays under 100 ms; every burst request answered; a "
                            "short-lived client's repeated login costs no hashing"})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--flood", type=float, default=10.0, help="seconds of wrong passwords (25 a second)")
    p.add_argument("--sockets", type=int, default=10_000, help="idle connections to hold")
    args = p.parse_args()
    asyncio.run(run(args.flood, args.sockets))


if __name__ == "__main__":
    main()
