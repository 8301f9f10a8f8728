"""Benchmark of chaos (issue 17): many random faults (kill -9, SIGSTOP, restart of the root, a cluster or a
worker, one at a time) on one root, two clusters of two workers, three services of three replicas
(tests/chaos.py). After each, the seconds until every replica runs exactly once again (in the process
table and in the root's state); at the end, what the fleet left behind once stopped.

Run: ``.venv/bin/python -m bench.chaos [--faults N] [--seed S]``
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
from pathlib import Path

from bench.common import record, summary
from bench.three_tiers import _online, client_for
from tests.chaos import CLUSTERS, Chaos, Fault, leftovers, plan, start_fleet
from tests.stack import Stack, eventually


async def run(seed: int, count: int) -> None:
    faults = plan(seed, count)
    print(f"chaos seed {seed}: {count} faults", flush=True)
    took: list[tuple[Fault, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp))
        try:
            start_fleet(stack)
            client = await client_for(stack)
            await eventually(lambda: _online(client, sum(len(w) for w in CLUSTERS.values())), 60, what="workers")
            chaos = await Chaos.start(stack, client)
            for n, fault in enumerate(faults, 1):
                seconds = await chaos.inflict(fault)
                took.append((fault, seconds))
                print(f"[{n}/{count}] {fault}: converged {seconds:.1f} s after", flush=True)
            await client.__aexit__(None, None, None)
        finally:
            stack.stop()
        left = leftovers(stack.base, chaos.iids)
    by_kind = {kind: summary([s for f, s in took if f.kind == kind]) for kind in sorted({f.kind for f, _ in took})}
    by_target = {target: summary([s for f, s in took if f.target == target])
                 for target in sorted({f.target for f, _ in took})}
    worst = max(took, key=lambda pair: pair[1])
    record("chaos", {
        "command": f"python -m bench.chaos --faults {count} --seed {seed}", "unit": "s", "seed": seed,
        "faults": count, "converged_after_every_fault": len(took) == count, "leftovers": left,
        "recovery_by_kind": by_kind, "recovery_by_target": by_target,
        "worst": {"fault": str(worst[0]), "seconds": worst[1]},
        "goal": "issue 17: every replica RUNNING exactly once after every fault, nothing left behind; "
                "recovery = from the end of a fault (restart or thaw) until then",
    })


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--faults", type=int, default=40)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args()
    asyncio.run(run(args.seed if args.seed is not None else random.randrange(2**31), args.faults))


if __name__ == "__main__":
    main()
