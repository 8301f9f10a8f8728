"""``oak tui``: the dashboard. Wiring only: widgets show, the feed talks to the root."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult
from textual.widgets import DataTable, Footer, Header, RichLog, Static, TabbedContent, TabPane

from services.cli.client import CliError
from tui.feed import Feed
from tui.messages import FeedStatus, InfrastructureChanged, ServiceChanged
from tui.screens.create import CreateApp
from tui.screens.dialogs import Confirm, Prompt
from tui.widgets.cluster_tree import ClusterTree
from tui.widgets.services_table import InstancesTable, ServicesTable


def read_file(path: str) -> bytes:
    """The bytes of the file at *path* (``~`` allowed)."""
    return Path(path).expanduser().read_bytes()


class OakApp(App[None]):
    """Watch and drive Oakling from a terminal."""

    CSS_PATH = "app.tcss"
    TITLE = "Oakling"
    BINDINGS = [
        ("c", "create", "Create app"),
        ("d", "deploy", "Deploy"),
        ("s", "scale", "Scale"),
        ("u", "undeploy", "Undeploy"),
        ("x", "delete", "Delete app"),
        ("1", "tab('services-tab')", "Services"),
        ("2", "tab('clusters-tab')", "Clusters"),
        ("3", "tab('events-tab')", "Events"),
        ("t", "toggle_dark", "Theme"),
        ("q", "quit", "Quit"),
    ]

    def __init__(self, feed: Feed) -> None:
        super().__init__()
        self.feed = feed
        self.services: dict[str, dict[str, Any]] = {}
        self.online: dict[str, bool] = {}

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
                yield RichLog(id="events", markup=True, wrap=True)
        yield Static("connecting…", id="status")
        yield Footer()

    def on_mount(self) -> None:
        """Start the feed; keys go to the services table."""
        self.query_one("#services", ServicesTable).focus()
        self.run_worker(self.feed.run(self), exclusive=True, group="feed")

    # ---- what the feed says ----------------------------------------------------------------------

    def event(self, text: str) -> None:
        """Add a line to the events feed."""
        self.query_one("#events", RichLog).write(text)

    def on_service_changed(self, message: ServiceChanged) -> None:
        """Update the tables and note every instance whose status changed."""
        old = self.services.pop(message.job_name, None)
        if message.state is not None:
            self.services[message.job_name] = message.state
            before = {i["iid"]: i for i in (old or {}).get("instances", [])}
            for inst in message.state["instances"]:
                prev = before.get(inst["iid"])
                if prev is None or prev["status"] != inst["status"] or prev["node"] != inst["node"]:
                    where = f" on {inst['cluster']}/{inst['node']}" if inst["node"] else ""
                    why = f": {inst['reason']}" if inst["reason"] else ""
                    self.event(f"{message.job_name} #{inst['number']} {inst['status']}{where}{why}")
        elif old is not None:
            self.event(f"{message.job_name} deleted")
        self.query_one("#services", ServicesTable).show(self.services)
        self.show_instances()

    def on_infrastructure_changed(self, message: InfrastructureChanged) -> None:
        """Redraw the cluster tree and note workers and clusters coming and going."""
        self.query_one("#clusters", ClusterTree).show(message.clusters, message.nodes)
        now = {f"cluster {c['name']}": c["online"] for c in message.clusters}
        now.update({f"worker {n['cluster']}/{n['name']}": n["online"] for n in message.nodes})
        for name, online in now.items():
            if self.online.get(name) != online:
                self.event(f"{name} {'online' if online else '[red]offline[/]'}")
        self.online = now

    def on_feed_status(self, message: FeedStatus) -> None:
        """Show the connection on the status line."""
        self.query_one("#status", Static).update(message.text if message.ok else f"[red]{message.text}[/]")

    @on(DataTable.RowHighlighted, "#services")
    def show_instances(self) -> None:
        """Show the instances of the service under the cursor."""
        job = self.query_one("#services", ServicesTable).selected
        self.query_one("#instances", InstancesTable).show(self.services.get(job or ""))

    # ---- actions -----------------------------------------------------------------------------

    def say(self, text: str, ok: bool = True) -> None:
        """Report the outcome of an action on the status line and in the events."""
        self.query_one("#status", Static).update(text if ok else f"[red]{text}[/]")
        self.event(text if ok else f"[red]{text}[/]")

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
        self.push_screen(CreateApp(self.create_from))

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
        if job and await self.push_screen_wait(Confirm(f"Undeploy every instance of {job}?")):
            await self.call("services", "undeploy", {"service": job}, f"undeploying {job}")

    @work
    async def action_delete(self) -> None:
        """Delete the selected service's application, after confirmation."""
        job = self.selected
        if not job:
            return
        app = ".".join(job.split(".")[:2])
        if await self.push_screen_wait(Confirm(f"Delete application {app} and all its services?")):
            await self.call("apps", "delete", {"app": app}, f"deleting {app}")

    def action_tab(self, tab: str) -> None:
        """Show a tab and focus its main widget (a focused widget in a hidden tab would switch back)."""
        self.query_one(TabbedContent).active = tab
        self.query_one(f"#{tab.removesuffix('-tab')}").focus()

    def action_toggle_dark(self) -> None:
        """Switch between the light and the dark theme."""
        self.theme = "textual-light" if self.theme == "textual-dark" else "textual-dark"
