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


class InstanceScreen(Screen[None]):
    """One instance: where it runs, its status, CPU and memory over time, and its log as it grows."""

    BINDINGS = [("escape,q", "app.pop_screen", "Back")]

    def __init__(self, job: str, number: int, describe: Callable[[], str], cpu: History, memory: History) -> None:
        super().__init__()
        self.job, self.number = job, number
        self.describe, self.cpu, self.memory = describe, cpu, memory

    def compose(self) -> ComposeResult:
        """Details, two sparklines, the log."""
        yield Header()
        with Vertical(id="detail"):
            yield Label(self.describe(), id="summary")
            yield Label("cpu %", classes="caption")
            yield Sparkline(self.cpu(), id="cpu")
            yield Label("memory MB", classes="caption")
            yield Sparkline(self.memory(), id="memory")
            yield RichLog(id="log", wrap=True)
        yield Footer()

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


class WorkerScreen(Screen[None]):
    """One worker: its load over time and the instances on it."""

    BINDINGS = [("escape,q", "app.pop_screen", "Back")]

    def __init__(self, name: str, describe: Callable[[], str], cpu: History,
                 instances: Callable[[], list[dict[str, Any]]]) -> None:
        super().__init__()
        self.worker_name = name
        self.describe, self.cpu, self.instances = describe, cpu, instances

    def compose(self) -> ComposeResult:
        """Details, a CPU sparkline and the instances."""
        yield Header()
        with Vertical(id="detail"):
            yield Label(self.describe(), id="summary")
            yield Label("cpu %", classes="caption")
            yield Sparkline(self.cpu(), id="cpu")
            yield DataTable(id="on-worker", cursor_type="row")
        yield Footer()

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
