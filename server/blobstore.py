"""Blob stores: where the bytes of each item live, addressed by a key.

Every store follows one protocol: bytes go into a `BlobWriter` as they arrive; `commit` makes them
durable and visible under a key in one step, `abort` discards them. Until commit nothing is
visible under any key, so a reader never sees half a blob. A file already complete on local disk
(a resumable upload, staged by metalake.server.staging) is stored in one step by `store_file`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import os
import shutil
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

# Bytes a writer lets pile up in the page cache before asking the kernel to start writing them
# to disk (see start_writeback): the fsync at commit then waits for at most about this much.
WRITE_BEHIND = 8 * 1024 * 1024


class BlobWriter(Protocol):
    """One blob being written. Not safe for concurrent use."""

    @property
    def size(self) -> int:
        """Bytes written so far."""

    @property
    def spool_path(self) -> Path | None:
        """A local file holding the bytes written so far, when the store keeps one."""

    def sha256(self) -> str:
        """Lowercase hex SHA-256 of the bytes written so far."""

    async def write(self, chunk: bytes) -> None:
        """Append bytes."""

    async def flush(self) -> None:
        """Make every byte written so far readable through `spool_path`."""

    async def commit(self, key: str) -> None:
        """Make the bytes durable and readable under `key`, replacing nothing else."""

    async def abort(self) -> None:
        """Discard the bytes; safe to call after a failed write or commit, and twice."""


class BlobStore(Protocol):
    """Keyed, immutable blobs."""

    async def create_writer(self, *, spool: bool = True) -> BlobWriter:
        """Start a new blob; with `spool`, its bytes are also readable at `spool_path` (for the
        extractors) until commit or abort."""

    async def put(self, key: str, data: bytes) -> None:
        """Store a small blob held in memory, whose SHA-256 is `key`, durably and in one step:
        what a writer's write and commit do, without a spool file."""

    async def store_file(self, path: Path, key: str) -> None:
        """Store a complete local file, whose SHA-256 is `key`, durably, unless identical content
        is there already. The file may be moved into the store (a rename, for local blobs on its
        filesystem) or left where it is (copied elsewhere): the caller removes what is left."""

    def read(self, key: str, *, offset: int = 0, chunk_size: int) -> AsyncIterator[bytes]:
        """Stream a blob from `offset`; raises FileNotFoundError when it is missing."""

    async def delete(self, key: str) -> None:
        """Remove a blob; a missing one is not an error."""

    async def exists(self, key: str) -> bool:
        """Whether a committed blob has this key."""

    def blob_keys(self) -> list[tuple[str, datetime]]:
        """Blocking: every committed blob's key and when it was written, for garbage collection."""

    def discard_spooled(self, *, owner: int | None = None) -> int:
        """Blocking: remove what uploads of a previous process left half-written; only safe
        while this server runs no upload, i.e. at start-up. With `owner`, only what the
        process with that pid left (a dead worker of a running server)."""

    def discard_abandoned(self, older_than: datetime) -> int:
        """Blocking: remove bytes of uploads begun before `older_than` and never finished (by
        any server sharing the store)."""


