"""A time box per configuration, so one stuck configuration cannot stop the run."""

from __future__ import annotations

import signal
import threading


class ConfigTimeout(Exception):
    """A configuration ran past its time box."""


class TimeBox:
    """Raise :class:`ConfigTimeout` in the main thread once ``seconds`` have passed (SIGALRM).

    A timed-out compile may surface wrapped in another exception, so callers check ``expired`` too.
    Elsewhere than the main thread of a POSIX process it only records, never interrupts.
    """

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.expired = False
        self._armed = bool(seconds) and hasattr(signal, "setitimer")
        self._armed = self._armed and threading.current_thread() is threading.main_thread()

    def _on_alarm(self, _signum, _frame):
        self.expired = True
        raise ConfigTimeout(f"timed out after {self.seconds:g} s")

    def __enter__(self) -> TimeBox:
        if self._armed:
            self._previous = signal.signal(signal.SIGALRM, self._on_alarm)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *_exc) -> bool:
        if self._armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
        return False
