"""What the user sees while a bench runs: a rich progress display of runs and of the phase.

Writes to the console it is given and nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from rich.console import Console


class Progress:
    """A rich progress display: runs done, and verdicts of the current phase."""

    def __init__(self, console: Console, runs: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(
            SpinnerColumn(),
            TextColumn("{task.description:<44}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.runs = self.bar.add_task("runs", total=runs)
        self.phase = self.bar.add_task("", total=1, visible=False)

    def __enter__(self) -> Self:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:  # passed through to rich as they came
        self.bar.__exit__(*exc)

    def start_phase(self, text: str, total: int = 1) -> None:
        """Show a new phase, ``total`` steps long."""
        self.bar.reset(self.phase, total=max(1, total), completed=0, description=text, visible=True)

    def update(self, done: int, total: int) -> None:
        """The current phase has done ``done`` of ``total`` steps."""
        self.bar.update(self.phase, completed=done, total=max(1, total))

    def run_done(self) -> None:
        """One more run finished."""
        self.bar.advance(self.runs)