class LocalBlobStore:
    """Blobs as files under a directory: `blobs/ab/cd/<key>`, spooled under `tmp/`."""

    def __init__(self, root: Path) -> None:
        self._blobs = root / "blobs"
        self._tmp = root / "tmp"
        for directory in (self._blobs, self._tmp):
            directory.mkdir(parents=True, exist_ok=True)
        # Blob directories (and their parents) this process made durable (none is ever removed):
        # no mkdir, nor fsync of their parent, per blob.
        self._directories: set[Path] = set()
        self._creating = threading.Lock()

    def discard_spooled(self, *, owner: int | None = None) -> int:
        """Remove leftovers of uploads a previous process did not finish; returns how many.

        Only safe while no upload is running on this directory, i.e. at start-up, or, with
        `owner`, for the files of a process that is dead (they are named after its pid).
        """
        return discard_leftovers(self._tmp, owner=owner)

    def discard_abandoned(self, older_than: datetime) -> int:
        return discard_leftovers(self._tmp, older_than=older_than)

    def path_for(self, key: str) -> Path:
        if not key or any(c not in "0123456789abcdef" for c in key):
            # Keys are content hashes chosen by the server; anything else is a bug, and must
            # never become a path.
            raise ValueError(f"invalid blob key {key!r}")
        return self._blobs / key[:2] / key[2:4] / key

    async def create_writer(self, *, spool: bool = True) -> LocalBlobWriter:
        # The spool is where the bytes are written anyway: `spool` changes nothing here.
        path = self._tmp / spool_name()
        return LocalBlobWriter(self, path, await create_spool_file(path))

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._put, self.path_for(key), data)

    def _put(self, target: Path, data: bytes) -> None:
        """One thread hop: write, fsync, rename into place, fsync the directory."""
        if target.exists():
            # Identical content, its bytes fsynced before they were renamed there (by every
            # writer: this one, LocalBlobWriter._commit). Only the rename may not be durable
            # yet: its writer may have died before fsyncing the directory, or be another thread
            # finishing. The caller holds the blob's lock (Ingest._commit: across a server's
            # worker processes too), so no other process is placing or deleting it meanwhile.
            _fsync_directory(target.parent)
            return
        spool = self._tmp / spool_name()  # named after this process: see discard_spooled
        try:
            fd = os.open(spool, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            self._place(spool, target)
        except BaseException:
            spool.unlink(missing_ok=True)
            raise
        _fsync_directory(target.parent)

    async def store_file(self, path: Path, key: str) -> None:
        await asyncio.to_thread(self._store_file, path, self.path_for(key))

    def _store_file(self, path: Path, target: Path) -> None:
        """One thread hop: fsync the file, rename it into place, fsync the directory. Identical
        content has an identical key: replacing it changes no byte a reader sees."""
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
        self._place(path, target)
        _fsync_directory(target.parent)

    def _place(self, spool: Path, target: Path) -> None:
        directory = target.parent
        if directory not in self._directories:
            self._make_directory(directory)
        try:
            os.replace(spool, target)
        except FileNotFoundError:  # its directory was removed behind our back
            self._directories.difference_update((directory, directory.parent))
            self._make_directory(directory)
            os.replace(spool, target)

    def _make_directory(self, directory: Path) -> None:
        """Create a blob directory (and its parent), durably: a new directory's entry is
        durable only once its parent directory is fsynced. One thread at a time, so that a
        directory another thread is creating is not taken for durable before it is; and the
        parent is fsynced even when the directory was there already, once per process: another
        process (a worker of the same server) may have created it and died before its fsync."""
        with self._creating:
            for level in (directory.parent, directory):
                if level in self._directories:
                    # Made durable by this process already (a first level, `ab/`, is shared by
                    # 256 blob directories): no fsync of `blobs/` for each of them.
                    continue
                with contextlib.suppress(FileExistsError):
                    level.mkdir()
                _fsync_directory(level.parent)
                self._directories.add(level)

    def blob_keys(self) -> list[tuple[str, datetime]]:
        return [
            (path.name, datetime.fromtimestamp(path.stat().st_mtime, UTC))
            for path in self._blobs.glob("*/*/*")
            if path.is_file()
        ]

    async def read(self, key: str, *, offset: int = 0, chunk_size: int) -> AsyncIterator[bytes]:
        handle = await asyncio.to_thread(open, self.path_for(key), "rb")
        try:
            await asyncio.to_thread(handle.seek, offset)
            while chunk := await asyncio.to_thread(handle.read, chunk_size):
                yield chunk
        finally:
            handle.close()

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.path_for(key).unlink, True)

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.path_for(key).is_file)


