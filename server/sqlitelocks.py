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


class BlobLocks:
    """Exclusive use of a blob key across processes: an flock on one of 4,096 files (by the
    key's first three hex digits) in a directory beside the database."""

    def __init__(self, database: Path) -> None:
        self._directory = database.with_name(database.name + ".blob-locks")
        self._directory.mkdir(exist_ok=True)

    @asynccontextmanager
    async def hold(self, blob_key: str) -> AsyncIterator[None]:
        # Its own open file per holder: flock excludes other holders in this process too.
        fd = os.open(self._directory / blob_key[:3], os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    # Polled, not waited for in a thread: waiters must not pin worker threads.
                    await asyncio.sleep(0.01)
            yield
        finally:
            os.close(fd)  # releases the lock
