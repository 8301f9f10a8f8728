"""What the metrics endpoints cost (issue 19): CPU of the same set-up with and without them, in the same run,
Prometheus scraping every endpoint every SCRAPE_EVERY seconds in the runs with them.

1. ``oak up`` (1-DOC) idle: its one process, with its three endpoints, against ``oak up --no-metrics``.
2. A root and one cluster with 1,000 simulated workers (``oak sim``) holding INSTANCES instances: the root and
   the cluster, each with its endpoint, against the same without (simulated workers serve none).

Run: ``.venv/bin/python -m bench.metrics [--seconds 60] [--workers 1000] [--instances 2000]``
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import record
from bench.fleet import Fleet
from bench.scale import Tracker, join, measure, place, started
from bench.three_tiers import idle_up
from services.common.metrics import PORTS
from tests.stack import free_port

SCRAPE_EVERY = 5.0


async def scraping(ports: list[int]) -> None:
    """Scrape *ports* every SCRAPE_EVERY seconds until cancelled, as Prometheus would."""
    while True:
        for port in ports:
            await asyncio.to_thread(_scrape, port)
        await asyncio.sleep(SCRAPE_EVERY)


def _scrape(port: int) -> int:
    """Bytes of one scrape of the endpoint on *port*."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return len(answer.read())


async def idle_1doc(with_metrics: bool, seconds: float) -> dict[str, float]:
    """% of a core and RSS of an idle ``oak up`` over *seconds* (scraped meanwhile, with its endpoints)."""
    if with_metrics:
        cpu, rss = await idle_up(seconds, during=lambda: scraping(list(PORTS.values())))
    else:
        cpu, rss = await idle_up(seconds, "--no-metrics")
    return {"cpu_percent_of_one_core": round(cpu, 2), "rss_mb": round(rss, 1)}


async def fleet_case(with_metrics: bool, workers: int, instances: int, seconds: float) -> dict[str, Any]:
    """% of a core of the root and the cluster over *seconds*, once *workers* simulated workers hold
    *instances* instances."""
    with tempfile.TemporaryDirectory() as tmp:
        fleet = Fleet(Path(tmp), workers, 1, 0)
        ports = [free_port(), free_port()] if with_metrics else [0, 0]
        fleet.stack.root_args = ("--metrics-port", str(ports[0]))
        fleet.stack.cluster_args = ("--metrics-port", str(ports[1]))
        scraper = None
        try:
            client = await started(fleet)
            tracker = Tracker(client)
            follow = asyncio.create_task(tracker.run())
            try:
                await join(fleet, client, 180)
                placed = await place(fleet, client, tracker, instances, 300)
                if with_metrics:
                    scraper = asyncio.create_task(scraping(ports))
                await asyncio.sleep(10)
                usage = await measure(fleet, seconds)
                sizes = {"root": _scrape(ports[0]), "cluster": _scrape(ports[1])} if with_metrics else {}
            finally:
                follow.cancel()
                await client.__aexit__(None, None, None)
        finally:
            if scraper:
                scraper.cancel()
            fleet.stop()
    return {"running": placed["running"], "root": usage["root"], "cluster": usage["c01"], "scrape_bytes": sizes}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--workers", type=int, default=1000)
    p.add_argument("--instances", type=int, default=2000)
    args = p.parse_args()
    result: dict[str, Any] = {
        "command": f"python -m bench.metrics --seconds {args.seconds:g} --workers {args.workers} "
                   f"--instances {args.instances}", "scrape_every_s": SCRAPE_EVERY}
    started = time.monotonic()
    with_, without = asyncio.run(idle_1doc(True, args.seconds)), asyncio.run(idle_1doc(False, args.seconds))
    result["idle_1doc"] = {"with": with_, "without": without,
                           "cpu_ratio": round(with_["cpu_percent_of_one_core"]
                                              / max(without["cpu_percent_of_one_core"], 0.01), 2)}
    big_with = asyncio.run(fleet_case(True, args.workers, args.instances, args.seconds))
    big_without = asyncio.run(fleet_case(False, args.workers, args.instances, args.seconds))
    result["fleet"] = {"with": big_with, "without": big_without} | {
        f"{tier}_cpu_ratio": round(big_with[tier]["cpu_percent"] / max(big_without[tier]["cpu_percent"], 0.01), 2)
        for tier in ("root", "cluster")}
    result["took_s"] = round(time.monotonic() - started)
    record("metrics_cost", result)


if __name__ == "__main__":
    main()
