"""The scheduling framework shared by the root (candidates = clusters) and clusters (candidates = workers).

:func:`place` runs one decision through the profile, in this order:

1. **fit** (always, not pluggable): the virtualization, the architecture and the ``direct`` constraint
   first (cheap), then free vCPUs, memory and GPUs. Every rejection keeps a reason people can read.
2. each plugin's **filter**, in profile order, on the candidates that are left;
3. each plugin's **score** on the survivors, **normalised** per plugin to 0..100, multiplied by the
   plugin's weight and summed. The highest total wins; ties go to the larger id, so a decision can be
   replayed.

Reservations are the caller's job: it lowers the chosen candidate's free resources before the next
decision, so a burst of deployments does not pile onto one node.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain, islice

from services.common.plugin_api import (
    Candidate,
    ConstraintEvaluator,
    Demand,
    FilterPlugin,
    Normalizer,
    SchedulerPlugin,
    ScorePlugin,
)

MIN_SCORE, MAX_SCORE = 0.0, 100.0


@dataclass(frozen=True)
class Weighted:
    """A plugin of a profile and its weight."""

    plugin: SchedulerPlugin
    weight: float = 1.0


@dataclass(frozen=True)
class Profile:
    """The plugins a root or cluster schedules with, in order, with their weights.

    ``sample`` bounds the work of one decision on large fleets: once that many candidates (at least,
    or 5 % of them when more) have passed the filters, the rest are not looked at. The scan starts at
    a place derived from the service, so replicas do not all probe the same candidates first.
    """

    plugins: tuple[Weighted, ...]
    sample: int = 100

    def __post_init__(self) -> None:
        for weighted in self.plugins:
            if not isinstance(weighted.plugin, FilterPlugin | ScorePlugin):
                raise ValueError(f"scheduler plugin {weighted.plugin.name!r} implements neither filter nor score")

    @property
    def names(self) -> list[str]:
        """The plugins' names, for logs and info."""
        return [w.plugin.name for w in self.plugins]

    @functools.cached_property
    def filters(self) -> tuple[FilterPlugin, ...]:
        """The plugins at the filter extension point, in profile order."""
        return tuple(w.plugin for w in self.plugins if isinstance(w.plugin, FilterPlugin))

    @functools.cached_property
    def scorers(self) -> tuple[tuple[ScorePlugin, float], ...]:
        """The plugins at the score extension point, with their weights."""
        return tuple((w.plugin, w.weight) for w in self.plugins if isinstance(w.plugin, ScorePlugin))

    @functools.cached_property
    def normalizers(self) -> dict[int, Normalizer]:
        """The scorers that normalise their own scores, by ``id`` (asked once, not per decision)."""
        return {id(plugin): plugin for plugin, _ in self.scorers if isinstance(plugin, Normalizer)}

    def sampling(self, sample: int) -> Profile:
        """This profile looking at *sample* candidates; made once per size, as a burst asks for the same
        one at every decision."""
        if sample == self.sample:
            return self
        made = self._samplings.get(sample)
        if made is None:
            made = self._samplings[sample] = replace(self, sample=sample)
        return made

    @functools.cached_property
    def _samplings(self) -> dict[int, Profile]:
        return {}


# Constraint types the framework's fit handles itself, and Oakling's plugins for the others (for the hint
# a refused deploy gives).
FIT_CONSTRAINTS = frozenset({"direct"})
OWN_EVALUATORS = {"geo": "geo", "addons": "labels", "latency": "latency"}


def unevaluated(profile: Profile, constraint_types: Iterable[str]) -> list[str]:
    """The constraint types among *constraint_types* that neither fit nor any plugin of *profile* evaluates."""
    evaluated = {kind for weighted in profile.plugins if isinstance(weighted.plugin, ConstraintEvaluator)
                 for kind in weighted.plugin.evaluates}
    return sorted({kind for kind in constraint_types if kind not in FIT_CONSTRAINTS and kind not in evaluated})


def unevaluated_reason(profile: Profile, kinds: list[str]) -> str:
    """Why a service with constraints of *kinds* (from :func:`unevaluated`) is refused, and what to enable."""
    hints = [f"{OWN_EVALUATORS[k]!r} for {k!r}" for k in kinds if k in OWN_EVALUATORS]
    return (f"no enabled scheduler plugin evaluates {', '.join(repr(k) for k in kinds)} constraints (enabled: "
            f"{', '.join(profile.names)}); it would be placed as if they were not there"
            + (f": enable {', '.join(hints)} (oak root --scheduler ...)" if hints else ""))


