"""Locks between the processes sharing a SQLite catalog (a server's workers)."""

from __future__ import annotations

import asyncio
import fcntl
import signal
import subprocess
import sys
from pathlib import Path

import pytest

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


# Another process locking one byte of the blob lock file (as BlobLocks does on Linux): exit 0
# if it got it (and, with a third argument, hold it until killed), 1 if not.
TRY_BLOB_LOCK = """
import fcntl, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
flock = struct.pack("hhqqixxxx", fcntl.F_WRLCK, os.SEEK_SET, int(sys.argv[2]), 1, 0)
try:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, flock)
except OSError:
    sys.exit(1)
if len(sys.argv) > 3:
    print("held", flush=True)
    time.sleep(60)
"""


def other_process_gets_slot(lock_file: Path, slot: int) -> bool:
    tried = subprocess.run(
        [sys.executable, "-c", TRY_BLOB_LOCK, str(lock_file), str(slot)], timeout=30
    )
    return tried.returncode == 0


def held_by_another_process(lock_file: Path, slot: int) -> subprocess.Popen[bytes]:
    holder = subprocess.Popen(
        [sys.executable, "-c", TRY_BLOB_LOCK, str(lock_file), str(slot), "hold"],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == b"held\n"
    return holder


@pytest.mark.skipif(not hasattr(fcntl, "F_OFD_SETLK"), reason="Linux's open file locks")
def test_a_blob_key_is_held_across_processes_in_one_file(tmp_path: Path) -> None:
    locks = BlobLocks(tmp_path / "catalog.sqlite3")
    lock_file = tmp_path / "catalog.sqlite3.blob-lock"

    async def run() -> None:
        async with locks.hold("abc" + "0" * 61):
            assert not other_process_gets_slot(lock_file, 0xABC)
            assert other_process_gets_slot(lock_file, 0xABD)  # another key's: free
        assert other_process_gets_slot(lock_file, 0xABC)

        # A holder that dies (SIGKILL) leaves nothing held.
        holder = held_by_another_process(lock_file, 0xDEF)
        try:
            waiting = asyncio.create_task(asyncio.wait_for(held(locks, "def" + "0" * 61), 30))
            await asyncio.sleep(0.2)
            assert not waiting.done()
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
        await waiting

    asyncio.run(run())
    # One file, not a file per key created as keys come.
    assert [p.name for p in tmp_path.iterdir()] == ["catalog.sqlite3.blob-lock"]


async def held(locks: BlobLocks, key: str) -> None:
    async with locks.hold(key):
        pass
