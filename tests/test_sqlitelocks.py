"""Locks between the processes sharing a SQLite catalog (a server's workers)."""

from __future__ import annotations

import asyncio
import fcntl
import subprocess
import sys
import time
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


# Another process holding a blob key's byte for a while (OFD lock, as BlobLocks takes it).
HOLD_BYTE = """
import fcntl, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
offset = int(sys.argv[2][:15], 16)
fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
print("held", flush=True)
time.sleep(float(sys.argv[3]))
"""


def hold_byte_in_another_process(
    database: Path, key: str, seconds: float
) -> subprocess.Popen[bytes]:
    """Another process holding `key`'s byte of `database`'s lock file, once it holds it."""
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            HOLD_BYTE,
            str(database.with_name(database.name + ".blob-key-locks")),
            key,
            str(seconds),
        ],
        stdout=subprocess.PIPE,
    )
    assert other.stdout is not None
    assert other.stdout.readline() == b"held\n"
    return other


@pytest.mark.skipif(not hasattr(fcntl, "F_OFD_SETLK"), reason="open file description locks")
def test_a_blob_key_held_by_another_process_waits_until_it_is_free(tmp_path: Path) -> None:
    locks = BlobLocks(tmp_path / "catalog.sqlite3")
    key = "ab" * 32
    other = hold_byte_in_another_process(tmp_path / "catalog.sqlite3", key, 0.5)
    try:

        async def run() -> float:
            async with locks.hold("cd" * 32):  # another key: free
                pass
            started = time.monotonic()
            async with locks.hold(key):
                return time.monotonic() - started

        waited = asyncio.run(run())
        assert other.wait(30) == 0
        assert waited >= 0.2  # it waited for the other process to let go (or die)
    finally:
        other.kill()
        locks.close()


def test_a_blob_key_held_by_a_killed_process_is_free(tmp_path: Path) -> None:
    locks = BlobLocks(tmp_path / "catalog.sqlite3")
    key = "ef" * 32

    async def hold() -> None:
        async with locks.hold(key):
            pass

    if hasattr(fcntl, "F_OFD_SETLK"):
        other = hold_byte_in_another_process(tmp_path / "catalog.sqlite3", key, 60)
        other.kill()
        other.wait(30)
    asyncio.run(asyncio.wait_for(hold(), 5))
    locks.close()
