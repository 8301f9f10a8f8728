"""Rolling updates: the pure step (which instances go next, when a rollout ends or reverts), and the
catalog's revisions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.sla import ServiceSpec, UpdatePolicy, updated
from services.common.store import Store
from services.root.catalog import Catalog
from services.root.rollout import FAILED, PAUSED, REVERTED, RUNNING, SUCCEEDED, Rollout, step


@dataclass(frozen=True)
class Inst:
    number: int
    revision: int
    created: float = 0.0
    ok: bool = True


POLICY = UpdatePolicy(max_parallel=1, min_healthy_time=0, healthy_deadline=60)


def ok(instance: Inst) -> bool:
    return instance.ok


def numbers(instances: tuple[Inst, ...]) -> list[int]:
    return [i.number for i in instances]


def test_one_at_a_time_never_below_the_floor() -> None:
    """max_parallel 1 of 3: one old instance is replaced, then none while its successor is not ok."""
    rollout = Rollout(2, RUNNING, previous=1)
    first = step(rollout, POLICY, 3, [Inst(0, 1), Inst(1, 1), Inst(2, 1)], ok, now=1)
    assert (numbers(first.replace), first.remove) == ([0], ())
    waiting = [Inst(0, 2, created=1, ok=False), Inst(1, 1), Inst(2, 1)]
    assert not step(rollout, POLICY, 3, waiting, ok, now=2), "its successor is not healthy yet"
    assert numbers(step(rollout, POLICY, 3, [Inst(0, 2), Inst(1, 1), Inst(2, 1)], ok, now=3).replace) == [1]
    done = step(rollout, POLICY, 3, [Inst(0, 2), Inst(1, 2), Inst(2, 2)], ok, now=4)
    assert done.rollout == Rollout(2, SUCCEEDED, previous=1)


def test_broken_old_instances_go_first_and_do_not_count() -> None:
    """Old instances that are not ok are replaced first; with two of three broken, max_parallel 2 replaces
    both at once, and a healthy one only as long as replicas - max_parallel stay ok."""
    policy = UpdatePolicy(max_parallel=2, min_healthy_time=0, healthy_deadline=60)
    rollout = Rollout(2, RUNNING, previous=1)
    old = [Inst(0, 1), Inst(1, 1, ok=False), Inst(2, 1, ok=False)]
    assert numbers(step(rollout, policy, 3, old, ok, now=1).replace) == [1, 2]
    healthy = [Inst(0, 1), Inst(1, 1), Inst(2, 1)]
    assert numbers(step(rollout, policy, 3, healthy, ok, now=1).replace) == [0, 1], "3 - 2 = 1 stays ok"
    one_waiting = [Inst(0, 2, created=1, ok=False), Inst(1, 1), Inst(2, 1)]
    assert numbers(step(rollout, policy, 3, one_waiting, ok, now=2).replace) == [1], "two in flight at most"


def test_late_successor_reverts_or_fails() -> None:
    """A new instance not ok within healthy_deadline: back to the previous revision with auto_revert (the
    revert going on as a rollout of its own), else failed where it stands; a failing revert fails."""
    rollout = Rollout(2, RUNNING, previous=1)
    late = [Inst(0, 2, created=0, ok=False), Inst(1, 1), Inst(2, 1)]
    reverted = step(rollout, POLICY, 3, late, ok, now=61)
    assert reverted.revert_to == 1
    assert reverted.rollout is not None
    assert (reverted.rollout.revision, reverted.rollout.state, reverted.rollout.active) == (1, REVERTED, True)
    assert "instance #0 of revision 2 was not healthy within 60 s" in reverted.rollout.reason
    assert numbers(step(reverted.rollout, POLICY, 3, late, ok, now=61).replace) == [0], "the bad one goes first"
    back = step(reverted.rollout, POLICY, 3, [Inst(0, 1), Inst(1, 1), Inst(2, 1)], ok, now=70)
    assert back.rollout is not None
    assert (back.rollout.state, back.rollout.active) == (REVERTED, False)
    stuck = step(rollout, UpdatePolicy(healthy_deadline=60, auto_revert=False), 3, late, ok, now=61)
    assert stuck.rollout is not None
    assert (stuck.rollout.state, stuck.revert_to) == (FAILED, 0)
    assert "auto_revert is off" in stuck.rollout.reason
    again = step(reverted.rollout, POLICY, 3, [Inst(0, 1, created=61, ok=False)], ok, now=200)
    assert again.rollout is not None
    assert again.rollout.state == FAILED
    assert "the revert failed too" in again.rollout.reason


def test_canaries_wait_for_promote_then_the_old_ones_go() -> None:
    """With canary 1, one new instance starts beside the three old ones and the rollout waits; once
    promoted, an old one is stopped without a successor (the canary took its place) while the next is
    replaced, as replicas - max_parallel stay ok."""
    policy = UpdatePolicy(max_parallel=1, min_healthy_time=0, healthy_deadline=60, canary=1)
    paused = Rollout(2, PAUSED, previous=1)
    old = [Inst(0, 1), Inst(1, 1), Inst(2, 1)]
    assert step(paused, policy, 3, old, ok, now=1).canaries == 1
    with_canary = [*old, Inst(3, 2, created=1)]
    assert not step(paused, policy, 3, with_canary, ok, now=2), "waits for promote"
    promoted = Rollout(2, RUNNING, previous=1)
    first = step(promoted, policy, 3, with_canary, ok, now=3)
    assert (numbers(first.remove), numbers(first.replace)) == ([0], [1])
    second = step(promoted, policy, 3, [Inst(1, 2, created=3, ok=False), Inst(2, 1), Inst(3, 2)], ok, now=4)
    assert not second, "one in flight"
    third = step(promoted, policy, 3, [Inst(1, 2), Inst(2, 1), Inst(3, 2)], ok, now=5)
    assert numbers(third.replace) == [2]


async def test_revisions_in_the_catalog(tmp_path: Path) -> None:
    """An update is revision 2 with what changed; a rollback makes revision 1 current again; every instance
    keeps the spec of its own revision; all of it is read back after a restart."""
    from services.common.sla import parse_sla
    from tests.conftest import sla, sleeper

    catalog = Catalog(Store(tmp_path / "root.json"))
    (app,) = parse_sla(sla(sleeper("web")))
    await catalog.create_app("alice", app)
    (service,) = catalog.services_of("alice")
    await catalog.set_replicas(service, 2)
    spec, changed = updated(service.spec, {"cmd": ["sleep", "601"], "memory": 20})
    assert changed == ["cmd", "memory"]
    service = await catalog.update(service, spec, ", ".join(changed))
    assert (service.revision, service.rollout) == (2, Rollout(2, RUNNING, previous=1))
    old = catalog.instances_of(service.sid)
    added, removed = await catalog.roll(service, (old[0],), (), 0, {old[0].iid: "w1"})
    assert [(i.number, i.revision, i.prefer) for i in added] == [(0, 2, "w1")]
    assert catalog.instance_spec(added[0]).service.cmd == ("sleep", "601")
    assert catalog.instance_spec(old[1]).service.cmd == ("sleep", "600"), "the old one keeps its revision's"
    again = Catalog(Store(tmp_path / "root.json"))
    await again.load()
    assert [(r.number, r.change) for r in again.revisions_of(service.sid)] == [(1, "created"), (2, "cmd, memory")]
    assert again.services[service.sid] == catalog.services[service.sid]
    assert again.instance_spec(again.instances[added[0].iid]).prefer == "w1"
    back = await again.set_revision(service, 1, Rollout(1, RUNNING, "rollback from revision 2"))
    assert back.spec.cmd == ("sleep", "600")


def test_an_update_keeps_the_name_and_ip() -> None:
    """Renaming the service or moving its round-robin IP is refused, naming the field."""
    import pytest

    from services.common.sla import SlaError

    spec = ServiceSpec("a", "n", "web", "n", "process", "", ("sleep", "1"), rr_ip="10.30.0.5")
    with pytest.raises(SlaError) as err:
        updated(spec, {"microservice_name": "other"})
    assert err.value.field == "microservice.microservice_name"
    with pytest.raises(SlaError) as err:
        updated(spec, {"addresses": {"rr_ip": "10.30.0.6"}})
    assert err.value.field == "microservice.addresses.rr_ip"
    with pytest.raises(SlaError) as err:
        updated(spec, {"memory": -1})
    assert err.value.field == "microservice.memory"
    assert updated(spec, {"cmd": ["sleep", "1"]})[1] == [], "nothing changed"
