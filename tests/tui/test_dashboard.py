"""The dashboard driven by Pilot, from canned retained state and a fake feed recording requests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from textual.message_pump import MessagePump
from textual.widgets import DataTable, RichLog, TabbedContent

from services.cli.client import CliError
from services.cli.views import event_line
from tui.app import OakApp
from tui.messages import EventsArrived, FeedStatus, InfrastructureChanged, ServiceChanged
from tui.screens.create import CreateApp, SlaFiles
from tui.screens.details import ClusterScreen, InstanceScreen, WorkerScreen
from tui.widgets.cluster_tree import ClusterTree
from tui.widgets.services_table import InstancesTable, ServicesTable


def service(job: str, status: str, replicas: int, *instances: tuple[int, str, str]) -> dict[str, Any]:
    return {"service_id": job[:4], "job_name": job, "app_id": "a1", "virtualization": "process", "code": "",
            "cmd": ["sleep", "1"], "memory": 10, "vcpus": 0.1, "replicas": replicas, "status": status,
            "rr_ip": f"10.30.0.{2 * replicas + 1}", "closest_ip": f"10.30.0.{2 * replicas + 2}",
            "instances": [{"number": n, "iid": f"{job}-{n}", "cluster": "c1", "node": node, "status": st,
                           "reason": "", "cpu_percent": 1.0, "memory_mb": 2.0, "restarts": 0, "exit_code": None,
                           "since": 0, "ip": f"10.18.0.{n + 2}"} for n, st, node in instances]}


WEB = service("shop.test.web.test", "RUNNING", 2, (0, "RUNNING", "w1"), (1, "RUNNING", "w2"))
DB = service("shop.test.db.test", "UNDEPLOYED", 0)
EVENTS = [{"at": 1.0, "kind": "node", "what": "worker w2 of cluster c1 is offline", "cluster": "c1", "node": "w2"},
          {"at": 2.0, "kind": "unplaced", "what": "shop.test.db.test #0: cannot be placed",
           "reason": "c1: no worker fits (w1: memory 1000 < 99999)"}]
CLUSTERS = [{"name": "c1", "online": True, "location": "", "nodes": 2, "cpu_cores": 4, "memory_mb": 2048,
             "cpu_percent": 12.0, "instances": 2}]
NODES = [{"cluster": "c1", "name": n, "online": n == "w1", "cpu_cores": 2, "memory_mb": 1024, "cpu_free": 1.9,
          "memory_free_mb": 1000, "cpu_percent": 10.0, "runtimes": ["process"], "instances": 1, "arch": "amd64",
          "labels": [], "location": "", "gpus_free": 0, "services": {}} for n in ("w1", "w2")]


class FakeFeed:
    """Posts canned retained state, records requests, and fails the ones it is told to."""

    def __init__(self, errors: dict[str, str] | None = None) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.errors = errors or {}
        self.stopped: list[str] = []

    async def run(self, target: MessagePump) -> None:
        target.post_message(FeedStatus("admin @ test", ok=True))
        target.post_message(InfrastructureChanged(CLUSTERS, NODES))
        target.post_message(ServiceChanged(DB["job_name"], DB))
        target.post_message(ServiceChanged(WEB["job_name"], WEB))
        target.post_message(EventsArrived(EVENTS[:1]))  # the live batch, then the retained ring repeating it
        target.post_message(EventsArrived(EVENTS))
        await asyncio.Event().wait()

    async def request(self, resource: str, action: str, body: dict[str, Any] | None = None,
                      raw: bytes | None = None) -> Any:
        self.requests.append((resource, action, body if raw is None else json.loads(raw)))
        if f"{resource}/{action}" in self.errors:
            raise CliError(self.errors[f"{resource}/{action}"])
        if action == "list":
            return {"clusters": CLUSTERS, "nodes": [{**n, "online": True} for n in NODES]}[resource]
        return [{"name": "shop", "namespace": "test"}] if action == "create" else {}

    async def stream(self, resource: str, action: str, body: dict[str, Any]) -> tuple[Any, AsyncIterator[dict]]:
        self.requests.append((resource, action, body))

        async def answers() -> AsyncIterator[dict]:
            yield {"ok": True, "data": {"number": body["instance"], "lines": ["log line 1", "log line 2"]}}
            await asyncio.Event().wait()

        return {"stream": "s1", "instances": [body["instance"]]}, answers()

    async def stop_stream(self, stream: str) -> None:
        self.stopped.append(stream)


def events_text(app: OakApp) -> str:
    """The lines of the events screen."""
    return "\n".join(line.text for line in app.query_one("#events", RichLog).lines)


def shown(app: OakApp) -> str:
    """The text of every label and static on the current screen."""
    return "\n".join(str(widget.render()) for widget in app.screen.query("Label, Static"))


async def loaded(pilot: Any) -> None:
    for _ in range(20):
        await pilot.pause()
        if pilot.app.query_one("#services", ServicesTable).row_count == 2:
            return
    raise AssertionError("services never shown")


@pytest.mark.parametrize("size", [(80, 24), (140, 45)])
async def test_shows_services_instances_and_clusters(size: tuple[int, int]) -> None:
    """Both services with their status, the selected one's instances, and the cluster tree with its workers."""
    app = OakApp(FakeFeed())
    async with app.run_test(size=size) as pilot:
        await loaded(pilot)
        screen = app.export_screenshot()
        assert "shop.test.web.test" in screen
        assert "shop.test.db.test" in screen
        assert "UNDEPLOYED" in screen
        assert all(key in screen for key in ("Create", "Deploy", "Scale", "Undeploy", "Delete", "Refresh", "Quit"))
        assert app.query_one("#services", ServicesTable).selected == "shop.test.db.test"
        await pilot.press("down")
        assert app.query_one("#instances", InstancesTable).row_count == 2
        await pilot.press("2")
        await pilot.pause()
        assert app.query_one(TabbedContent).active == "clusters-tab"
        lines = app.query_one(ClusterTree).labels()
        assert lines[0].startswith("● c1  2 workers")
        assert [line.split()[:2] for line in lines[1:]] == [["●", "w1"], ["○", "w2"]]
        await pilot.press("3")
        await pilot.pause()
        assert "worker w2 of cluster c1 is offline" in events_text(app)
        await pilot.press("t")
        await pilot.pause()
        assert app.theme == "textual-light"


