"""Stopping a long loop cleanly on Ctrl-C (SIGINT) or SIGTERM.

``with StopOnSignal() as stop:`` turns the first SIGINT or SIGTERM into a request:
``stop.requested`` becomes true and the loop finishes its current step, saves and stops
(training writes a checkpoint and exits 130). A second signal interrupts at once, as
usual, so a stuck program can still be stopped. Reading the flag is a Python attribute
read: no device sync, nothing per step beyond that.

Handlers can only be installed from the main thread; elsewhere, and for signals the
process ignores (e.g. SIGINT of a background job), the block changes nothing.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopOnSignal:
    """Context manager: the first SIGINT/SIGTERM sets :attr:`requested`, a second raises."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
        self.signals = signals
        self.requested = False
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                old = signal.getsignal(s)
                if old is signal.SIG_IGN:
                    continue
                self._old[s] = old
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        return False

    @property
    def name(self) -> str:
        """The signal received, e.g. ``SIGINT``."""
        return signal.Signals(self.signum).name if self.signum else ""


class TerminateAsInterrupt:
    """Context manager: SIGTERM raises ``KeyboardInterrupt("SIGTERM")`` inside the block.

    A scheduler's SIGTERM then ends a sampling run like Ctrl-C does (its run folder is
    marked interrupted, exit status 130) instead of killing it without a word.
    """

    def __enter__(self) -> TerminateAsInterrupt:
        self._old = None
        if threading.current_thread() is threading.main_thread():
            old = signal.getsignal(signal.SIGTERM)
            if old is not signal.SIG_IGN:
                self._old = old
                signal.signal(signal.SIGTERM, self._handle)
        return self

    @staticmethod
    def _handle(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt("SIGTERM")

    def __exit__(self, *exc) -> bool:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def forget_handled_interrupt() -> None:
    """Tell CPython that the last ``KeyboardInterrupt`` was handled, so exit codes hold.

    When a ``KeyboardInterrupt`` ends code run by a string ``exec``/``eval`` (a
    ``namedtuple`` or ``dataclass`` being built during a lazy import, say), CPython
    records it as unhandled even if a caller catches it. Under ``python -m`` the process
    then kills itself with SIGINT at exit instead of returning the status asked for
    (exit 130 reads as -2 to a parent). The flag is reset at the start of every string
    eval, so one trivial eval after catching the interrupt clears it.
    """
    eval("None")  # noqa: S307 - a constant; resets CPython's unhandled-interrupt flag
