"""Placement throughput of the scheduling framework (issue 5).

* cluster tier: N instances placed one after another on 1,000 workers with the default profile
  (least-loaded, labels, geo) plus hard anti-affinity, reserving after each decision, as a cluster does;
* root tier: instances placed over 50 clusters of 20 workers each (each cluster judged by its best
  worker, as the root does);
* growth: time per placement for 10 ... 10,000 candidates.

Baseline, same run: a bare loop that runs only the built-in fit check over every candidate and takes
the one with the most free CPU (the floor of a scheduler that looks at every candidate once).

Run: ``.venv/bin/python -m bench.placement``
"""

from __future__ import annotations

import random
import time

from bench.common import record
from services.common import profile
from services.common.models import NodeSummary
from services.common.plugin_api import Candidate, Demand
from services.common.plugins import make_manager
from services.common.scheduling import fit, place, reserve
from services.root.clusters import ClusterView, choose

SPEC = "least-loaded,labels,geo,anti-affinity"


def workers(n: int, seed: int = 7) -> list[Candidate]:
    rng = random.Random(seed)
    return [Candidate(f"w{i:05d}", rng.choice([2, 4, 8]), rng.choice([2048, 4096, 8192]), 8, 8192, ("process",),
                      cpu_percent=rng.uniform(0, 80), location=f"{rng.uniform(45, 55):.3f},{rng.uniform(5, 15):.3f}",
                      labels=("gpu",) if i % 10 == 0 else ()) for i in range(n)]


def demand(i: int) -> Demand:
    return Demand(0.1, 64, "process", service=f"u/svc{i % 50}")


def cluster_tier(n_workers: int, placements: int) -> tuple[float, float]:
    """Placements per second with the profile, and with the fit-only baseline."""
    prof = profile.load(make_manager(), SPEC)
    candidates = {c.id: c for c in workers(n_workers)}
    t0 = time.perf_counter()
    for i in range(placements):
        d = demand(i)
        decision = place(d, list(candidates.values()), prof, "node")
        assert decision.choice is not None
        candidates[decision.choice.id] = reserve(decision.choice, d)
    framework = placements / (time.perf_counter() - t0)
    candidates = {c.id: c for c in workers(n_workers)}
    t0 = time.perf_counter()
    for i in range(placements):
        d = demand(i)
        chosen = max((c for c in candidates.values() if fit(d, c, "node") is None), key=lambda c: c.cpu_free)
        candidates[chosen.id] = reserve(chosen, d)
    baseline = placements / (time.perf_counter() - t0)
    return framework, baseline


def root_tier(n_clusters: int, per_cluster: int, placements: int) -> float:
    prof = profile.load(make_manager(), SPEC)
    views = []
    for c in range(n_clusters):
        view = ClusterView(f"c{c:03d}")
        view.set_online(True)
        view.nodes = {w.id: NodeSummary(w.id, True, w.cpu_total, w.memory_total_mb, w.cpu_free, w.memory_free_mb,
                                        w.cpu_percent, ["process"], location=w.location)
                      for w in workers(per_cluster, seed=c)}
        views.append(view)
    reserved: dict[str, dict[str, Demand]] = {}
    t0 = time.perf_counter()
    for i in range(placements):
        d = demand(i)
        decision, worker = choose(d, views, reserved, prof)
        assert decision.choice is not None
        reserved.setdefault(decision.choice.id, {})[worker] = d
    return placements / (time.perf_counter() - t0)


def main() -> None:
    framework, baseline = cluster_tier(1000, 2000)
    growth = {}
    for n in (10, 100, 1000, 10000):
        rate, floor = cluster_tier(n, min(2 * n, 500, max(20, 200_000 // n)))
        growth[n] = {"ms_per_placement": round(1000 / rate, 3), "fit_only_ms": round(1000 / floor, 3)}
    record("placement", {
        "command": "python -m bench.placement", "profile": SPEC,
        "cluster_1000_workers": {"placements_per_s": round(framework), "fit_only_baseline_per_s": round(baseline),
                                 "ratio_to_baseline": round(framework / baseline, 3)},
        "root_50_clusters_x_20_workers": {"placements_per_s": round(root_tier(50, 20, 500))},
        "growth": growth, "goal": "over 1,000 placements/s at a cluster of 1,000 workers",
    })


if __name__ == "__main__":
    main()
