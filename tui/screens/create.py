"""Create applications from an SLA file; the root's validation error is shown right here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from textual.app import ComposeResult
from textual.containers import Grid
from textual.screen import ModalScreen
from textual.widgets import Input, Label

Submit = Callable[[str], Awaitable[str | None]]


class CreateApp(ModalScreen[bool]):
    """Ask for an SLA file path and submit it; stay open with the error until it is accepted."""

    BINDINGS = [("escape", "cancel", "cancel")]

    def __init__(self, submit: Submit) -> None:
        super().__init__()
        self.submit = submit

    def compose(self) -> ComposeResult:
        """Path input and a line for errors."""
        with Grid(id="dialog"):
            yield Label("SLA file to create applications from (Enter to submit, Esc to cancel):", id="question")
            yield Input(placeholder="path/to/sla.json", id="path")
            yield Label("", id="error")

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        """Submit; close on success, else show why."""
        error = await self.submit(event.value.strip())
        if error is None:
            self.dismiss(True)
        else:
            self.query_one("#error", Label).update(f"[red]{error}[/]")

    def action_cancel(self) -> None:
        """Close without creating anything."""
        self.dismiss(False)