@dataclass(frozen=True)
class Decision:
    """The chosen candidate (None when nothing fits), every candidate's total, and why others lost."""

    choice: Candidate | None
    reasons: dict[str, str] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=dict)

    def why_not(self) -> str:
        """One line explaining a failed placement, e.g. ``"w1: memory 512 < 1024; w2: no process runtime"``."""
        if not self.reasons:
            return "no candidates"
        return "; ".join(f"{cid}: {reason}" for cid, reason in sorted(self.reasons.items()))


def fit(demand: Demand, candidate: Candidate, level: str) -> str | None:
    """Return why *candidate* cannot hold *demand*, or None. *level* is ``cluster`` or ``node``."""
    if demand.virtualization not in candidate.virtualizations:
        offered = ",".join(candidate.virtualizations) or "none"
        return f"no {demand.virtualization} runtime (has {offered})"
    if demand.arch and candidate.arch not in demand.arch:
        return f"architecture {candidate.arch or 'unknown'} not in {','.join(demand.arch)}"
    wanted = demand.clusters if level == "cluster" else demand.nodes
    if wanted and candidate.id not in wanted:
        return f"not in direct {level} list {','.join(wanted)}"
    if level == "cluster" and demand.nodes and not set(demand.nodes) & set(candidate.node_names):
        return f"has none of the direct nodes {','.join(demand.nodes)}"
    if candidate.cpu_free + 1e-9 < demand.vcpus:
        return f"vcpus {candidate.cpu_free:g} < {demand.vcpus:g}"
    if candidate.memory_free_mb + 1e-9 < demand.memory_mb:
        return f"memory {candidate.memory_free_mb:.0f} < {demand.memory_mb}"
    if candidate.gpus_free + 1e-9 < demand.gpus:
        return f"gpus {candidate.gpus_free:g} < {demand.gpus}"
    return None


def _normalized(plugin: ScorePlugin, raw: dict[str, float], profile: Profile) -> dict[str, float]:
    normalizer = profile.normalizers.get(id(plugin))
    scores = normalizer.normalize(raw) if normalizer is not None else raw
    if all(MIN_SCORE <= score <= MAX_SCORE for score in scores.values()):
        return scores
    return {cid: max(MIN_SCORE, min(MAX_SCORE, score)) for cid, score in scores.items()}


def _scan_order(demand: Demand, candidates: Sequence[Candidate]) -> Iterator[Candidate]:
    start = zlib.crc32(demand.service.encode()) % len(candidates) if candidates else 0
    return chain(islice(candidates, start, None), islice(candidates, start))


def feasible(demand: Demand, candidates: Sequence[Candidate], profile: Profile,
             level: str) -> tuple[list[Candidate], dict[str, str]]:
    """Candidates that pass fit and every plugin's filter (up to the profile's sample), and the
    reasons of those rejected on the way."""
    reasons: dict[str, str] = {}
    survivors: list[Candidate] = []
    enough = max(profile.sample, len(candidates) // 20)
    for candidate in _scan_order(demand, candidates):
        if len(survivors) >= enough:
            break
        reason = fit(demand, candidate, level)
        for plugin in profile.filters:
            if reason:
                break
            reason = plugin.filter(demand, candidate)
        if reason:
            reasons[candidate.id] = reason
        else:
            survivors.append(candidate)
    return survivors, reasons


def place(demand: Demand, candidates: Sequence[Candidate], profile: Profile, level: str) -> Decision:
    """Choose the candidate for one instance."""
    # Filtering comes first and is where most candidates drop out, so scoring runs on few.
    survivors, reasons = feasible(demand, candidates, profile, level)
    if not survivors:
        return Decision(None, reasons)
    totals = dict.fromkeys((c.id for c in survivors), 0.0)
    for plugin, weight in profile.scorers:
        raw = {c.id: plugin.score(demand, c) for c in survivors}
        for cid, value in _normalized(plugin, raw, profile).items():
            totals[cid] += weight * value
    best = max(survivors, key=lambda c: (totals[c.id], c.id))
    return Decision(best, reasons, totals)


def reserve(candidate: Candidate, demand: Demand) -> Candidate:
    """*candidate* after it took *demand*: less free capacity and one more replica of the service."""
    services = dict(candidate.services)
    services[demand.service] = services.get(demand.service, 0) + 1
    return replace(candidate, cpu_free=candidate.cpu_free - demand.vcpus,
                   memory_free_mb=candidate.memory_free_mb - demand.memory_mb,
                   gpus_free=candidate.gpus_free - demand.gpus, services=services)


def with_targets(demand: Demand, coords: dict[str, tuple[float, ...]]) -> Demand:
    """*demand* with the coordinates of its latency targets that are in *coords* (worker -> coordinate)."""
    if not demand.latency:
        return demand
    return replace(demand, targets={t: coords[t] for t, _ in demand.latency if t in coords})