async def test_the_events_screen_shows_the_roots_feed_once() -> None:
    """The root's events (live and retained) each appear once, as `oak events` prints them; refusals in red."""
    app = OakApp(FakeFeed())
    async with app.run_test(size=(140, 45)) as pilot:
        await loaded(pilot)
        await pilot.press("3")
        await pilot.pause()
        log = app.query_one("#events", RichLog)
        assert "".join(line.text for line in log.lines) == "".join(event_line(e) for e in EVENTS)  # long ones wrap
        red = {line.text.split()[1]: any("red" in str(seg.style) for seg in line)
               for line in log.lines if line.text[:2].isdigit()}
        assert red == {"node": False, "unplaced": True}


async def test_deploy_sends_the_selected_service() -> None:
    """d deploys the service under the cursor."""
    feed = FakeFeed()
    app = OakApp(feed)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("down", "d")
        await pilot.pause()
    assert feed.requests == [("services", "deploy", {"service": "shop.test.web.test"})]


async def test_undeploy_asks_first() -> None:
    """u asks for confirmation: no sends nothing, yes sends undeploy."""
    feed = FakeFeed()
    app = OakApp(feed)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("down", "u")
        await pilot.pause()
        assert "Undeploy every instance of shop.test.web.test?" in shown(app)
        await pilot.press("n")
        await pilot.pause()
        assert feed.requests == []
        await pilot.press("u")
        await pilot.pause()
        await pilot.press("y")
        await pilot.pause()
    assert feed.requests == [("services", "undeploy", {"service": "shop.test.web.test"})]


async def test_scale_and_delete() -> None:
    """s asks for the count; x deletes the application after confirmation."""
    feed = FakeFeed()
    app = OakApp(feed)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("down", "s")
        await pilot.pause()
        await pilot.press("backspace", "5", "enter")
        await pilot.pause()
        await pilot.press("x")
        await pilot.pause()
        await pilot.press("y")
        await pilot.pause()
    assert feed.requests == [("services", "scale", {"service": "shop.test.web.test", "replicas": 5}),
                             ("apps", "delete", {"app": "shop.test"})]


async def test_deleting_an_application_says_its_volumes_go_too() -> None:
    """x on a service with volumes: the confirmation names them before anything is sent."""
    feed = FakeFeed()
    app = OakApp(feed)
    async with app.run_test(size=(120, 30)) as pilot:
        await loaded(pilot)
        app.post_message(ServiceChanged(WEB["job_name"], {**WEB, "volumes": [{"name": "data", "path": "/d"}]}))
        await pilot.pause()
        await pilot.press("down", "x")
        await pilot.pause()
        assert "Their volumes go too (shop.test.web.test: data)" in shown(app)
        await pilot.press("n")
        await pilot.pause()
    assert feed.requests == []


