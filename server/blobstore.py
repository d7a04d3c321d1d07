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
import errno
import fcntl
import functools
import hashlib
import logging
import mmap
import os
import re
import shutil
import sqlite3
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

log = logging.getLogger(__name__)

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

    def put_deferred(self, key: str, data: bytes) -> Callable[[], None] | None:
        """Queue a small blob, whose SHA-256 is `key`, without storing it yet; the blocking
        function returned stores it durably (with every blob queued meanwhile: group commit) or
        raises what failed it. The caller runs that function in a worker thread before relying
        on the blob: the catalog's batch does, before committing the item that refers to it, so
        that one thread hop covers both. None when this store does not defer blobs: `put` it."""

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


# Blobs `put` in one step up to this size go into a pack (every small upload's, every
# thumbnail's: at most SMALL_FILE bytes); larger ones, and every blob a writer streams or
# `store_file` moves, are files of their own.
PACKED_MAX = 4 * 1024 * 1024
# A process starts a new pack once its active one has grown past this many bytes.
PACK_SIZE = 1024 * 1024 * 1024
# Of the bytes a pack's process appended and synced, only the last this many stay in the page
# cache once synced (see `_uncache`).
CACHED_TAIL = 16 * 1024 * 1024
# Whether packs are appended with O_DIRECT where the filesystem allows it (see
# LocalBlobStore._write_direct); where it does not (tmpfs, some network filesystems), through the
# page cache.
DIRECT_PACKS = True
# Direct writes start at, and are, multiples of this many bytes: the page size, a multiple of
# any disk's logical block size.
DIRECT_ALIGN = 4096
# The page-aligned buffer a process's direct appends are copied into (records stream through
# it, so one larger than this is written in parts).
_DIRECT_BUFFER = 2 * 1024 * 1024
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)  # Linux, FreeBSD; not macOS
# Each record of a pack: this header (magic, the key's 32 bytes, the length), then the bytes.
# The index is what counts; the headers let a pack be walked, verified, an index rebuilt. A
# batch written directly (see DIRECT_PACKS) ends with zeros up to the next multiple of
# DIRECT_ALIGN bytes: a walker that finds a header of zeros goes on at that multiple.
_RECORD = struct.Struct(">4s32sQ")
_MAGIC = b"MLB1"
# Keys are lower-case hex content hashes (see `path_for`).
_KEY = re.compile(r"[0-9a-f]+")
# Keys looked up in one query (SQLite allows 32,766 parameters; batches hold at most 256 blobs).
_LOOKUP_KEYS = 500


@dataclass(eq=False)
class _Pack:
    """A pack this process appends to, holding an exclusive flock on it while it is open."""

    name: str
    fd: int
    size: int
    # The same file opened with O_DIRECT, which every append goes through; None: the appends go
    # through `fd` and the page cache.
    direct_fd: int | None = None
    retired: bool = False  # nothing more is appended: it is full, or a write or sync failed
    cached_from: int = 0  # the bytes before were synced and let go of the page cache
    users: int = 0  # appended blobs not yet indexed (or failed): the fd stays open for them
    closed: bool = False


@dataclass(eq=False)
class _Queued:
    """A blob `put` asked to pack, waiting for the group commit that appends, syncs and indexes
    it (or finds it stored already)."""

    key: str
    data: bytes
    done: bool = False
    error: BaseException | None = None


@dataclass(eq=False)
class _Appended:
    """A blob appended to a pack, waiting for the pack's fdatasync and its index row."""

    key: str
    pack: _Pack
    offset: int  # of its bytes, past the record's header
    length: int
    written_at: float
    error: BaseException | None = None


@dataclass(frozen=True)
class _Location:
    pack: str
    offset: int
    length: int


