"""A rich progress bar on stderr when asked for, a no-op otherwise; yields `advance(n)`."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


def transient_progress(*columns):
    """A rich Progress on stderr (stdout stays for --json) that clears itself when done, or None when stderr is
    neither a terminal nor a notebook: a log file gets no bars, nor the blank line a finished bar leaves there."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    shown = console.is_terminal or console.is_jupyter
    return Progress(*columns, console=console, transient=True) if shown else None


@contextmanager
def progress_bar(total: int, description: str, *, enabled: bool) -> Iterator[Callable[[int], None]]:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = transient_progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             TimeRemainingColumn()) if enabled and total > 0 else None
    if bar is None:
        yield lambda n: None
        return
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
