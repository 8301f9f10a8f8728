"""Drill-down screens: one instance (live CPU/memory, logs following) and one worker (load, instances)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label, RichLog, Sparkline

from services.cli.client import CliError

History = Callable[[], list[float]]


class Detail(Screen[None]):
    """A drill-down: a summary line and a CPU sparkline, then what the subclass adds (:meth:`body`)."""

    BINDINGS = [("escape,q", "app.pop_screen", "Back")]

    def __init__(self, describe: Callable[[], str], cpu: History) -> None:
        super().__init__()
        self.describe, self.cpu = describe, cpu

    def compose(self) -> ComposeResult:
        """Summary, CPU sparkline, body."""
        yield Header()
        with Vertical(id="detail"):
            yield Label(self.describe(), id="summary")
            yield Label("cpu %", classes="caption")
            yield Sparkline(self.cpu(), id="cpu")
            yield from self.body()
        yield Footer()

    def body(self) -> ComposeResult:
        """The rest of the screen."""
        yield from ()


class InstanceScreen(Detail):
    """One instance: where it runs, its status, CPU and memory over time, and its log as it grows."""

    def __init__(self, job: str, number: int, describe: Callable[[], str], cpu: History, memory: History) -> None:
        super().__init__(describe, cpu)
        self.job, self.number, self.memory = job, number, memory

    def body(self) -> ComposeResult:
        """Memory sparkline and the log."""
        yield Label("memory MB", classes="caption")
        yield Sparkline(self.memory(), id="memory")
        yield RichLog(id="log", wrap=True)

    def on_mount(self) -> None:
        """Follow the log."""
        self.follow()

    def refresh_data(self) -> None:
        """Redraw from the app's latest state (called on every update of this service)."""
        self.query_one("#summary", Label).update(self.describe())
        self.query_one("#cpu", Sparkline).data = self.cpu()
        self.query_one("#memory", Sparkline).data = self.memory()

    @work(exclusive=True)
    async def follow(self) -> None:
        """Stream the instance's log into the screen until it is closed."""
        log = self.query_one("#log", RichLog)
        try:
            first, answers = await self.app.feed.stream(  # type: ignore[attr-defined]
                "services", "logs", {"service": self.job, "instance": self.number, "tail": 50, "follow": 3600})
        except CliError as exc:
            log.write(f"[red]no logs: {exc}[/]")
            return
        try:
            async for answer in answers:
                for line in (answer.get("data") or {}).get("lines", []):
                    log.write(line)
                if not answer.get("ok"):
                    log.write(f"[red]{answer.get('error', {}).get('message')}[/]")
        finally:
            await self.app.feed.stop_stream(first["stream"])  # type: ignore[attr-defined]


class WorkerScreen(Detail):
    """One worker: its load over time and the instances on it."""

    def __init__(self, name: str, describe: Callable[[], str], cpu: History,
                 instances: Callable[[], list[dict[str, Any]]]) -> None:
        super().__init__(describe, cpu)
        self.worker_name, self.instances = name, instances

    def body(self) -> ComposeResult:
        """The instances on this worker."""
        yield DataTable(id="on-worker", cursor_type="row")

    def on_mount(self) -> None:
        """Fill the table."""
        self.query_one("#on-worker", DataTable).add_columns("service", "#", "status", "cpu%", "MB")
        self.refresh_data()

    def refresh_data(self) -> None:
        """Redraw from the app's latest state."""
        self.query_one("#summary", Label).update(self.describe())
        self.query_one("#cpu", Sparkline).data = self.cpu()
        table = self.query_one("#on-worker", DataTable)
        table.clear()
        for row in self.instances():
            table.add_row(row["job"], str(row["number"]), row["status"], f"{row['cpu_percent']:.0f}",
                          f"{row['memory_mb']:.0f}")


class ClusterScreen(Detail):
    """One cluster: its average load over time and its workers."""

    def __init__(self, name: str, describe: Callable[[], str], cpu: History,
                 workers: Callable[[], list[dict[str, Any]]]) -> None:
        super().__init__(describe, cpu)
        self.cluster_name, self.members = name, workers

    def body(self) -> ComposeResult:
        """The workers of this cluster."""
        yield DataTable(id="workers", cursor_type="row")

    def on_mount(self) -> None:
        """Fill the table."""
        self.query_one("#workers", DataTable).add_columns("worker", "online", "cpu%", "vcpu free", "MB free",
                                                          "instances", "runtimes")
        self.refresh_data()

    def refresh_data(self) -> None:
        """Redraw from the app's latest state."""
        self.query_one("#summary", Label).update(self.describe())
        self.query_one("#cpu", Sparkline).data = self.cpu()
        table = self.query_one("#workers", DataTable)
        table.clear()
        for node in self.members():
            table.add_row(node["name"], "yes" if node["online"] else "no", f"{node['cpu_percent']:.0f}",
                          f"{node['cpu_free']:.1f}/{node['cpu_cores']:.0f}", f"{node['memory_free_mb']:.0f}",
                          str(node["instances"]), ",".join(node["runtimes"]))