class LocalBlobStore:
    """Blobs under a directory. Small ones (`put`) are appended to pack files,
    `blobs/packs/<pid>-<uuid>.pack`, found through an index, `blobs/packs/index.sqlite3`;
    the others (a writer's, `store_file`'s) are files, `blobs/ab/cd/<key>`, spooled under `tmp/`.

    Why packs: a file per small blob costs a new inode, a directory entry and two fsyncs each,
    and that was most of a small upload's server CPU (kernel time allocating inodes). A packed
    blob costs an append; one fdatasync and one index commit cover every put that arrived
    meanwhile (group commit).

    Durability: a put appends its record, fdatasyncs the pack, and only then commits its index
    row: a row never names bytes that are not durable. Bytes appended but never indexed (a crash
    or a failure in between) are garbage no reader sees. Each process appends to a pack of its
    own (a server's worker processes share the directory), holding an exclusive flock on it; a
    pack that no live process holds and no index row names is removed by `discard_spooled` and
    `discard_abandoned`. `delete` removes the row, then punches the bytes out of the pack.

    With `packed=False`, `put` stores a file per blob too (what older versions did); packed or
    not, blobs stored either way are read, found and deleted alike.

    Appends bypass the page cache (O_DIRECT) where the filesystem allows it: see `_write_direct`.
    """

    def __init__(self, root: Path, *, packed: bool = True) -> None:
        self._blobs = root / "blobs"
        self._tmp = root / "tmp"
        self._packs = self._blobs / "packs"
        for directory in (self._blobs, self._tmp, self._packs):
            directory.mkdir(parents=True, exist_ok=True)
        self.packed = packed
        self.pack_size = PACK_SIZE
        # Blob directories (and their parents) this process made durable (none is ever removed):
        # no mkdir, nor fsync of their parent, per blob.
        self._directories: set[Path] = set()
        self._creating = threading.Lock()
        self._appending = threading.Lock()  # the active pack, its size
        self._queuing = threading.Lock()  # `_pending`: stores may be shared by threads' loops
        self._syncing = threading.Lock()  # held by the one thread syncing and indexing for all
        self._active: _Pack | None = None
        self._pending: list[_Queued] = []  # puts waiting for the next group commit
        self._commit_task: asyncio.Task[None] | None = None  # the group commit in flight
        self._writing = threading.Lock()  # the connection that writes the index
        self._index: sqlite3.Connection | None = None
        self._readers = threading.local()  # a connection per thread, for lookups
        self._schema_ready = False
        self._packs_durable = False
        self.direct = DIRECT_PACKS and _O_DIRECT != 0  # until a filesystem refuses it
        self._direct_buffer: mmap.mmap | None = None  # under `_appending`

    def close(self) -> None:
        """Blocking: let go of this process's active pack (and its lock: once it holds no blob,
        it can be removed) and of the index; used again, the store opens new ones."""
        with self._syncing, self._appending:
            if self._active is not None:
                self._retire(self._active)
        with self._writing:
            if self._index is not None:
                self._index.close()
                self._index = None
            reader: sqlite3.Connection | None = getattr(self._readers, "index", None)
            if reader is not None:
                reader.close()
                self._readers.index = None

    def discard_spooled(self, *, owner: int | None = None) -> int:
        """Remove leftovers of uploads a previous process did not finish; returns how many.

        Only safe while no upload is running on this directory, i.e. at start-up, or, with
        `owner`, for the files of a process that is dead (they are named after its pid).
        At start-up, also packs left with no blob in them (see `_reclaim_packs`).
        """
        count = discard_leftovers(self._tmp, owner=owner)
        if owner is None:
            self._reclaim_packs()
        return count

    def discard_abandoned(self, older_than: datetime) -> int:
        count = discard_leftovers(self._tmp, older_than=older_than)
        self._reclaim_packs()
        return count

    def path_for(self, key: str) -> Path:
        _check_key(key)
        return self._blobs / key[:2] / key[2:4] / key

    def local_path(self, key: str) -> Path | None:
        """Blocking: the file holding a blob stored as a file, None when it is not one (packed,
        or missing): such a blob is read through `read`."""
        target = self.path_for(key)
        return target if target.is_file() else None

    async def create_writer(self, *, spool: bool = True) -> LocalBlobWriter:
        # The spool is where the bytes are written anyway: `spool` changes nothing here.
        path = self._tmp / spool_name()
        return LocalBlobWriter(self, path, await create_spool_file(path))

    async def put(self, key: str, data: bytes) -> None:
        """A small blob waits for the group commit that covers it, which appends it (no thread
        hop of its own: one hop per batch appends, syncs and indexes every blob queued
        meanwhile); any other is stored as a file, in a thread hop."""
        queued = self._queue(key, data)
        if queued is None:
            await asyncio.to_thread(self._put_file, self.path_for(key), data)
            return
        await self._committed(queued)

    def put_deferred(self, key: str, data: bytes) -> Callable[[], None] | None:
        queued = self._queue(key, data)
        if queued is None:
            return None
        return functools.partial(self._make_durable, queued)

    def _queue(self, key: str, data: bytes) -> _Queued | None:
        """Queue a blob for the next group commit; None when it is not one to pack."""
        _check_key(key)
        if not (self.packed and len(key) == 64 and len(data) <= PACKED_MAX):
            return None
        queued = _Queued(key, data)
        with self._queuing:
            self._pending.append(queued)
        return queued

    def _make_durable(self, queued: _Queued) -> None:
        """Blocking: return once a queued blob is durable and indexed (committing it, and every
        blob queued with it, unless another thread's commit took it), or raise what failed it."""
        if not queued.done:
            # Once it holds the sync lock, every blob queued before this call is committed.
            self._commit_pending()
        if queued.error is not None:
            raise queued.error

    async def _committed(self, queued: _Queued) -> None:
        """Wait until the blob's bytes are durable and its row committed, or raise what failed
        it. Group commit, one in flight per event loop: the blobs queued while one runs are all
        covered by the next, one thread hop for all of them."""
        loop = asyncio.get_running_loop()
        while not queued.done:
            running = self._commit_task
            if running is None or running.done() or running.get_loop() is not loop:
                running = self._commit_task = loop.create_task(
                    asyncio.to_thread(self._commit_pending)
                )
            # Shielded: the commit covers other uploads than a cancelled one.
            await asyncio.shield(running)
        if queued.error is not None:
            raise queued.error

    def _stored_already(self, queued: _Queued, indexed: bool) -> bool:
        """Blocking: whether identical content is stored already, packed (`indexed`: its row
        was committed only once its bytes were durable) or as a file. The caller holds the
        blob's lock (Ingest._commit: across a server's worker processes too), so no other
        process is storing or deleting it."""
        if indexed:
            return True
        target = self.path_for(queued.key)
        if target.exists():
            _fsync_directory(target.parent)  # see _put_file
            return True
        return False

    def _put_file(self, target: Path, data: bytes) -> None:
        """Write, fsync, rename into place, fsync the directory."""
        if target.exists():
            # Identical content, its bytes fsynced before they were renamed there (by every
            # writer: this one, LocalBlobWriter._commit). Only the rename may not be durable
            # yet: its writer may have died before fsyncing the directory, or be another thread
            # finishing. The caller holds the blob's lock, so no other process is placing or
            # deleting it meanwhile.
            _fsync_directory(target.parent)
            return
        spool = self._tmp / spool_name()  # named after this process: see discard_spooled
        try:
            fd = os.open(spool, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._place(spool, target)
        except BaseException:
            spool.unlink(missing_ok=True)
            raise
        _fsync_directory(target.parent)

    # Packs: appending, group commit.

    def _append_all(self, blobs: list[_Queued]) -> list[_Appended | BaseException]:
        """Append the records of a batch's blobs to the active pack, each blob's outcome in
        order: where it went, or what failed it.

        One writev per pack rather than two writes per blob: each system call also hands the
        event loop's thread the GIL and takes it back, and a batch's blobs go to one pack but
        at a size boundary. If a write fails (a full disk), its blobs are appended one at a
        time, so that only those that do not fit fail.
        """
        outcomes: list[_Appended | BaseException] = []
        with self._appending:
            position = 0
            while position < len(blobs):
                try:
                    pack = self._active_pack()
                except BaseException as error:  # this blob fails; the next one tries again
                    outcomes.append(error)
                    position += 1
                    continue
                group, end = [], pack.size
                for blob in blobs[position:]:
                    group.append(blob)
                    end += _RECORD.size + len(blob.data)
                    if end >= self.pack_size:
                        break  # the pack is full after this one
                position += len(group)
                try:
                    outcomes.extend(self._write_records(pack, group))
                except BaseException:
                    for blob in group:
                        try:
                            outcomes.extend(self._write_records(self._active_pack(), [blob]))
                        except BaseException as error:
                            outcomes.append(error)
        return outcomes

    def _active_pack(self) -> _Pack:
        """The pack this process appends to, made if there is none (under `_appending`)."""
        if self._active is None:
            self._active = self._new_pack()
        return self._active

    def _write_records(self, pack: _Pack, blobs: list[_Queued]) -> list[_Appended]:
        """Append the blobs' records to `pack` in one write (under `_appending`: quick, no
        sync). A failed write (a full disk, typically) is cut off the pack, so that the next
        record starts where it did."""
        start = pack.size
        try:
            if pack.direct_fd is not None:
                end = self._write_direct(pack.direct_fd, start, blobs)
            else:
                _writev_all(pack.fd, [part for blob in blobs for part in _record(blob)])
                end = start + sum(_RECORD.size + len(blob.data) for blob in blobs)
        except BaseException as error:
            try:
                os.ftruncate(pack.fd, start)
                os.lseek(pack.fd, start, os.SEEK_SET)
            except OSError:
                self._retire(pack)
            if pack.direct_fd is not None and _refused_direct(error):
                self._stop_direct_writes(pack, error)
            raise
        now = time.time()
        appended = []
        offset = start
        for blob in blobs:
            offset += _RECORD.size
            pack.users += 1
            appended.append(_Appended(blob.key, pack, offset, len(blob.data), now))
            offset += len(blob.data)
        pack.size = end
        if pack.size >= self.pack_size:
            self._retire(pack)
        return appended

    def _write_direct(self, fd: int, start: int, blobs: list[_Queued]) -> int:
        """Write the blobs' records at `start` (a multiple of DIRECT_ALIGN) through `fd`, opened
        with O_DIRECT, then zeros up to the next multiple; returns where the zeros end.

        The bytes go from an aligned buffer of this process straight to the disk. Through the
        page cache, every append copied each blob into pages just handed back by the previous
        batch's `_uncache` (cold in the CPU's caches) and kept the kernel's writeback busy:
        in-process scratch runs of 3,000 bench JPEGs (160 KiB, 16 uploads at once) spent
        0.335-0.344 ms of system CPU per file in the worker threads that way (the code of
        0e535e0), 0.092-0.099 ms this way (three runs each). A blob is copied once, into the
        buffer, which stays warm (records longer than it stream through it).
        """
        if self._direct_buffer is None:
            self._direct_buffer = mmap.mmap(-1, _DIRECT_BUFFER)  # page-aligned, zero-filled
        buffer = self._direct_buffer
        filled, position = 0, start
        for blob in blobs:
            for part in _record(blob):
                view = memoryview(part)
                while view:
                    taken = min(len(view), _DIRECT_BUFFER - filled)
                    buffer[filled : filled + taken] = view[:taken]
                    filled += taken
                    view = view[taken:]
                    if filled == _DIRECT_BUFFER:
                        _pwrite_all(fd, buffer, _DIRECT_BUFFER, position)
                        position += _DIRECT_BUFFER
                        filled = 0
        padded = -(-filled // DIRECT_ALIGN) * DIRECT_ALIGN
        buffer[filled:padded] = bytes(padded - filled)
        _pwrite_all(fd, buffer, padded, position)
        return position + padded

    def _stop_direct_writes(self, pack: _Pack, error: BaseException) -> None:
        """A filesystem that took O_DIRECT at open but refuses its writes: append through the
        page cache from now on, in a new pack (under `_appending`)."""
        if self.direct:
            log.info("appending to packs through the page cache: direct writes fail (%s)", error)
        self.direct = False
        self._retire(pack)

    def _commit_pending(self) -> None:
        """Blocking: append every blob queued so far, make them durable and index them (or fail
        each one that failed: each `_Queued` says). One thread at a time: the loops of several
        threads may share a store (tests do), never a batch."""
        with self._syncing:
            with self._queuing:
                queued, self._pending = self._pending, []
            batch: list[tuple[_Queued, _Appended]] = []
            try:
                indexed = self._indexed([blob.key for blob in queued])
            except BaseException as error:  # an unreadable index: no blob can be stored
                for blob in queued:
                    blob.error = error
                queued_to_pack = []
            else:
                queued_to_pack = queued
            to_append = []
            for blob in queued_to_pack:
                try:
                    if not self._stored_already(blob, blob.key in indexed):
                        to_append.append(blob)
                except BaseException as error:  # this blob fails, not the others
                    blob.error = error
            for blob, outcome in zip(to_append, self._append_all(to_append), strict=True):
                if isinstance(outcome, _Appended):
                    batch.append((blob, outcome))
                else:  # a full disk: this blob fails, not the others
                    blob.error = outcome
            try:
                if batch:
                    self._commit_batch([appended for _, appended in batch])
            finally:
                for blob, appended in batch:
                    blob.error = appended.error
                for blob in queued:
                    blob.done = True

    def _commit_batch(self, batch: list[_Appended]) -> None:
        """fdatasync the packs, then index the blobs, in one transaction; in that order: a row
        must never name bytes that are not durable."""
        packs = list({id(a.pack): a.pack for a in batch}.values())
        try:
            for pack in packs:
                try:
                    os.fdatasync(pack.fd)
                except BaseException:
                    # Which of its pages reached the disk is unknown after a failed sync, and
                    # a later one may not say: nothing more goes into this pack.
                    with self._appending:
                        self._retire(pack)
                    raise
                if pack.direct_fd is None:
                    _uncache(pack)  # appended through the page cache
            rows = [(a.key, a.pack.name, a.offset, a.length, a.written_at) for a in batch]
            with self._writing, self._index_errors():
                index = self._writer()
                index.execute("BEGIN IMMEDIATE")
                try:
                    # OR IGNORE: identical content indexed meanwhile; these bytes are garbage.
                    index.executemany("INSERT OR IGNORE INTO blobs VALUES (?, ?, ?, ?, ?)", rows)
                    index.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        index.execute("ROLLBACK")
                    raise
        except BaseException as error:
            for appended in batch:
                appended.error = error
                # Garbage, never indexed: its space goes back now, not when its pack goes.
                with contextlib.suppress(OSError):
                    start = appended.offset - _RECORD.size
                    free_range(appended.pack.fd, start, appended.length + _RECORD.size)
        finally:
            with self._appending:
                for appended in batch:
                    appended.pack.users -= 1
                for pack in packs:
                    if pack.retired and pack.users == 0:
                        self._close(pack)

    def _new_pack(self) -> _Pack:
        """A new pack, locked, its directory entry durable (under `_appending`)."""
        while True:
            name = f"{owner_prefix(os.getpid())}{uuid.uuid4().hex}.pack"
            path = self._packs / name
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                # Held while this process may append to it: no other process removes it then.
                fcntl.flock(fd, fcntl.LOCK_EX)
                # Another process may have taken it for an abandoned empty pack and removed it
                # between its creation and the lock: then take another one.
                if os.fstat(fd).st_ino == _inode(path):
                    if not self._packs_durable:
                        _fsync_directory(self._blobs)  # `packs/` itself, once per process
                    _fsync_directory(self._packs)
                    self._packs_durable = True
                    return _Pack(name, fd, 0, direct_fd=self._open_direct(path))
            except BaseException:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
            os.close(fd)

    def _open_direct(self, path: Path) -> int | None:
        """The pack opened for direct appends, or None (appends go through the page cache)
        when this store does not write directly or the filesystem refuses O_DIRECT."""
        if not self.direct:
            return None
        try:
            return os.open(path, os.O_WRONLY | os.O_CLOEXEC | _O_DIRECT)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            log.info("appending to packs through the page cache: %s refuses O_DIRECT", path.parent)
            self.direct = False
            return None

    def _retire(self, pack: _Pack) -> None:
        """Append nothing more to `pack`; close it once its blobs are indexed (under
        `_appending`)."""
        pack.retired = True
        if self._active is pack:
            self._active = None
        if pack.users == 0:
            self._close(pack)

    def _close(self, pack: _Pack) -> None:
        if not pack.closed:
            pack.closed = True
            if pack.direct_fd is not None:
                os.close(pack.direct_fd)
            os.close(pack.fd)  # releases the lock: once empty, any process may remove it

    def _reclaim_packs(self) -> int:
        """Blocking: remove the packs that no index row names and no live process appends to
        (each holds a lock on its active pack, released when it dies); returns how many.

        Such a pack is one whose blobs were all deleted, or one a crashed process left with
        nothing indexed in it. A pack with blobs left keeps what a crash left of it (a torn or
        unindexed record): harmless, never read, gone with the pack.
        """
        removed = 0
        for path in self._packs.glob("*.pack"):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # some process's active pack
                with self._index_errors():
                    named = self._reader().execute(
                        "SELECT 1 FROM blobs WHERE pack = ? LIMIT 1", (path.name,)
                    )
                    if not named.fetchall() and os.fstat(fd).st_ino == _inode(path):
                        path.unlink()
                        removed += 1
            finally:
                os.close(fd)
        if removed:
            _fsync_directory(self._packs)
            log.info("removed %d pack(s) with no blob left in them", removed)
        return removed

    # The index.

    def _connect(self) -> sqlite3.Connection:
        index = sqlite3.connect(
            self._packs / "index.sqlite3",
            timeout=60,  # busy timeout: other processes of the server commit to it too
            isolation_level=None,  # no implicit transactions: BEGIN where one is meant
            check_same_thread=False,
        )
        # FULL: the log is synced at each commit, so an acknowledged blob's row survives a
        # power loss.
        index.execute("PRAGMA synchronous = FULL")
        if not self._schema_ready:
            self._set_up(index)
            self._schema_ready = True
        return index

    def _set_up(self, index: sqlite3.Connection) -> None:
        """Make the index a WAL database with its table, under an exclusive lock on the packs
        directory: two processes switching a new database to WAL at once can fail with
        "database is locked" at once (SQLite's deadlock avoidance skips the busy timeout),
        which the worker processes of a server starting on a new data directory would hit.
        WAL (readers never wait for a writer, a commit appends to the log) is kept in the
        file: later connections need not ask."""
        fd = os.open(self._packs, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            index.execute("PRAGMA journal_mode = WAL")
            index.execute(
                "CREATE TABLE IF NOT EXISTS blobs (key TEXT PRIMARY KEY, pack TEXT NOT NULL,"
                " offset INTEGER NOT NULL, length INTEGER NOT NULL, written_at REAL NOT NULL)"
                " WITHOUT ROWID"
            )
            index.execute("CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs (pack)")
        finally:
            os.close(fd)  # releases the lock

    def _writer(self) -> sqlite3.Connection:
        """The connection that writes (under `_writing`)."""
        if self._index is None:
            self._index = self._connect()
        return self._index

    def _reader(self) -> sqlite3.Connection:
        """This thread's connection for lookups: they run concurrently, beside a commit."""
        index: sqlite3.Connection | None = getattr(self._readers, "index", None)
        if index is None:
            with self._writing:  # the first one creates the schema
                index = self._readers.index = self._connect()
        return index

    def _indexed(self, keys: list[str]) -> set[str]:
        """Which of these keys the index holds: one query for a batch of blobs."""
        found: set[str] = set()
        for start in range(0, len(keys), _LOOKUP_KEYS):
            part = keys[start : start + _LOOKUP_KEYS]
            marks = ",".join("?" * len(part))
            with self._index_errors():
                rows = (
                    self._reader()
                    .execute(f"SELECT key FROM blobs WHERE key IN ({marks})", part)
                    .fetchall()
                )
            found.update(key for (key,) in rows)
        return found

    def _locate(self, key: str) -> _Location | None:
        with self._index_errors():
            rows = (
                self._reader()
                .execute("SELECT pack, offset, length FROM blobs WHERE key = ?", (key,))
                .fetchall()  # all: the statement is done, no read snapshot is kept open
            )
        return _Location(*rows[0]) if rows else None

    @contextlib.contextmanager
    def _index_errors(self) -> Iterator[None]:
        """SQLite's failures as what they mean to a caller: a full disk is a full disk."""
        try:
            yield
        except sqlite3.Error as error:
            code = getattr(error, "sqlite_errorcode", 0)
            if code & 0xFF == _SQLITE_FULL:
                where = str(self._packs / "index.sqlite3")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), where) from error
            raise

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
        found = {
            path.name: datetime.fromtimestamp(path.stat().st_mtime, UTC)
            for path in self._blobs.glob("*/*/*")
            if path.is_file()
        }
        with self._index_errors():
            rows = self._reader().execute("SELECT key, written_at FROM blobs").fetchall()
        for key, written_at in rows:
            found.setdefault(key, datetime.fromtimestamp(written_at, UTC))
        return list(found.items())

    async def read(self, key: str, *, offset: int = 0, chunk_size: int) -> AsyncIterator[bytes]:
        packed = await asyncio.to_thread(self._read_packed, key, offset)
        if packed is not None:
            for start in range(0, len(packed), chunk_size):
                yield packed[start : start + chunk_size]
            return
        handle = await asyncio.to_thread(open, self.path_for(key), "rb")
        try:
            await asyncio.to_thread(handle.seek, offset)
            while chunk := await asyncio.to_thread(handle.read, chunk_size):
                yield chunk
        finally:
            handle.close()

    def _read_packed(self, key: str, offset: int) -> bytes | None:
        """A packed blob's bytes from `offset`, None when it is not packed.

        Read whole (a packed blob is small) and checked against the index after the read: a
        delete removes the row before it punches the bytes out, so bytes read while the row was
        still there afterwards are the blob's, never the zeros of a hole.
        """
        location = self._locate(key)
        while location is not None:
            try:
                data: bytes | None = self._pread(location, offset)
            except FileNotFoundError:
                data = None  # the pack is gone: its blobs were all deleted meanwhile?
            now = self._locate(key)
            if now == location:
                if data is None:
                    raise FileNotFoundError(
                        errno.ENOENT, "the index names a missing pack", location.pack
                    )
                return data
            location = now  # deleted, or deleted and stored again, meanwhile
        return None

    def _pread(self, location: _Location, offset: int) -> bytes:
        path = self._packs / location.pack
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            position = location.offset + min(offset, location.length)
            end = location.offset + location.length
            parts = []
            while position < end:
                part = os.pread(fd, end - position, position)
                if not part:
                    raise OSError(errno.EIO, "a pack is shorter than its index says", str(path))
                parts.append(part)
                position += len(part)
            return b"".join(parts)
        finally:
            os.close(fd)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._delete, key)

    def _delete(self, key: str) -> None:
        target = self.path_for(key)
        # A put of this blob still queued is withdrawn (an upload that was cancelled before its
        # item committed deletes its blob): once the group commit in flight, which may be
        # storing it, is done, so that no index row for it appears after this delete.
        with self._syncing, self._queuing:
            withdrawn = [queued for queued in self._pending if queued.key == key]
            if withdrawn:
                self._pending = [queued for queued in self._pending if queued.key != key]
        for queued in withdrawn:
            queued.error = FileNotFoundError(errno.ENOENT, "deleted before it was stored", key)
            queued.done = True
        location = self._unindex(key)
        if location is not None:
            self._punch(location)
        target.unlink(missing_ok=True)

    def _unindex(self, key: str) -> _Location | None:
        """Remove a packed blob's row, durably; where its bytes were, None when not packed."""
        with self._writing, self._index_errors():
            index = self._writer()
            index.execute("BEGIN IMMEDIATE")
            try:
                rows = index.execute(
                    "SELECT pack, offset, length FROM blobs WHERE key = ?", (key,)
                ).fetchall()
                if rows:
                    index.execute("DELETE FROM blobs WHERE key = ?", (key,))
                index.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    index.execute("ROLLBACK")
                raise
        return _Location(*rows[0]) if rows else None

    def _punch(self, location: _Location) -> None:
        """Free a deleted blob's bytes in its pack (its record's header stays: the pack can
        still be walked). The blob is gone already: a failure here is logged, not raised."""
        path = self._packs / location.pack
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            free_range(fd, location.offset, location.length)
            os.fdatasync(fd)
        except OSError:
            log.exception(
                "could not free the %d bytes at %d of %s, a deleted blob's: they stay there",
                location.length,
                location.offset,
                path,
            )
        finally:
            os.close(fd)

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._exists, key)

    def _exists(self, key: str) -> bool:
        target = self.path_for(key)
        return self._locate(key) is not None or target.is_file()


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
            fd = self._handle.fileno()
            # What earlier steps wrote back is clean by now, mostly: its pages go (those still
            # being written stay), and the next writes reuse them (see _uncache).
            drop_cached(fd, 0, self._written_back)
            start_writeback(fd, self._written_back)
            self._written_back = self._size

    async def flush(self) -> None:
        await asyncio.to_thread(self._handle.flush)

    async def commit(self, key: str) -> None:
        await asyncio.to_thread(self._commit, key)

    def _commit(self, key: str) -> None:
        target = self._store.path_for(key)
        self._handle.flush()
        os.fsync(self._handle.fileno())
        drop_cached(self._handle.fileno(), 0, self._size)  # all clean now
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


