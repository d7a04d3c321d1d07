"""Locks for several server processes sharing one SQLite catalog (a supervisor's workers).

SQLite allows one writer at a time, and a transaction that reads before it writes fails
(SQLITE_BUSY, whatever the busy timeout) when another process committed in between. So writers
take turns: a thread lock within a process, an flock on a file beside the database across
processes. The kernel wakes the next writer the moment the lock is free, where SQLite's busy
handler would sleep and poll; and while one process commits, the others' uploads gather into
their next group commit. The locks vanish with their process, even one killed by SIGKILL.

The same files also give PostgreSQL's advisory locks' guarantee for blobs: between deciding a
blob is unused and deleting it, no process commits the same content (see SqlCatalog.hold_blob).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType


class WriterLock:
    """One writer at a time among the threads and processes using a SQLite database; a
    context manager, like threading.Lock. Without a database file (in memory), a thread lock."""

    def __init__(self, database: Path | None) -> None:
        self._thread_lock = threading.Lock()
        self._path = database.with_name(database.name + ".writer-lock") if database else None
        self._fd: int | None = None

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        if self._path is None:
            return
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


# Linux's open file description locks (3.15+): byte-range locks held by an open file, not by
# a process (so holders in one process exclude each other too, as with flock), dropped when it
# is closed, by the kernel of a dead process too.
_OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None)
BLOB_LOCK_SLOTS = 4096  # by a key's first three hex digits


class BlobLocks:
    """Exclusive use of a blob key across processes: a write lock on one of 4,096 bytes (by the
    key's first three hex digits) of one file beside the database; where open file description
    locks are missing (not Linux), an flock on one of 4,096 files in a directory beside it.

    One file: the files of the directory are created as keys first use them, and on ext4 a new
    inode cost about 0.6 ms of kernel CPU on the development VM, as much as the rest of a small
    upload's storing, for each of the first few thousand uploads of a data directory.
    """

    def __init__(self, database: Path) -> None:
        if _OFD_SETLK is not None:
            self._file = database.with_name(database.name + ".blob-lock")
            os.close(os.open(self._file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        else:
            self._directory = database.with_name(database.name + ".blob-locks")
            self._directory.mkdir(exist_ok=True)

    @asynccontextmanager
    async def hold(self, blob_key: str) -> AsyncIterator[None]:
        # Its own open file per holder: the lock excludes other holders in this process too.
        if _OFD_SETLK is not None:
            fd = os.open(self._file, os.O_RDWR | os.O_CLOEXEC)
            slot = int(blob_key[:3], 16)
        else:
            fd = os.open(self._directory / blob_key[:3], os.O_RDWR | os.O_CREAT, 0o600)
            slot = -1
        try:
            while True:
                if _try_lock(fd, slot):
                    break
                # Polled, not waited for in a thread: waiters must not pin worker threads.
                await asyncio.sleep(0.01)
            yield
        finally:
            os.close(fd)  # releases the lock


def _try_lock(fd: int, slot: int) -> bool:
    """Lock byte `slot` of the file (an open file description lock), or the whole file (flock)
    when `slot` is -1, without waiting: whether it is held now."""
    try:
        if slot < 0:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            assert _OFD_SETLK is not None
            fcntl.fcntl(fd, _OFD_SETLK, _byte_range(fcntl.F_WRLCK, slot))
    except (BlockingIOError, PermissionError):  # EAGAIN, or EACCES where a system says so
        return False
    return True


def _byte_range(kind: int, offset: int) -> bytes:
    """Linux's struct flock for one byte (l_type, l_whence, l_start, l_len, l_pid: 0 for open
    file description locks), with its padding to 32 bytes."""
    return struct.pack("hhqqixxxx", kind, os.SEEK_SET, offset, 1, 0)
