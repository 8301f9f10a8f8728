"""``oak tui``: the dashboard. Wiring only: widgets show, the feed talks to the root."""

from __future__ import annotations

import asyncio
import functools
import json
from collections import defaultdict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.message import Message
from textual.widgets import DataTable, Footer, Header, RichLog, Static, TabbedContent, TabPane, Tree

from services.cli.client import CliError
from services.cli.views import event_line
from tui.feed import Feed
from tui.messages import EventsArrived, FeedStatus, InfrastructureChanged, ServiceChanged
from tui.screens.create import CreateApp
from tui.screens.details import ClusterScreen, InstanceScreen, WorkerScreen
from tui.screens.dialogs import Confirm, Prompt
from tui.widgets.cluster_tree import ClusterTree
from tui.widgets.services_table import InstancesTable, ServicesTable

HISTORY = 60  # samples kept for sparklines
EVENTS_REMEMBERED = 1000  # events kept to tell a repeat from a new one (the root's ring holds 200)
ALARMING = {"refused", "unplaced"}  # event kinds shown in red
M = TypeVar("M", bound=Message)


def while_running(handler: Callable[[OakApp, M], None]) -> Callable[[OakApp, M], None]:
    """Drop a feed message handled after the app began to shut down: its widgets are gone by then, and the
    feed may have posted it just before."""

    @functools.wraps(handler)
    def guarded(app: OakApp, message: M) -> None:
        if app.is_running:
            handler(app, message)

    return guarded


def read_file(path: str) -> bytes:
    """The bytes of the file at *path* (``~`` allowed)."""
    return Path(path).expanduser().read_bytes()


