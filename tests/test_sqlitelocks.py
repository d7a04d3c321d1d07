"""Locks between the processes sharing a SQLite catalog (a server's workers)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from metalake.server.sqlitelocks import BlobLocks, WriterLock

# Another process trying the writer lock without waiting: exit 0 if it got it, 1 if not.
TRY_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    sys.exit(1)
"""


def other_process_gets(lock_file: Path) -> bool:
    tried = subprocess.run([sys.executable, "-c", TRY_LOCK, str(lock_file)], timeout=30)
    return tried.returncode == 0


def test_one_writer_at_a_time_across_processes(tmp_path: Path) -> None:
    database = tmp_path / "catalog.sqlite3"
    lock = WriterLock(database)
    lock_file = tmp_path / "catalog.sqlite3.writer-lock"
    with lock:
        assert not other_process_gets(lock_file)
    assert other_process_gets(lock_file)
    with lock:  # and again: the lock is reusable
        assert not other_process_gets(lock_file)


def test_a_blob_key_is_held_by_one_holder_at_a_time(tmp_path: Path) -> None:
    locks = BlobLocks(tmp_path / "catalog.sqlite3")
    entered: list[str] = []

    async def hold(name: str, key: str, until: asyncio.Event | None = None) -> None:
        async with locks.hold(key):
            entered.append(name)
            if until is not None:
                holding.set()
                await until.wait()

    holding = asyncio.Event()

    async def run() -> None:
        release = asyncio.Event()
        first = asyncio.create_task(hold("a", "ab" * 32, release))
        await holding.wait()
        same_key = asyncio.create_task(hold("b", "ab" * 32))
        await hold("c", "cd" * 32)  # another key: not held up by a
        await asyncio.sleep(0.1)
        assert "b" not in entered  # the same key: waits for a
        release.set()
        await asyncio.gather(first, same_key)

    asyncio.run(run())
    assert entered == ["a", "c", "b"]
