"""SIGTERM / SIGINT: finish the current step, checkpoint, and exit with a resume hint.

Preemption (SIGTERM from a scheduler) and Ctrl-C both become a flag the loop reads at the next
step boundary, so the checkpoint holds a consistent state. A second Ctrl-C exits at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class StopSignals:
    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = name

    def __enter__(self) -> StopSignals:
        # Handlers can only be installed from the main thread (a server or test thread skips it).
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
