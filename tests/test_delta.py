"""Big retained documents as numbered deltas plus the whole document: apply, reorder, gaps, resync."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from services.common import channels, envelope
from services.common.delta import Change, Delta, DeltaPublisher, DeltaReceiver, DeltaSender
from tests.fakes import FakeSession

SECTIONS = ("nodes", "instances")


def doc(**instances: str) -> dict[str, dict[str, Any]]:
    return {"nodes": {}, "instances": {k: {"status": v} for k, v in instances.items()}}


def test_the_sender_numbers_only_real_changes() -> None:
    sender = DeltaSender(SECTIONS, epoch="e1")
    first = sender.diff(doc(a="RUNNING", b="CREATING"))
    assert first is not None
    assert first.seq == 1
    assert first.change.put == {"instances": {"a": {"status": "RUNNING"}, "b": {"status": "CREATING"}}}
    assert sender.diff(doc(a="RUNNING", b="CREATING")) is None  # equal documents, other objects
    second = sender.diff(doc(a="RUNNING", c="RUNNING"))
    assert second is not None
    assert second.seq == 2
    assert second.change.put == {"instances": {"c": {"status": "RUNNING"}}}
    assert second.change.drop == {"instances": ("b",)}
    assert Delta.load(second.data()) == second  # the JSON form reads back the same
    assert sender.whole() == {**doc(a="RUNNING", c="RUNNING"), "epoch": "e1", "seq": 2}


def test_the_receiver_follows_deltas_and_reports_what_changed() -> None:
    sender, receiver = DeltaSender(SECTIONS, epoch="e1"), DeltaReceiver(SECTIONS)
    sender.diff(doc(a="CREATING"))
    assert receiver.whole(sender.whole()).put == {"nodes": {}, "instances": {"a": {"status": "CREATING"}}}
    delta = sender.diff(doc(a="RUNNING", b="CREATING"))
    assert delta is not None
    change = receiver.delta(delta.data())
    assert change.put == {"instances": {"a": {"status": "RUNNING"}, "b": {"status": "CREATING"}}}
    assert receiver.docs == sender.last
    assert receiver.seq == 2
    assert not receiver.delta(delta.data())  # the same delta again changes nothing


def test_deltas_out_of_order_are_held_until_the_missing_one_comes() -> None:
    sender, receiver = DeltaSender(SECTIONS, epoch="e1"), DeltaReceiver(SECTIONS)
    receiver.whole(sender.whole())
    d1, d2 = sender.diff(doc(a="CREATING")), sender.diff(doc(b="RUNNING"))
    assert d1 is not None
    assert d2 is not None
    assert not receiver.delta(d2.data())
    assert receiver.waiting
    change = receiver.delta(d1.data())
    assert change == Change({"instances": {"b": {"status": "RUNNING"}}}, {"instances": ("a",)})  # a came and went
    assert receiver.docs == sender.last
    assert not receiver.waiting


def test_a_gap_is_healed_by_the_next_whole_document() -> None:
    sender, receiver = DeltaSender(SECTIONS, epoch="e1"), DeltaReceiver(SECTIONS)
    receiver.whole(sender.whole())
    sender.diff(doc(a="CREATING"))  # lost
    d2 = sender.diff(doc(a="RUNNING"))
    assert d2 is not None
    assert not receiver.delta(d2.data())
    assert receiver.waiting
    change = receiver.whole(sender.whole())
    assert change.put["instances"] == {"a": {"status": "RUNNING"}}
    assert receiver.docs == sender.last
    assert receiver.seq == 2
    assert not receiver.waiting
    d3 = sender.diff(doc())
    assert d3 is not None
    assert receiver.delta(d3.data()).drop == {"instances": ("a",)}


def test_an_older_whole_document_is_ignored_and_a_new_sender_is_followed() -> None:
    sender, receiver = DeltaSender(SECTIONS, epoch="e1"), DeltaReceiver(SECTIONS)
    sender.diff(doc(a="CREATING"))
    old = sender.whole()
    receiver.whole(old)
    d2 = sender.diff(doc(a="RUNNING"))
    assert d2 is not None
    assert receiver.delta(d2.data())
    assert not receiver.whole(old)  # a late retained copy does not roll back
    assert receiver.docs["instances"] == {"a": {"status": "RUNNING"}}
    restarted = DeltaSender(SECTIONS, epoch="e2")  # the sender restarted: another epoch, seq from 0
    restarted.diff(doc(b="RUNNING"))
    assert not receiver.delta(d2.data() | {"seq": 4})
    assert receiver.waiting
    change = receiver.whole(restarted.whole())
    assert change.drop == {"nodes": (), "instances": ("a",)}
    assert receiver.epoch == "e2"
    assert receiver.docs == restarted.last
    assert not receiver.waiting


def test_a_whole_document_without_numbers_is_taken_as_is() -> None:
    receiver = DeltaReceiver(SECTIONS)
    receiver.whole({"instances": {"a": {"status": "RUNNING"}}})
    assert receiver.docs == doc(a="RUNNING")
    assert receiver.epoch is None
    assert not receiver.delta({"epoch": "e1", "seq": 1, "put": {"instances": {"b": {}}}})  # no base to apply on


def test_random_losses_and_reorders_converge_after_the_last_whole_document() -> None:
    rng = random.Random(7)
    sender, receiver = DeltaSender(SECTIONS, epoch="e1"), DeltaReceiver(SECTIONS)
    receiver.whole(sender.whole())
    current: dict[str, str] = {}
    in_flight: list[dict[str, Any]] = []
    for _ in range(500):
        key = f"i{rng.randrange(30)}"
        if rng.random() < 0.3:
            current.pop(key, None)
        else:
            current[key] = rng.choice(["CREATING", "RUNNING", "DEAD"])
        delta = sender.diff(doc(**current))
        if delta is not None and rng.random() > 0.1:  # 10 % lost
            in_flight.append(delta.data())
        rng.shuffle(in_flight)
        while in_flight and rng.random() < 0.6:
            receiver.delta(in_flight.pop())
        if rng.random() < 0.02:
            receiver.whole(sender.whole())
            assert receiver.docs == sender.last
    receiver.whole(sender.whole())
    assert receiver.docs == sender.last


async def test_the_publisher_sends_deltas_at_once_and_the_whole_once_settled() -> None:
    session = FakeSession()
    topic = channels.CLUSTER_DESIRED.topic(cluster="c1")
    out = DeltaPublisher(session, channels.CLUSTER_DESIRED, "root", {"cluster": "c1"}, quiet=0.05)
    out.update({"instances": {"a": {"n": 1}}})
    assert [t for t, _ in session.published] == [topic]  # the first is whole
    out.update({"instances": {"a": {"n": 1}}})
    assert len(session.published) == 1  # nothing changed
    out.update({"instances": {"a": {"n": 1}, "b": {"n": 2}}})
    out.update({"instances": {"b": {"n": 2}}})
    assert [t for t, _ in session.published[1:]] == [channels.CLUSTER_DESIRED_DELTA.topic(cluster="c1")] * 2
    delta = envelope.decode(session.published[2][1], "desired.delta").data
    assert delta["drop"] == {"instances": ["a"]}
    assert delta["seq"] == 3
    await asyncio.sleep(0.1)
    assert session.published[-1][0] == topic
    assert envelope.decode(session.published[-1][1], "desired").data == {
        "instances": {"b": {"n": 2}}, "epoch": out.sender.epoch, "seq": 3}
    out.close()


async def test_the_publisher_sends_the_whole_document_at_once_when_asked_and_it_lags() -> None:
    session = FakeSession()
    topic = channels.CLUSTER_DESIRED.topic(cluster="c1")
    out = DeltaPublisher(session, channels.CLUSTER_DESIRED, "root", {"cluster": "c1"}, quiet=60)
    out.update({"instances": {"a": {"n": 1}}})
    out.publish_if_behind()
    assert len(session.published) == 1  # the retained one is current: nothing sent
    out.update({"instances": {}})
    out.publish_if_behind()
    assert session.published[-1][0] == topic
    assert envelope.decode(session.published[-1][1], "desired").data == {
        "instances": {}, "epoch": out.sender.epoch, "seq": 2}
    out.publish_if_behind()
    assert len(session.published) == 3
    out.close()


async def test_the_publisher_sends_the_whole_document_at_least_every_full_every() -> None:
    now = [0.0]
    session = FakeSession()
    out = DeltaPublisher(session, channels.CLUSTER_DESIRED, "s", {"cluster": "c1"}, quiet=5, full_every=10,
                         clock=lambda: now[0])
    out.update({"instances": {}})
    for k in range(30):
        now[0] += 1
        out.update({"instances": {"a": {"n": k}}})
    wholes = [t for t, _ in session.published if t == channels.CLUSTER_DESIRED.topic(cluster="c1")]
    assert len(wholes) == 4  # at 0, 10, 20 and 30 s, though changes never settled
    out.close()


def test_tracked_changes_make_the_same_deltas_as_a_diff() -> None:
    """A sender told what changed (put, drop) numbers the same deltas a diff of whole documents gives,
    without looking at the rest; a change that changes nothing is no delta."""
    told, diffed = DeltaSender(SECTIONS, epoch="e1"), DeltaSender(SECTIONS, epoch="e1")
    receiver = DeltaReceiver(SECTIONS)
    receiver.whole(told.whole())  # as a publisher starts: the whole (empty) document first
    steps = [({"instances": {"a": {"status": "x"}, "b": {"status": "y"}}}, {}),
             ({"instances": {"b": {"status": "z"}}}, {"instances": ["a"]}),
             ({"instances": {"b": {"status": "z"}}}, {"instances": ["gone"]})]
    whole: dict[str, dict[str, Any]] = {"nodes": {}, "instances": {}}
    for put, drop in steps:
        for key in drop.get("instances", []):
            whole["instances"].pop(key, None)
        whole["instances"].update(put["instances"])
        by_change, by_diff = told.change(put, drop), diffed.diff(whole)
        assert (by_change.change if by_change else None) == (by_diff.change if by_diff else None)
        if by_change:
            receiver.delta(by_change.data())
    assert told.seq == 2, "the last step changed nothing"
    assert receiver.docs == whole


def test_the_whole_document_as_json_reads_as_the_whole_and_reencodes_only_what_changed() -> None:
    """The retained form is built from each entry's kept JSON text: it must read back exactly as
    :meth:`DeltaSender.whole`, with keys and values that need escaping, after puts and drops."""
    sender = DeltaSender(SECTIONS, epoch="e\"1")
    sender.change({"instances": {"a": {"status": "RUNNING"}, 'q"\\é': {"status": "x\ny"}}})
    assert json.loads(sender.whole_json()) == sender.whole()
    kept = sender._texts["instances"]["a"][1]
    sender.change({"instances": {"b": {"status": "CREATING"}}}, {"instances": ['q"\\é']})
    assert json.loads(sender.whole_json()) == sender.whole() == {
        "nodes": {}, "instances": {"a": {"status": "RUNNING"}, "b": {"status": "CREATING"}}, "epoch": "e\"1", "seq": 2}
    assert sender._texts["instances"]["a"][1] is kept, "an unchanged entry is not encoded again"
    assert set(sender._texts["instances"]) == {"a", "b"}, "a dropped entry's text is let go"
    assert json.loads(DeltaSender(SECTIONS, epoch="e").whole_json()) == {"nodes": {}, "instances": {},
                                                                        "epoch": "e", "seq": 0}


def test_a_delta_as_json_reads_as_its_data_and_keeps_its_entries_texts_for_the_whole() -> None:
    sender = DeltaSender(SECTIONS, epoch="e")
    first = sender.change({"instances": {"a": {"status": "RUNNING"}, "b\\": {"status": "é"}}})
    assert first is not None
    assert json.loads(sender.delta_json(first)) == first.data()
    second = sender.change({"nodes": {"w1": {"cpu": 1}}}, {"instances": ["b\\"]})
    assert second is not None
    assert json.loads(sender.delta_json(second)) == second.data()
    kept = sender._texts["instances"]["a"][1]
    assert json.loads(sender.whole_json()) == sender.whole()
    assert sender._texts["instances"]["a"][1] is kept, "the whole reuses the text the delta made"
