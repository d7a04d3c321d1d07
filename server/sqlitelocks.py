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
import errno
import fcntl
import hashlib
import os
import struct
import threading
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import TracebackType

from metalake.server.locks import KeyedLocks


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
    """Exclusive use of a blob key across processes.

    On Linux, a write lock on one byte of a single lock file beside the database (an open file
    description lock, F_OFD_SETLK), at an offset taken from the key: two syscalls per hold, on a
    file opened once. Holders in this process take turns on a keyed asyncio lock first, since
    the one open file description would let a second holder of the same byte in. Elsewhere, an
    flock on one of 4,096 files (by the key's first three hex digits), opened per holder.
    """

    def __init__(self, database: Path) -> None:
        self._local = KeyedLocks()
        self._fd: int | None = None
        self._directory: Path | None = None
        if _OFD_SETLK is not None:
            path = database.with_name(database.name + ".blob-key-locks")
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        else:
            self._directory = database.with_name(database.name + ".blob-locks")
            self._directory.mkdir(exist_ok=True)

    def hold(self, blob_key: str) -> AbstractAsyncContextManager[None]:
        """`async with locks.hold(key):` runs its body while no other holder of `key`, in this
        process or another, does."""
        if self._fd is None:
            return self._hold_file(blob_key)
        return _ByteHold(self._local, self._fd, blob_key)

    @asynccontextmanager
    async def _hold_file(self, blob_key: str) -> AsyncIterator[None]:
        assert self._directory is not None
        # Its own open file per holder: flock excludes other holders in this process too.
        fd = os.open(self._directory / blob_key[:3], os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.01)
            yield
        finally:
            os.close(fd)  # releases the lock

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases any lock still held
            self._fd = None


# Linux's open file description locks: owned by the open file, not the process, so they are not
# dropped when another descriptor of the file is closed, and a process's descriptors exclude
# each other. Released with the file's last descriptor, so by the death of its process too.
_OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None)
# struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks), native alignment.
_FLOCK = struct.Struct("hhqqi4x")


class _ByteHold:
    """Holding a blob key's byte: this process's holders take turns first (`local`).

    An async context manager of its own rather than a generator: every upload takes one."""

    __slots__ = ("_fd", "_key", "_local", "_offset")

    def __init__(self, local: KeyedLocks, fd: int, blob_key: str) -> None:
        self._local = local
        self._fd = fd
        self._key = blob_key
        self._offset = _offset(blob_key)

    async def __aenter__(self) -> None:
        await self._local.acquire(self._key)
        try:
            # Polled, not waited for in a thread: waiters must not pin worker threads.
            while not _try_byte_lock(self._fd, self._offset):  # noqa: ASYNC110 (another process)
                await asyncio.sleep(0.01)
        except BaseException:
            self._local.release(self._key)
            raise

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            _unlock_byte(self._fd, self._offset)
        finally:
            self._local.release(self._key)


def _offset(blob_key: str) -> int:
    """The byte standing for a blob key: its first 60 bits (keys are hex SHA-256), else a hash
    of it; two keys sharing a byte only take turns."""
    try:
        return int(blob_key[:15], 16)
    except ValueError:
        digest = hashlib.blake2b(blob_key.encode(), digest_size=7).digest()
        return int.from_bytes(digest, "big")


def _try_byte_lock(fd: int, offset: int) -> bool:
    assert _OFD_SETLK is not None
    try:
        fcntl.fcntl(fd, _OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES):  # held by another process
            return False
        raise
    return True


def _unlock_byte(fd: int, offset: int) -> None:
    assert _OFD_SETLK is not None
    fcntl.fcntl(fd, _OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, offset, 1, 0))
