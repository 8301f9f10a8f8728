"""The scheduling framework and the least-loaded plugin, table-driven."""

from __future__ import annotations

import pytest

from plugins.schedulers.least_loaded import LeastLoaded
from services.common.plugin_api import Candidate, Demand
from services.common.scheduling import Profile, Weighted, fit, place

PROFILE = Profile((Weighted(LeastLoaded()),))


def node(name: str, cpu: float = 4, mem: float = 4096, virt: tuple[str, ...] = ("process",),
         load: float = 0.0, nodes: tuple[str, ...] = ()) -> Candidate:
    return Candidate(name, cpu, mem, 4, 4096, virt, load, node_names=nodes)


DEMAND = Demand(vcpus=1, memory_mb=512, virtualization="process")

FIT_CASES = [
    ("fits", DEMAND, node("n1"), "node", None),
    ("no runtime", Demand(1, 512, "container"), node("n1"), "node", "no container runtime (has process)"),
    ("memory", Demand(1, 8192, "process"), node("n1"), "node", "memory 4096 < 8192"),
    ("vcpus", Demand(8, 1, "process"), node("n1"), "node", "vcpus 4 < 8"),
    ("direct node miss", Demand(1, 1, "process", nodes=("n2",)), node("n1"), "node", "not in direct node list n2"),
    ("direct node hit", Demand(1, 1, "process", nodes=("n1", "n2")), node("n1"), "node", None),
    ("direct cluster miss", Demand(1, 1, "process", clusters=("c2",)), node("c1"), "cluster",
     "not in direct cluster list c2"),
    ("cluster lacks direct node", Demand(1, 1, "process", nodes=("w9",)), node("c1", nodes=("w1",)), "cluster",
     "has none of the direct nodes w9"),
    ("cluster has direct node", Demand(1, 1, "process", nodes=("w1",)), node("c1", nodes=("w1",)), "cluster", None),
]


@pytest.mark.parametrize(("demand", "cand", "level", "reason"), [c[1:] for c in FIT_CASES],
                         ids=[c[0] for c in FIT_CASES])
def test_fit(demand: Demand, cand: Candidate, level: str, reason: str | None) -> None:
    """Fit rejects with a reason people can read."""
    assert fit(demand, cand, level) == reason


def test_place_picks_least_loaded_and_explains_failures() -> None:
    """The emptiest fitting candidate wins; when none fits, every rejection is listed."""
    decision = place(DEMAND, [node("busy", cpu=1.5, mem=600), node("idle"), node("hot", load=90)], PROFILE, "node")
    assert decision.choice is not None
    assert decision.choice.id == "idle"
    decision = place(Demand(1, 9999, "process"), [node("a"), node("b", virt=("container",))], PROFILE, "node")
    assert decision.choice is None
    assert decision.why_not() == "a: memory 4096 < 9999; b: no process runtime (has container)"


def test_place_is_deterministic_on_ties() -> None:
    """Equal candidates are broken by id, so a decision can be replayed."""
    assert place(DEMAND, [node("b"), node("a"), node("c")], PROFILE, "node").choice.id == "c"  # type: ignore[union-attr]