class OakApp(App[None]):
    """Watch and drive Oakling from a terminal."""

    CSS_PATH = "app.tcss"
    TITLE = "Oakling"
    BINDINGS = [  # the actions first and q last of them: they are what fits the footer in 80 columns
        ("c", "create", "Create"),
        ("d", "deploy", "Deploy"),
        ("s", "scale", "Scale"),
        ("u", "undeploy", "Undeploy"),
        ("x", "delete", "Delete app"),
        ("r", "refresh", "Refresh"),
        ("q", "quit", "Quit"),
        ("1", "tab('services-tab')", "Services"),
        ("2", "tab('clusters-tab')", "Clusters"),
        ("3", "tab('events-tab')", "Events"),
        ("t", "toggle_dark", "Theme"),
    ]

    def __init__(self, feed: Feed, sla_dir: Path | None = None) -> None:
        super().__init__()
        self.feed = feed
        self.sla_dir = sla_dir
        self.services: dict[str, dict[str, Any]] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.clusters: dict[str, dict[str, Any]] = {}
        self.events_shown: dict[str, None] = {}  # the root's events on screen, oldest first
        self.history: dict[str, deque[float]] = defaultdict(lambda: deque([0.0], maxlen=HISTORY))

    def compose(self) -> ComposeResult:
        """Tabs for services, clusters and events, and a status line."""
        yield Header()
        with TabbedContent(initial="services-tab"):
            with TabPane("Services", id="services-tab"):
                yield ServicesTable(id="services")
                yield InstancesTable(id="instances")
            with TabPane("Clusters", id="clusters-tab"):
                yield ClusterTree(id="clusters")
            with TabPane("Events", id="events-tab"):
                yield RichLog(id="events", wrap=True)
        yield Static("connecting…", id="status")
        yield Footer(show_command_palette=False)  # ctrl+p still opens it; the room goes to our keys

    def on_mount(self) -> None:
        """Start the feed; keys go to the services table."""
        self.query_one("#services", ServicesTable).focus()
        self.run_worker(self.feed.run(self), exclusive=True, group="feed")

    # ---- what the feed says ----------------------------------------------------------------------

    def event(self, text: str | Text) -> None:
        """Add a line to the events screen."""
        self.query_one("#events", RichLog).write(text)

    @while_running
    def on_service_changed(self, message: ServiceChanged) -> None:
        """Update the tables and the instances' history."""
        if message.state is None:
            self.services.pop(message.job_name, None)
        else:
            self.services[message.job_name] = message.state
            for inst in message.state["instances"]:
                self.history[f"cpu:{inst['iid']}"].append(inst["cpu_percent"])
                self.history[f"mem:{inst['iid']}"].append(inst["memory_mb"])
        self.query_one("#services", ServicesTable).show(self.services)
        self.show_instances()
        self.refresh_details()

    @while_running
    def on_infrastructure_changed(self, message: InfrastructureChanged) -> None:
        """Redraw the cluster tree and the drill-down screens."""
        self.query_one("#clusters", ClusterTree).show(message.clusters, message.nodes)
        self.nodes = {n["name"]: n for n in message.nodes}
        self.clusters = {c["name"]: c for c in message.clusters}
        for node in message.nodes:
            self.history[f"node:{node['name']}"].append(node["cpu_percent"])
        for cluster in message.clusters:
            self.history[f"cluster:{cluster['name']}"].append(cluster["cpu_percent"])
        self.refresh_details()

    @while_running
    def on_events_arrived(self, message: EventsArrived) -> None:
        """Show the root's events not shown yet (the retained recent ones repeat what the live ones said)."""
        for event in message.events:
            key = json.dumps(event, sort_keys=True)
            if key in self.events_shown:
                continue
            self.events_shown[key] = None
            if len(self.events_shown) > EVENTS_REMEMBERED:
                del self.events_shown[next(iter(self.events_shown))]
            self.event(Text(event_line(event), style="red" if event.get("kind") in ALARMING else ""))

    @while_running
    def on_feed_status(self, message: FeedStatus) -> None:
        """Show the connection on the status line."""
        self.query_one("#status", Static).update(message.text if message.ok else f"[red]{message.text}[/]")

    @on(DataTable.RowHighlighted, "#services")
    def show_instances(self) -> None:
        """Show the instances of the service under the cursor."""
        job = self.query_one("#services", ServicesTable).selected
        self.query_one("#instances", InstancesTable).show(self.services.get(job or ""))

    def refresh_details(self) -> None:
        """Redraw a drill-down screen if one is open."""
        if isinstance(self.screen, InstanceScreen | WorkerScreen | ClusterScreen):
            self.screen.refresh_data()

    @on(DataTable.RowSelected, "#instances")
    def open_instance(self, event: DataTable.RowSelected) -> None:
        """Enter on an instance: its screen."""
        job = self.selected
        state = self.services.get(job or "")
        if not job or not state or event.cursor_row >= len(state["instances"]):
            return
        inst = state["instances"][event.cursor_row]
        iid, number = inst["iid"], inst["number"]

        def describe() -> str:
            current = next((i for i in self.services.get(job, {}).get("instances", []) if i["iid"] == iid), inst)
            health = f" ({current['health']})" if current.get("health") else ""
            where = f"{current['cluster'] or '-'}/{current['node'] or '-'}"
            return (f"{job} #{number}  {current['status']}{health}  on {where}"
                    f"  ip {current.get('ip') or '-'}  cpu {current['cpu_percent']:.0f}%  "
                    f"{current['memory_mb']:.0f} MB  disk I/O {current.get('io_mb', 0):.0f} MB  "
                    f"restarts {current['restarts']}  {current['reason']}")

        self.push_screen(InstanceScreen(job, number, describe, lambda: list(self.history[f"cpu:{iid}"]),
                                        lambda: list(self.history[f"mem:{iid}"])))

    @on(Tree.NodeSelected, "#clusters")
    def open_worker(self, event: Tree.NodeSelected[str]) -> None:
        """Enter on a worker in the tree: its screen; on a cluster: the cluster's."""
        name = event.node.data
        if event.node.parent is self.query_one("#clusters", ClusterTree).root and name in self.clusters:
            self.open_cluster(str(name))
            return
        if name not in self.nodes:
            return

        def describe() -> str:
            node = self.nodes.get(name or "", {})
            state = node.get("state") or ("online" if node.get("online") else "OFFLINE")
            return (f"{name} in {node.get('cluster')}  {state}  {node.get('cpu_percent', 0):.0f}% cpu  "
                    f"{node.get('cpu_free', 0):.1f}/{node.get('cpu_cores', 0):.0f} vcpu free  "
                    f"{node.get('memory_free_mb', 0):.0f} MB free  {','.join(node.get('runtimes', []))}")

        def instances() -> list[dict[str, Any]]:
            return [{"job": job, **i} for job, state in sorted(self.services.items())
                    for i in state["instances"] if i["node"] == name]

        self.push_screen(WorkerScreen(str(name), describe, lambda: list(self.history[f"node:{name}"]), instances))

    def open_cluster(self, name: str) -> None:
        """The screen of one cluster."""

        def describe() -> str:
            c = self.clusters.get(name, {})
            state = c.get("state") or ("online" if c.get("online") else "OFFLINE")
            return (f"{name}  {state}  {c.get('location') or 'no location'}  "
                    f"{c.get('nodes', 0)} workers  {c.get('cpu_cores', 0):.0f} vcpus  {c.get('memory_mb', 0):.0f} MB  "
                    f"{c.get('instances', 0)} instances")

        def workers() -> list[dict[str, Any]]:
            return [n for n in self.nodes.values() if n["cluster"] == name]

        self.push_screen(ClusterScreen(name, describe, lambda: list(self.history[f"cluster:{name}"]), workers))

    # ---- actions -----------------------------------------------------------------------------

    def say(self, text: str, ok: bool = True) -> None:
        """Report the outcome of an action on the status line and in the events."""
        line = Text(text, style="" if ok else "red")
        self.query_one("#status", Static).update(line)
        self.event(line)

    @property
    def selected(self) -> str | None:
        """The service under the cursor."""
        return self.query_one("#services", ServicesTable).selected

    async def call(self, resource: str, action: str, body: dict[str, Any], done: str) -> None:
        """Send a request and report how it went."""
        try:
            await self.feed.request(resource, action, body)
            self.say(done)
        except CliError as exc:
            self.say(f"{resource}/{action} failed: {exc}", ok=False)

    async def create_from(self, path: str) -> str | None:
        """Create the applications of the SLA at *path*; the error to show, or None."""
        try:
            raw = await asyncio.to_thread(read_file, path)
        except OSError as exc:
            return f"cannot read {path}: {exc.strerror}"
        try:
            apps = await self.feed.request("apps", "create", raw=raw)
        except CliError as exc:
            return str(exc)
        self.say("created " + ", ".join(f"{a['name']}.{a['namespace']}" for a in apps))
        return None

    def action_create(self) -> None:
        """Create applications from an SLA file."""
        self.push_screen(CreateApp(self.create_from, self.sla_dir))

    async def action_deploy(self) -> None:
        """Deploy the selected service with one instance."""
        if self.selected:
            await self.call("services", "deploy", {"service": self.selected}, f"deploying {self.selected}")

    @work
    async def action_scale(self) -> None:
        """Ask for a number of instances and scale the selected service to it."""
        job = self.selected
        if not job:
            return
        answer = await self.push_screen_wait(Prompt(f"Instances of {job}:", str(self.services[job]["replicas"])))
        if answer is None:
            return
        if not answer.isdigit():
            self.say(f"not a number: {answer!r}", ok=False)
            return
        await self.call("services", "scale", {"service": job, "replicas": int(answer)}, f"scaling {job} to {answer}")

    @work
    async def action_undeploy(self) -> None:
        """Undeploy the selected service, after confirmation."""
        job = self.selected
        if job and await self.push_screen_wait(Confirm(f"Undeploy every instance of {job}?")):  # type: ignore[arg-type]
            await self.call("services", "undeploy", {"service": job}, f"undeploying {job}")

    @work
    async def action_delete(self) -> None:
        """Delete the selected service's application, after confirmation."""
        job = self.selected
        if not job:
            return
        app = ".".join(job.split(".")[:2])
        volumes = [f"{s}: {', '.join(v['name'] for v in s_vols)}" for s, s_vols in self._volumes_of(app).items()]
        also = f" Their volumes go too ({'; '.join(volumes)})." if volumes else ""
        if await self.push_screen_wait(Confirm(f"Delete application {app} and all its services?{also}")):
            await self.call("apps", "delete", {"app": app}, f"deleting {app}")

    def _volumes_of(self, app: str) -> dict[str, list[dict[str, Any]]]:
        """The volumes each service of *app* declares, by job name (from the services' states)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for job, state in self.services.items():
            if job.startswith(f"{app}.") and state.get("volumes"):
                out[job] = list(state["volumes"])
        return out

    @work(exclusive=True, group="refresh")
    async def action_refresh(self) -> None:
        """Ask the root for the clusters and workers now (the retained view otherwise arrives on its own)."""
        try:
            clusters, nodes = await asyncio.gather(self.feed.request("clusters", "list"),
                                                   self.feed.request("nodes", "list"))
        except CliError as exc:
            self.say(f"refresh failed: {exc}", ok=False)
            return
        self.post_message(InfrastructureChanged(list(clusters or []), list(nodes or [])))
        self.say(f"refreshed: {len(clusters or [])} clusters, {len(nodes or [])} workers")

    def action_tab(self, tab: str) -> None:
        """Show a tab and focus its main widget (a focused widget in a hidden tab would switch back)."""
        self.query_one(TabbedContent).active = tab
        self.query_one(f"#{tab.removesuffix('-tab')}").focus()

    def action_toggle_dark(self) -> None:
        """Switch between the light and the dark theme."""
        self.theme = "textual-light" if self.theme == "textual-dark" else "textual-dark"
