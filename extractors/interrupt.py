"""Calls on the main thread, interrupted once they run past a budget of wall-clock time.

Python cannot stop a thread, but it can interrupt its main thread: a signal handler runs there,
between two bytecodes, and may raise. This is the SIGALRM technique of the `signal` module's
documentation (and of pytest-timeout's signal method), kept to the minimum: the timer is set
only for the length of a `budget`, and the handler raises only while a call (`run`) is running.

The registry uses it to run trusted extractors on a small file's bytes on the event loop's
thread without a thread hand-off (see `ExtractorRegistry.extract_async`): the file's extractors
share one budget, one timer, and the call that overruns it is interrupted and run again on a
runner thread, under the time limit. What the registry does between calls (merging a result)
is never interrupted: an alarm then only marks the budget spent, and the next call does not
start.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

# After the first interruption, again every this many seconds until the call is over: a call
# that swallowed the first one (a bare `except:`) is interrupted again.
_REPEAT = 0.01


class OverBudget(BaseException):
    """Raised inside a call that ran past its budget, or by `run` once the budget is spent.

    A BaseException, as KeyboardInterrupt is, so that a library's `except Exception` around its
    own work does not swallow it.
    """


_running = False
_spent = False  # the budget's alarm came while no call ran
_installed: bool | None = None


def available() -> bool:
    """Whether calls can be interrupted on this thread: the main thread of a process whose
    SIGALRM is free (its default disposition) or already ours."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return False
    if _installed is None:
        _installed = _install()
    return _installed


def _install() -> bool:
    if not hasattr(signal, "setitimer"):  # not on Windows
        return False
    if signal.getsignal(signal.SIGALRM) is not signal.SIG_DFL:
        return False  # someone else's timer: never take it over
    signal.signal(signal.SIGALRM, _on_alarm)
    return True


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    global _spent
    if _running:
        signal.setitimer(signal.ITIMER_REAL, _REPEAT)
        raise OverBudget
    # Between calls, or after the budget: the call to come, if any, must not start.
    _spent = True


class budget:  # lower case: used as the function it was, `with interrupt.budget(seconds):`
    """`seconds` of wall-clock time for the calls (`run`) made inside, all together: one timer
    for all of them. Only where `available()` says so.

    A class rather than a generator-based context manager: it is entered once per small file
    on the event loop's thread, and `contextlib.contextmanager` made a use cost 3.2-3.3 us
    instead of 2.0-2.1 (its two `setitimer` calls included; timeit, min of 7)."""

    __slots__ = ("_seconds",)

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def __enter__(self) -> None:
        global _spent
        _spent = False
        signal.setitimer(signal.ITIMER_REAL, self._seconds)

    def __exit__(self, *exc_info: object) -> None:
        global _spent
        # No call runs here (`run` leaves none running), so the handler raises nothing.
        signal.setitimer(signal.ITIMER_REAL, 0)
        _spent = False


def run(function: Callable[..., Any], /, *args: Any) -> Any:
    """`function(*args)` inside a `budget`, raising OverBudget from inside it once the budget
    is spent, or at once if it already is."""
    global _running
    try:
        _running = True
        # After setting the flag: an alarm before it only marked the budget spent.
        if _spent:
            raise OverBudget
        return function(*args)
    finally:
        # An alarm handled in here would raise out of the clean-up and leave the flag set: go on
        # until it is cleared (what was raised or returned before is kept).
        while True:
            try:
                _running = False
                break
            except OverBudget:
                continue
