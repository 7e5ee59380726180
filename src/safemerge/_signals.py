"""SIGTERM handled as Ctrl-C: `kill` (a scheduler's, a timeout's) ends a command through the same clean-up."""

from __future__ import annotations

import signal
import threading
from typing import Callable


def sigterm_to_interrupt() -> Callable[[], None]:
    """Make SIGTERM raise KeyboardInterrupt in the main thread; returns the function that puts the old handler back
    (a no-op outside the main thread, where Python cannot set signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)
