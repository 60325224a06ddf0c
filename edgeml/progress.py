"""Progress reporting for long work, kept out of the library logic.

Library functions take a :class:`Progress`; tests pass :class:`NullProgress`, the CLI a
:class:`RichProgress` that draws bars on stderr.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["NullProgress", "Progress", "RichProgress", "noop"]


def noop(n: int = 1) -> None:
    """A progress callback that ignores its steps."""


class Progress:
    """Receives progress events. The base class ignores them all."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """A unit of work; the yielded function advances it by n steps."""
        yield noop

    def log(self, message: str) -> None:
        """A one-line note for the user."""


NullProgress = Progress


class RichProgress(Progress):
    """Progress bars and notes on stderr with rich (only when stderr is a terminal draws bars)."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bars

        if not sys.stderr.isatty():
            self.console.print(f"[dim]… {description}[/dim]")
            yield noop
            return
        columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                              TextColumn("{task.completed}/{task.total}" if total else ""),
                              TimeElapsedColumn()]
        with Bars(*columns, console=self.console, transient=True) as bars:
            tid = bars.add_task(description, total=total)
            yield lambda n=1: bars.advance(tid, n)  # type: ignore[misc]
        self.console.print(f"[dim]✓ {description}[/dim]")

    def log(self, message: str) -> None:
        self.console.print(message)
