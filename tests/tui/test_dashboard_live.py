"""The dashboard against a real stack on loopback: Pilot driving actions, and `oak tui` in tmux."""

from __future__ import annotations

import shutil
import subprocess
import time
from typing import Any

import pytest
from textual.widgets import RichLog

from tests.conftest import dumps, eventually, sla, sleeper
from tests.stack import REPO, Stack, oak
from tests.test_three_tiers import _online_nodes
from tui.app import OakApp
from tui.feed import MqttFeed
from tui.widgets.cluster_tree import ClusterTree
from tui.widgets.services_table import ServicesTable

pytestmark = pytest.mark.timeout(120)
JOB = "dash.test.web.test"


async def start(stack: Stack, api: Any) -> Any:
    stack.root()
    stack.cluster("c1")
    stack.worker("w1", "c1", "--stop-grace", "0.5")
    client = await api()
    await eventually(lambda: _online_nodes(client, 1), what="w1 online")
    await client.request("apps", "create", raw=dumps(sla(sleeper("web", 6401), app="dash")))
    return client


async def test_pilot_drives_a_real_stack(stack: Stack, api: Any) -> None:
    """Deploy, scale and undeploy from the dashboard; it follows the retained state and the root's events without
    polling."""
    client = await start(stack, api)
    app = OakApp(MqttFeed(stack.profile()))
    async with app.run_test(size=(100, 30)) as pilot:

        async def status() -> str | None:
            await pilot.pause()
            return app.services.get(JOB, {}).get("status")

        assert await eventually(status, what="the service shown") == "UNDEPLOYED"
        assert app.query_one("#services", ServicesTable).selected == JOB
        await pilot.press("d")
        await eventually(lambda: status_is(status, "RUNNING"), what="RUNNING after d")
        await pilot.press("s")
        await pilot.pause()
        await pilot.press("backspace", "2", "enter")

        async def two_running() -> bool:
            await pilot.pause()
            instances = app.services.get(JOB, {}).get("instances", [])
            return len(instances) == 2 and all(i["status"] == "RUNNING" for i in instances)

        await eventually(two_running, what="two instances after s")
        await pilot.press("u")
        await pilot.pause()
        await pilot.press("y")
        await eventually(lambda: status_is(status, "UNDEPLOYED"), what="UNDEPLOYED after u")
        await pilot.press("2")

        async def tree() -> list[str]:
            await pilot.pause()
            return [line for line in app.query_one(ClusterTree).labels() if "w1" in line]

        (line,) = await eventually(tree, what="w1 in the cluster tree")
        assert "●" in line
        await pilot.press("3")

        async def root_events() -> bool:  # the root's own feed, as `oak events` shows it
            await pilot.pause()
            text = "".join(line.text for line in app.query_one("#events", RichLog).lines)
            return f"{JOB} #1: placed on cluster c1" in text and "worker w1 of cluster c1 is online" in text

        await eventually(root_events, what="the root's events on the events screen")
    state = await client.request("services", "inspect", {"service": JOB})
    assert state["replicas"] == 0


async def status_is(status: Any, want: str) -> bool:
    return await status() == want


async def test_oak_tui_in_tmux(stack: Stack, api: Any) -> None:
    """`oak tui` in a real terminal (tmux, 80x24) shows the deployed service RUNNING."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    client = await start(stack, api)
    await client.request("services", "deploy", {"service": JOB})
    session = f"oaktui{time.monotonic_ns()}"
    command = " ".join(oak("tui", "--data-dir", str(stack.base / "root")))
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", "-c", str(REPO), command],
                   check=True)
    try:
        def screen() -> str:
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                                  text=True).stdout

        await eventually(lambda: all(text in screen() for text in (JOB, "RUNNING", "Deploy")), 30, 0.5,
                         what="the dashboard with its service and its key bindings")
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)
        await eventually(lambda: subprocess.run(["tmux", "has-session", "-t", session],
                                                capture_output=True).returncode != 0, 10, what="q quits")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
