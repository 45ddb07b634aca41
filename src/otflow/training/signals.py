"""Stopping a run from outside: SIGINT (Ctrl-C) and SIGTERM.

The first signal asks the loop to stop after the current iteration and a final
checkpoint; a second one aborts at once with ``KeyboardInterrupt`` (an atomic checkpoint
write in progress then leaves the previous file intact).
"""
from __future__ import annotations

import signal
import threading

__all__ = ["StopSignals"]


class StopSignals:
    """A context manager installing the handlers for the duration of a run (in the main
    thread only) and restoring the previous ones on exit.

    :ivar received: the first signal received (``signal.SIGINT`` or ``signal.SIGTERM``), or None.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):  # pragma: no cover - exotic embeddings
                    pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    @property
    def name(self) -> str:
        """The received signal's name (``"SIGINT"``)."""
        return signal.Signals(self.received).name

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: training aborted")
        self.received = signum
