"""The scheduling framework shared by the root (candidates = clusters) and clusters (candidates = workers).

One call, :func:`place`, runs the pipeline in this order:

1. **fit** (always, not pluggable): virtualization offered, ``direct`` constraint, enough free vCPUs
   and memory. Cheap checks first; each rejection keeps a reason people can read.
2. the plugin's **filter**, for whatever else it wants to exclude.
3. the plugin's **score** (0..100) on the survivors; the highest wins, ties broken by id so a decision
   can be replayed.

Reservations are the caller's job: it lowers the chosen candidate's free resources before the next
decision, so a burst of deployments does not pile onto one node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.hookspecs import Candidate, Demand, SchedulerPlugin


@dataclass(frozen=True)
class Decision:
    """The chosen candidate (None when nothing fits) and why every other candidate was rejected."""

    choice: Candidate | None
    reasons: dict[str, str] = field(default_factory=dict)

    def why_not(self) -> str:
        """One line that explains a failed placement, e.g. ``"w1: memory 512 < 1024; w2: offline"``."""
        if not self.reasons:
            return "no candidates"
        return "; ".join(f"{cid}: {reason}" for cid, reason in sorted(self.reasons.items()))


def fit(demand: Demand, candidate: Candidate, level: str) -> str | None:
    """Return why *candidate* cannot hold *demand*, or None. *level* is ``cluster`` or ``node``."""
    if demand.virtualization not in candidate.virtualizations:
        offered = ",".join(candidate.virtualizations) or "none"
        return f"no {demand.virtualization} runtime (has {offered})"
    wanted = demand.clusters if level == "cluster" else demand.nodes
    if wanted and candidate.id not in wanted:
        return f"not in direct {level} list {','.join(wanted)}"
    if level == "cluster" and demand.nodes and not set(demand.nodes) & set(candidate.node_names):
        return f"has none of the direct nodes {','.join(demand.nodes)}"
    if candidate.cpu_free + 1e-9 < demand.vcpus:
        return f"vcpus {candidate.cpu_free:g} < {demand.vcpus:g}"
    if candidate.memory_free_mb + 1e-9 < demand.memory_mb:
        return f"memory {candidate.memory_free_mb:.0f} < {demand.memory_mb}"
    return None


def place(demand: Demand, candidates: list[Candidate], plugin: SchedulerPlugin, level: str) -> Decision:
    """Choose the candidate for one instance."""
    reasons: dict[str, str] = {}
    feasible: list[Candidate] = []
    for candidate in candidates:
        reason = fit(demand, candidate, level) or plugin.filter(demand, candidate)
        if reason:
            reasons[candidate.id] = reason
        else:
            feasible.append(candidate)
    if not feasible:
        return Decision(None, reasons)
    best = max(feasible, key=lambda c: (max(0.0, min(100.0, plugin.score(demand, c))), c.id))
    return Decision(best, reasons)