def _fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # as in _sync_file_range
        function = libc.fallocate  # Linux only
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_FALLOCATE = _fallocate()
# From linux/falloc.h: free the blocks of a range, reading as zeros, the file's size unchanged.
_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2
_SQLITE_FULL = 13


def free_range(fd: int, offset: int, length: int) -> None:
    """Blocking: make a range of a file read as zeros, its disk space freed where the
    filesystem can punch holes (ext4, XFS, btrfs, tmpfs); elsewhere overwritten with zeros: the
    bytes gone all the same, the space kept."""
    if length <= 0:
        return
    if _FALLOCATE is not None:
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _FALLOCATE(fd, mode, offset, length) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(code, os.strerror(code))
    zeros = bytes(min(length, 1024 * 1024))
    position, end = offset, offset + length
    while position < end:
        position += os.pwrite(fd, zeros[: end - position], position)


def _check_key(key: str) -> None:
    if not _KEY.fullmatch(key):
        # Keys are content hashes chosen by the server; anything else is a bug, and must never
        # become a path.
        raise ValueError(f"invalid blob key {key!r}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _uncache(pack: _Pack) -> None:
    """Let the kernel drop the synced pages of a pack appended through the page cache (where
    the filesystem refuses O_DIRECT), all but the last CACHED_TAIL bytes (which a thumbnail or
    an image hash read soon after the upload may still find).

    A pack is written once and read seldom. Kept cached, the blobs would crowd out what is read
    all the time (the catalog's pages), and every page of a new blob would take a page of
    memory not touched for a while. Given back once clean, the same pages take the next
    batch's appends, still warm: on this project's 2-core VM, appends like a batch's (7 blobs
    of 160 KiB per fdatasync) cost 0.031-0.069 ms of CPU per blob this way against
    0.036-0.243 ms with the pages kept (five runs each).
    """
    end = pack.size - CACHED_TAIL
    if end - pack.cached_from >= _UNCACHE_STEP:
        drop_cached(pack.fd, pack.cached_from, end)
        pack.cached_from = end


def drop_cached(fd: int, start: int, end: int) -> None:
    """Blocking, briefly: let the kernel drop a file's cached pages in [start, end) that are
    clean (on disk); those still dirty or being written stay. Only advice: where the call is
    missing (macOS) or fails, nothing changes but memory use."""
    if _FADVISE is not None and end > start:
        with contextlib.suppress(OSError):
            _FADVISE(fd, start, end - start, os.POSIX_FADV_DONTNEED)


_FADVISE = getattr(os, "posix_fadvise", None)  # not on macOS
# Pages are let go in steps of at least this many bytes: a system call per step, not per blob.
_UNCACHE_STEP = 1024 * 1024


def _record(blob: _Queued) -> tuple[bytes, bytes]:
    """A packed blob's record: its header, then its bytes."""
    return _RECORD.pack(_MAGIC, bytes.fromhex(blob.key), len(blob.data)), blob.data


# At most this many buffers per writev (Linux's IOV_MAX is 1,024).
_WRITEV_BUFFERS = 1024


def _writev_all(fd: int, buffers: list[bytes]) -> None:
    """Write all the buffers, in order, in as few system calls as the kernel allows."""
    views = [memoryview(buffer) for buffer in buffers if buffer]
    while views:
        written = os.writev(fd, views[:_WRITEV_BUFFERS])
        while written and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]


def _pwrite_all(fd: int, buffer: mmap.mmap, length: int, position: int) -> None:
    """Write buffer[:length] at `position` through a direct descriptor. Direct writes move whole
    blocks: one that stops short (a disk filling up) is an error, not something to go on from."""
    view = memoryview(buffer)[:length]
    try:
        written = os.pwrite(fd, view, position)
    finally:
        view.release()  # an exported view would keep the buffer from ever being closed
    if written != length:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: a direct write stopped short")


def _refused_direct(error: BaseException) -> bool:
    """Whether a direct write failed for being direct (an alignment the disk does not take)."""
    return isinstance(error, OSError) and error.errno == errno.EINVAL


def _inode(path: Path) -> int:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return -1


def _fsync_directory(path: Path) -> None:
    # The rename is durable only once the directory entry is.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
