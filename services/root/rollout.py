"""Rolling updates as plain logic: which instances of a service to replace next, and when a rollout is
done, stuck or to be reverted.

A service's ``revision`` is the one its instances should run; each instance remembers its own. While a
:class:`Rollout` is under way, every reconcile pass asks :func:`step` what to do, given which instances
are *ok* (healthy, or RUNNING without a check, for the policy's ``min_healthy_time``). The answer
replaces old instances in place (stop one, start its successor where it ran) no more than
``max_parallel`` at a time and never leaving fewer than ``replicas - max_parallel`` ok; stops the
extra instances canaries made; starts canaries beside the old ones; and ends the rollout: succeeded,
or, when a new instance is not ok within ``healthy_deadline``, reverted to the previous revision
(``auto_revert``) or failed where it stands. Nomad's ``update`` block is the model.

No broker, no store, no clock: the orchestrator passes the time, applies the step and records the
result before it acts (a root killed mid-way resumes from the records).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Generic, Protocol, TypeVar

from services.common.sla import UpdatePolicy

RUNNING, PAUSED, SUCCEEDED, REVERTED, FAILED = "running", "paused", "succeeded", "reverted", "failed"
ACTIVE = (RUNNING, PAUSED, REVERTED)  # a rollout in one of these states still has work to do


class Replaceable(Protocol):
    """What the rollout needs of an instance (the catalog's :class:`~services.root.catalog.Instance`)."""

    @property
    def number(self) -> int: ...

    @property
    def revision(self) -> int: ...

    @property
    def created(self) -> float: ...


Inst = TypeVar("Inst", bound=Replaceable)


@dataclass(frozen=True)
class Rollout:
    """A service's latest rollout: the revision it rolls to, its state and why, and the revision it
    replaces (where ``auto_revert`` and ``rollback`` go back to; 0 for the first)."""

    revision: int
    state: str
    reason: str = ""
    previous: int = 0
    reverting: bool = False  # rolling back to ``revision`` after ``previous`` failed (state REVERTED when done)

    @property
    def active(self) -> bool:
        """Whether the rollout still has instances to replace (or waits for a promote)."""
        return self.state in (RUNNING, PAUSED) or (self.state == REVERTED and self.reverting)


@dataclass(frozen=True)
class Step(Generic[Inst]):
    """What to do now: *replace* these old instances (each by one of the target revision where it ran),
    *remove* these without a successor, start *canaries* new instances beside the old ones, and the
    rollout's new record (None: unchanged); *revert_to* > 0 makes that revision the service's again."""

    replace: tuple[Inst, ...] = ()
    remove: tuple[Inst, ...] = ()
    canaries: int = 0
    rollout: Rollout | None = None
    revert_to: int = 0

    def __bool__(self) -> bool:
        return bool(self.replace or self.remove or self.canaries or self.rollout or self.revert_to)


def step(rollout: Rollout, policy: UpdatePolicy, replicas: int, instances: Sequence[Inst],
         ok: Callable[[Inst], bool], now: float) -> Step[Inst]:
    """The next step of *rollout* for a service that should run *replicas* instances of revision
    ``rollout.revision`` and now has *instances*."""
    if not rollout.active:
        return Step()
    target = rollout.revision
    old = [i for i in instances if i.revision != target]
    new = [i for i in instances if i.revision == target]
    waiting = [i for i in new if not ok(i)]
    late = [i for i in waiting if now - i.created > policy.healthy_deadline]
    if late:
        return _stuck(rollout, policy, late[0])
    if rollout.state == PAUSED:
        return Step(canaries=max(0, min(policy.canary, replicas) - len(new)))
    if not old and not waiting and len(instances) <= replicas:
        done = REVERTED if rollout.reverting else SUCCEEDED
        return Step(rollout=replace(rollout, state=done, reverting=False))
    ok_now = sum(1 for i in instances if ok(i))
    floor = replicas - policy.max_parallel
    surplus = len(instances) - replicas
    removing: list[Inst] = []
    replacing: list[Inst] = []
    budget = policy.max_parallel - len(waiting)
    for instance in sorted(old, key=lambda i: (ok(i), i.number)):  # the broken ones first
        wanted = removing if surplus > 0 else replacing
        if wanted is replacing and len(replacing) >= budget:
            break
        if ok(instance) and ok_now - 1 < floor:
            break
        wanted.append(instance)
        ok_now -= ok(instance)
        surplus -= wanted is removing
    return Step(replace=tuple(replacing), remove=tuple(removing))


def _stuck(rollout: Rollout, policy: UpdatePolicy, late: Inst) -> Step[Inst]:
    """A new instance was not ok in time: revert, or stop where it stands."""
    reason = (f"instance #{late.number} of revision {rollout.revision} was not healthy within "
              f"{policy.healthy_deadline:g} s")
    if rollout.reverting:
        return Step(rollout=replace(rollout, state=FAILED, reverting=False,
                                    reason=f"{rollout.reason}; the revert failed too: {reason}"))
    if policy.auto_revert and rollout.previous:
        return Step(rollout=Rollout(rollout.previous, REVERTED, f"{reason}: back to revision {rollout.previous}",
                                    previous=rollout.revision, reverting=True),
                    revert_to=rollout.previous)
    why = "auto_revert is off" if not policy.auto_revert else "no revision to go back to"
    return Step(rollout=replace(rollout, state=FAILED, reason=f"{reason} ({why}: stopped here)"))
