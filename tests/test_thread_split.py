"""benchmarks.thread_split reads a process's threads from /proc: the first one is the event
loop's, each counts its own CPU and context switches."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from benchmarks.thread_split import _LOOP, _threads

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


def test_each_thread_of_a_process_is_found_with_its_own_cpu() -> None:
    spun, stop = threading.Event(), threading.Event()

    def spin() -> None:
        deadline = time.thread_time() + 0.2
        while time.thread_time() < deadline:  # each check a system call: work between them
            sum(range(20_000))
        spun.set()
        stop.wait(30)

    spinner = threading.Thread(target=spin)
    before = _threads(os.getpid())
    spinner.start()
    try:
        assert spun.wait(30)
        after = _threads(os.getpid())
        new = set(after) - set(before)
        assert spinner.native_id in new
        spinner_after = after[spinner.native_id]
        assert spinner_after.cpu_seconds >= 0.15  # its own CPU, not the process's
        assert spinner_after.user_seconds >= 0.1  # mostly Python's own work: user time
        assert after[os.getpid()].group == _LOOP
        assert after[os.getpid()].switches >= before[os.getpid()].switches
    finally:
        stop.set()
        spinner.join()
