"""Modal dialogs: a yes/no confirmation and a one-line prompt."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Grid
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label


class Confirm(ModalScreen[bool]):
    """Ask before something destructive; dismisses with True only on "yes"."""

    BINDINGS = [("y", "answer(True)", "yes"), ("n,escape", "answer(False)", "no")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        """The question and two buttons."""
        with Grid(id="dialog"):
            yield Label(self.question, id="question")
            yield Button("Yes (y)", variant="error", id="yes")
            yield Button("No (n)", variant="primary", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        """Answer with the button."""
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        """Answer with a key."""
        self.dismiss(yes)


class Prompt(ModalScreen[str | None]):
    """Ask for one value; dismisses with the text, or None on escape."""

    BINDINGS = [("escape", "cancel", "cancel")]

    def __init__(self, question: str, value: str = "") -> None:
        super().__init__()
        self.question = question
        self.value = value

    def compose(self) -> ComposeResult:
        """The question and an input."""
        with Grid(id="dialog"):
            yield Label(self.question, id="question")
            yield Input(self.value, id="answer")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Enter: answer."""
        self.dismiss(event.value.strip())

    def action_cancel(self) -> None:
        """Escape: no answer."""
        self.dismiss(None)
