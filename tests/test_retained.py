"""LastSent: a retained topic is published again only when its value changed."""

from __future__ import annotations

from services.common.retained import LastSent


def test_only_changes_are_fresh() -> None:
    sent = LastSent()
    assert sent.fresh("a", {"x": 1}), "the first value of a topic"
    assert not sent.fresh("a", {"x": 1}), "the same value again (equal, not identical)"
    assert sent.fresh("b", {"x": 1}), "topics are apart"
    assert sent.fresh("a", {"x": 2}), "a changed value"
    assert sent.fresh("a", {"x": 1}), "and back"
    sent.forget("a")
    assert sent.fresh("a", {"x": 1}), "a forgotten topic's next value is sent"
    assert sent.fresh("c", None), "None is a value like any other"
    assert not sent.fresh("c", None)