class LocalBlobWriter:
    """Writes to a spool file; commit is fsync, rename into place, fsync the directory."""

    def __init__(self, store: LocalBlobStore, path: Path, handle: BinaryIO) -> None:
        self._store = store
        self._path = path
        self._handle = handle
        self._hash = hashlib.sha256()
        self._size = 0
        self._done = False
        self._written_back = 0  # bytes handed to start_writeback so far: the next range begins here

    @property
    def size(self) -> int:
        return self._size

    @property
    def spool_path(self) -> Path:
        return self._path

    def sha256(self) -> str:
        return self._hash.hexdigest()

    async def write(self, chunk: bytes) -> None:
        # Hashing and writing together in one hop off the event loop: hashlib releases the GIL
        # on large buffers, so other streams progress meanwhile.
        await asyncio.to_thread(self._write, chunk)

    def _write(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self._handle.write(chunk)
        self._size += len(chunk)
        if self._size - self._written_back >= WRITE_BEHIND:
            start_writeback(self._handle.fileno(), self._written_back)
            self._written_back = self._size

    async def flush(self) -> None:
        await asyncio.to_thread(self._handle.flush)

    async def commit(self, key: str) -> None:
        await asyncio.to_thread(self._commit, key)

    def _commit(self, key: str) -> None:
        target = self._store.path_for(key)
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        # Identical content has an identical key: replacing it changes no byte a reader sees.
        # Placed as a small file's is, its directories created durably.
        self._store._place(self._path, target)
        _fsync_directory(target.parent)
        self._done = True

    async def abort(self) -> None:
        if self._done:
            return
        self._done = True
        # Synchronous on purpose: abort runs while the upload is being cancelled, and an await
        # here could be cancelled in turn, leaving the spool file behind. Close and unlink are
        # quick metadata operations. Closing flushes what is buffered, which fails again after a
        # write failed for want of space: the file goes all the same.
        with contextlib.suppress(OSError):
            self._handle.close()
        self._path.unlink(missing_ok=True)


def spool_name(suffix: str = ".part") -> str:
    """A new spool file's name, starting with this process's pid: a server's worker processes
    share its spool directory, and a dead worker's leftovers must be told from live uploads."""
    return f"{owner_prefix(os.getpid())}{uuid.uuid4().hex}{suffix}"


def owner_prefix(pid: int) -> str:
    """How the names of the spool-directory entries the process `pid` created begin."""
    return f"{pid}-"


async def create_spool_file(path: Path) -> BinaryIO:
    """Create a file off the event loop (creating one can take a while on a busy disk).

    If the upload is cancelled meanwhile, the file is removed once created: no caller is left to
    remove it.
    """
    creating = asyncio.ensure_future(asyncio.to_thread(open, path, "xb"))
    try:
        return await asyncio.shield(creating)
    except asyncio.CancelledError:
        creating.add_done_callback(lambda _: _discard(path, creating))
        raise


def _discard(path: Path, creating: asyncio.Future[Any]) -> None:
    if not creating.cancelled() and creating.exception() is None:
        creating.result().close()
    path.unlink(missing_ok=True)


def discard_leftovers(
    directory: Path,
    *,
    older_than: datetime | None = None,
    keep: Collection[str] = (),
    owner: int | None = None,
) -> int:
    """Blocking: remove what a directory of work in progress holds (every entry but those named
    in `keep`, or those last changed before `older_than`; with `owner`, only the entries the
    process with that pid created, see spool_name), files and directories alike; returns how
    many.

    Whatever a crash left there (a spool file, an extraction's scratch directory, a file of
    unknown origin) must not stop a server from starting.
    """
    count = 0
    prefix = "" if owner is None else owner_prefix(owner)
    for leftover in list(directory.iterdir()):
        if leftover.name in keep or not leftover.name.startswith(prefix):
            continue
        try:
            changed = leftover.lstat().st_mtime
        except FileNotFoundError:
            continue  # removed meanwhile
        if older_than is not None and datetime.fromtimestamp(changed, UTC) >= older_than:
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        count += 1
    return count


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        # The symbols the interpreter is linked with, libc's among them: no library search
        # (ctypes.util.find_library runs ldconfig in a subprocess, at every server start).
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range  # Linux only
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # from linux/fs.h: start writing out dirty pages, do not wait


def start_writeback(fd: int, offset: int) -> None:
    """Blocking, briefly: ask the kernel to start writing a file's dirty pages from `offset` to
    the end, and return without waiting for them.

    Without it a big upload's bytes wait in the page cache until its fsync (the kernel writes
    back on its own only past 10% of memory or after 30 s), and the commit then waits for the
    disk to write the whole file: receiving and writing one after the other. Written behind,
    the disk works while the network does, and the fsync finds little left to do. Only a hint:
    durability still comes from the fsync, and where the call is missing (not Linux) or fails,
    nothing changes but the timing.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, 0, _SYNC_FILE_RANGE_WRITE)  # 0 bytes: to the end


def _fsync_directory(path: Path) -> None:
    # The rename is durable only once the directory entry is.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