async def test_create_shows_the_validation_error_in_place(tmp_path: Path) -> None:
    """c with a file the root refuses keeps the dialog open with the root's message."""
    bad = tmp_path / "bad.json"
    bad.write_text('{"sla_version": "v1.0"}')
    feed = FakeFeed({"apps/create": "sla_version: 'v1.0' is not supported (use \"v2.0\")"})
    app = OakApp(feed)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("c")
        await pilot.pause()
        await pilot.press(*str(bad), "enter")
        await pilot.pause()
        assert "is not supported" in shown(app)
        await pilot.press("escape")
        await pilot.pause()
        await pilot.press("c")
        await pilot.pause()
        await pilot.press(*str(tmp_path / "missing.json"), "enter")
        await pilot.pause()
        assert "cannot read" in shown(app)
    assert feed.requests == [("apps", "create", {"sla_version": "v1.0"})]


async def test_instance_and_worker_screens() -> None:
    """Enter on an instance opens its screen with sparklines and its log; Enter on a worker, the worker's."""
    feed = FakeFeed()
    app = OakApp(feed)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("down")
        app.query_one("#instances", InstancesTable).focus()
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, InstanceScreen)
        assert "shop.test.web.test #0  RUNNING  on c1/w1" in shown(app)
        await pilot.pause()
        assert [line.text for line in app.screen.query_one("#log", RichLog).lines] == ["log line 1", "log line 2"]
        await pilot.press("escape")
        await pilot.pause()
        assert feed.stopped == ["s1"]
        await pilot.press("2")
        await pilot.pause()
        tree = app.query_one(ClusterTree)
        tree.move_cursor(tree.root.children[0].children[0])  # c1 -> w1
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, WorkerScreen)
        assert "w1 in c1  online" in shown(app)
        assert app.screen.query_one("#on-worker", DataTable).row_count == 1
        await pilot.press("escape")
        await pilot.pause()
        tree = app.query_one(ClusterTree)
        tree.move_cursor(tree.root.children[0])
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ClusterScreen)
        assert "c1  online" in shown(app)
        assert app.screen.query_one("#workers", DataTable).row_count == 2


async def test_create_with_the_file_picker(tmp_path: Path) -> None:
    """Picking an SLA file in the dialog's tree creates its applications."""
    (tmp_path / "sla.json").write_text('{"sla_version": "v2.0"}')
    (tmp_path / "notes.txt").write_text("not offered")
    feed = FakeFeed()
    app = OakApp(feed, sla_dir=tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("c")
        await pilot.pause(0.3)
        files = app.screen.query_one("#files", SlaFiles)
        assert [str(node.label) for node in files.root.children] == ["sla.json"]
        files.focus()
        files.move_cursor(files.root.children[0])
        await pilot.press("enter")
        await pilot.pause()
        assert not isinstance(app.screen, CreateApp)
    assert feed.requests == [("apps", "create", {"sla_version": "v2.0"})]


async def test_refresh_asks_for_clusters_and_workers() -> None:
    """r requests clusters/list and nodes/list and redraws the tree from the answers."""
    feed = FakeFeed()
    app = OakApp(feed)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("r")
        await pilot.pause()
        await pilot.pause()
        assert sorted(feed.requests) == [("clusters", "list", None), ("nodes", "list", None)]
        lines = app.query_one(ClusterTree).labels()
        assert [line.split()[:2] for line in lines[1:]] == [["●", "w1"], ["●", "w2"]]
        assert "refreshed: 1 clusters, 2 workers" in shown(app)
        await pilot.press("3")
        await pilot.pause()
        assert "refreshed: 1 clusters, 2 workers" in events_text(app)


async def test_refresh_failure_is_shown() -> None:
    """A refused refresh is reported on the status line."""
    app = OakApp(FakeFeed({"nodes/list": "the root is busy"}))
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("r")
        await pilot.pause()
        await pilot.pause()
        assert "refresh failed: the root is busy" in shown(app)


async def test_feed_messages_after_shutdown_change_nothing() -> None:
    """The feed may post just before the dashboard quits; handled once its widgets are gone, the messages
    are dropped instead of failing the app (NoMatches)."""
    app = OakApp(FakeFeed())
    async with app.run_test() as pilot:
        await loaded(pilot)
    assert not app.is_running
    app.on_infrastructure_changed(InfrastructureChanged([], []))
    app.on_service_changed(ServiceChanged(WEB["job_name"], None))
    app.on_events_arrived(EventsArrived(EVENTS))
    app.on_feed_status(FeedStatus("gone", ok=False))
    assert set(app.services) == {WEB["job_name"], DB["job_name"]}
    assert set(app.clusters) == {"c1"}
