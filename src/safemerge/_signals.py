"""Signal handling shared by the commands: SIGTERM ends a command as Ctrl-C does (`kill`, a scheduler's or a
timeout's, goes through the same clean-up), a few steps hold both back until they are done, and a library that
installs its own SIGTERM handler (Ray) is not let keep it. Python sets handlers in the main thread only; elsewhere
these are no-ops."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def sigterm_to_interrupt() -> Callable[[], None]:
    """Make SIGTERM raise KeyboardInterrupt; returns the function that puts the old handler back."""
    if not _main_thread():
        return lambda: None

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM that arrive while the block runs are noted, and raised as KeyboardInterrupt once
    it is done (Python runs signal handlers in the main thread, whichever thread the system delivered them to)."""
    if not _main_thread():
        yield
        return
    arrived: list[int] = []
    note = lambda signum, frame: arrived.append(signum)  # noqa: E731
    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if any(previous[sig] is not signal.SIG_IGN for sig in arrived):  # (an ignored Ctrl-C stays ignored)
        raise KeyboardInterrupt


@contextmanager
def sigterm_kept() -> Iterator[None]:
    """Put back, after the block, the SIGTERM handler that something in it replaced (ray.init installs one that
    exits at once with status 15, where the CLI's ends the command as Ctrl-C does, saying so)."""
    before = signal.getsignal(signal.SIGTERM) if _main_thread() else None
    try:
        yield
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


# The commands' outputs put in place in full by this process (atomic_output, and atomic_write with record=True; not
# side files such as a cache entry or stored responses), so that an interrupt that lands after one is not reported as
# "nothing was written". Kept here, not in checkpoint, because the CLI reads it without torch.
finished_outputs: list[str] = []


def note_finished(path) -> None:
    """Record that `path` now holds a complete output, unless it lies inside another output still being made
    (a `.NAME.partial-PID` folder, which an interrupt removes)."""
    from pathlib import Path

    p = Path(path)
    if not any(".partial-" in q.name for q in p.parents):
        finished_outputs.append(str(p))
