"""Snapshots of the dashboard from canned retained state (update with `pytest --snapshot-update`)."""

from __future__ import annotations

from typing import Any

from tests.tui.test_dashboard import FakeFeed, loaded
from tui.app import OakApp


def test_services_view(snap_compare: Any) -> None:
    """The services tab with the second service selected, in 80x24."""

    async def run_before(pilot: Any) -> None:
        await loaded(pilot)
        await pilot.press("down")

    assert snap_compare(OakApp(FakeFeed()), terminal_size=(80, 24), run_before=run_before)


def test_clusters_view(snap_compare: Any) -> None:
    """The clusters tab: a tree of clusters and workers, in 100x30."""

    async def run_before(pilot: Any) -> None:
        await loaded(pilot)
        await pilot.press("2")

    assert snap_compare(OakApp(FakeFeed()), terminal_size=(100, 30), run_before=run_before)


def test_undeploy_confirmation(snap_compare: Any) -> None:
    """The confirmation asked before undeploying, in the light theme."""

    async def run_before(pilot: Any) -> None:
        await loaded(pilot)
        await pilot.press("t", "down", "u")
        await pilot.pause()

    assert snap_compare(OakApp(FakeFeed()), terminal_size=(80, 24), run_before=run_before)
