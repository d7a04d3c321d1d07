"""A call on the main thread, interrupted if it runs past a budget of wall-clock time.

Python cannot stop a thread, but it can interrupt its main thread: a signal handler runs there,
between two bytecodes, and may raise. This is the SIGALRM technique of the `signal` module's
documentation (and of pytest-timeout's signal method), kept to the minimum: the timer is set
only around the call, and the handler raises only while a call is running.

The registry uses it to run trusted extractors on a small file's bytes on the event loop's
thread without a thread hand-off (see `ExtractorRegistry.extract_async`): a call that
overruns its budget is interrupted and run again on a runner thread, under the time limit.
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
    """Raised inside a call that ran past its budget.

    A BaseException, as KeyboardInterrupt is, so that a library's `except Exception` around its
    own work does not swallow it.
    """


_running = False
_installed: bool | None = None


def available() -> bool:
    """Whether `call` can interrupt on this thread: the main thread of a process whose SIGALRM
    is free (its default disposition) or already ours."""
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
    if _running:
        signal.setitimer(signal.ITIMER_REAL, _REPEAT)
        raise OverBudget
    # A late alarm, after the call was over: nothing to interrupt.


def call(budget: float, function: Callable[..., Any], /, **kwargs: Any) -> Any:
    """`function(**kwargs)`, raising OverBudget from inside it if it runs more than `budget`
    seconds. Only where `available()` says so."""
    global _running
    try:
        _running = True
        signal.setitimer(signal.ITIMER_REAL, budget)
        return function(**kwargs)
    finally:
        # An alarm handled in here would raise out of the clean-up and leave the timer set:
        # go on until both steps are done (what was raised or returned before is kept).
        while True:
            try:
                _running = False
                signal.setitimer(signal.ITIMER_REAL, 0)
                break
            except OverBudget:
                continue
