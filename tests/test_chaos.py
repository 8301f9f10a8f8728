"""Chaos in CI: a few random faults (kill -9, SIGSTOP, restart) on a fleet of real processes, one root, two
clusters of two workers, three services of three replicas. After every fault the fleet converges to each
replica RUNNING exactly once (in the process table), the last acknowledged scale holds, and once the
fleet stops nothing is left behind. The seed is in the failure message; replay it with
``OAK_CHAOS_SEED=<seed>`` (and ``OAK_CHAOS_FAULTS=<count>``). bench/chaos.py runs many more.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

from tests.chaos import CLUSTERS, Chaos, leftovers, plan, start_fleet
from tests.conftest import Stack, eventually, online_nodes


@pytest.mark.timeout(900)
async def test_random_faults_end_with_every_replica_running_once(stack: Stack, api: Any) -> None:
    seed = int(os.environ.get("OAK_CHAOS_SEED") or random.randrange(2**31))
    faults = plan(seed, int(os.environ.get("OAK_CHAOS_FAULTS", "4")))
    replay = f"chaos seed {seed} (OAK_CHAOS_SEED={seed}): " + "; ".join(map(str, faults))
    print(replay)
    start_fleet(stack)
    client = await api()
    workers = sum(len(w) for w in CLUSTERS.values())
    await eventually(lambda: online_nodes(client, workers), 60, what="every worker online")
    chaos = await Chaos.start(stack, client)
    done = []
    try:
        for fault in faults:
            done.append(f"{fault}: converged {await chaos.inflict(fault):.1f} s after")
    except AssertionError as exc:
        raise AssertionError(f"{replay}\nafter {done}: {exc}\n{stack.logs()}") from None
    stack.stop()
    assert leftovers(stack.base, chaos.iids) == [], replay
