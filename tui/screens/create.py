"""Create applications from an SLA file; the root's validation error is shown right here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Grid
from textual.screen import ModalScreen
from textual.widgets import DirectoryTree, Input, Label

Submit = Callable[[str], Awaitable[str | None]]


class SlaFiles(DirectoryTree):
    """A file picker showing directories and JSON files."""

    def filter_paths(self, paths):  # type: ignore[no-untyped-def]
        """Hide everything but directories and ``*.json``."""
        return [p for p in paths if p.is_dir() or p.suffix == ".json"]


class CreateApp(ModalScreen[bool]):
    """Pick or type an SLA file and submit it; stay open with the error until it is accepted."""

    BINDINGS = [("escape", "cancel", "cancel")]

    def __init__(self, submit: Submit, start: Path | None = None) -> None:
        super().__init__()
        self.submit = submit
        self.start = start or Path.cwd()

    def compose(self) -> ComposeResult:
        """A file picker, the path input and a line for errors."""
        with Grid(id="dialog"):
            yield Label("SLA file (pick one, or type its path; Enter submits, Esc cancels):", id="question")
            yield SlaFiles(self.start, id="files")
            yield Input(placeholder="path/to/sla.json", id="path")
            yield Label("", id="error")

    def on_mount(self) -> None:
        """Typing goes to the path; Tab reaches the picker."""
        self.query_one("#path", Input).focus()

    async def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        """Picking a file submits it."""
        self.query_one("#path", Input).value = str(event.path)
        await self._submit(str(event.path))

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        """Submit the typed path."""
        await self._submit(event.value.strip())

    async def _submit(self, path: str) -> None:
        """Submit; close on success, else show why."""
        error = await self.submit(path)
        if error is None:
            self.dismiss(True)
        else:
            self.query_one("#error", Label).update(f"[red]{error}[/]")

    def action_cancel(self) -> None:
        """Close without creating anything."""
        self.dismiss(False)
