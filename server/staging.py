"""Resumable uploads' bytes on this server's disk, until they are finished: the staging area.

Each upload being staged has one file, `<staging dir>/<staging key>`, that only ever grows from
what is durable. A client may resend from any offset up to the committed size (resent bytes are
skipped) and a server that crashed mid-stream truncates back to it, so the staged file is always a
prefix of the upload. Staged files survive restarts (the client resumes them); garbage collection
removes those of expired uploads. A finished upload's file is handed to the blob store whole
(`BlobStore.store_file`), whichever store it is: staging is the same for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from metalake.server.errors import OffsetOutOfRange, invalid_field
from metalake.server.ingest import check_size

# Upload ids, and the staging keys that name staged files: never anything a path could escape by.
UPLOAD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StagingArea:
    """The directory of staged files, on local disk (with local blobs, on the same filesystem:
    storing a finished upload is then a rename)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, staging_key: str) -> Path:
        """The staged file of an upload; raises ValueError for a key that is not UPLOAD_ID."""
        if not UPLOAD_ID.match(staging_key):
            raise ValueError(f"invalid upload id {staging_key!r}")
        return self.directory / staging_key

    def file(self, staging_key: str, committed: int, max_size: int | None) -> StagedFile:
        """The staged file to append to, `committed` bytes of it durable; see StagedFile."""
        return StagedFile(self.path(staging_key), committed, max_size)

    async def hash(self, staging_key: str) -> tuple[str, int]:
        """The SHA-256 (lowercase hex) and size of a complete staged file: read once."""
        return await asyncio.to_thread(hash_file, self.path(staging_key))

    async def discard(self, staging_key: str) -> None:
        """Remove an upload's staged file, if any."""
        await asyncio.to_thread(self.path(staging_key).unlink, True)

    def staging_keys(self) -> list[str]:
        """Blocking: the keys of every staged file; anything else in the directory (a
        directory, a name that is no upload id) is not a staged upload and is left alone."""
        return [p.name for p in self.directory.iterdir() if UPLOAD_ID.match(p.name) and p.is_file()]


def hash_file(path: Path) -> tuple[str, int]:
    """Blocking: the SHA-256 (lowercase hex) and size of a file."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as handle:
        while block := handle.read(1024 * 1024):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


@dataclass(frozen=True)
class UploadWrite:
    """One WriteUpload message: `data` belongs at byte `offset` of the file."""

    offset: int
    data: bytes
    finish: bool


# A resumable upload's committed size advances at least every this many bytes.
SYNC_EVERY = 8 * 1024 * 1024


class StagedFile:
    """A resumable upload's staged file: appends at the committed size, skips resent bytes."""

    def __init__(self, path: Path, committed: int, max_size: int | None) -> None:
        self._path = path
        self._max_size = max_size
        self._committed = committed
        self._size = committed  # bytes written, durable or not
        self._next_offset: int | None = None  # where the client's next data belongs
        self._handle: BinaryIO | None = None
        self.unsynced = 0

    async def open(self) -> None:
        self._handle = await asyncio.to_thread(self._open)

    def _open(self) -> BinaryIO:
        handle = open(self._path, "r+b" if self._path.exists() else "w+b")  # noqa: SIM115
        # Fewer bytes than the catalog says were committed: the staging file is not this
        # server's (another one received them) or was lost. Start over from what is here.
        self._committed = self._size = min(self._committed, handle.seek(0, os.SEEK_END))
        # Bytes past the committed size were never acknowledged: a crash may have mangled them.
        handle.truncate(self._committed)
        handle.seek(self._committed)
        return handle

    @property
    def committed(self) -> int:
        return self._committed

    async def write(self, offset: int, data: bytes) -> None:
        if self._next_offset is None:
            if offset > self._committed:
                raise OffsetOutOfRange(
                    f"write_offset {offset} is beyond the committed size {self._committed}: "
                    "query the upload and resume from its committed size"
                )
            self._next_offset = offset
        elif offset and offset != self._next_offset:
            raise invalid_field(
                "write_offset", f"must continue the previous message at {self._next_offset}"
            )
        start, self._next_offset = self._next_offset, self._next_offset + len(data)
        if self._next_offset <= self._size:
            return  # already have all of it
        fresh = data[self._size - start :] if start < self._size else data
        check_size(self._size + len(fresh), self._max_size)
        assert self._handle is not None
        try:
            await asyncio.to_thread(self._handle.write, fresh)
        except OSError:
            await self._drop_unsynced()
            raise
        self._size += len(fresh)
        self.unsynced += len(fresh)

    async def sync(self) -> int:
        """Make everything written durable; returns the new committed size."""
        if self._handle is not None and self.unsynced:
            await asyncio.to_thread(_flush_and_sync, self._handle)
        self._committed = self._size
        self.unsynced = 0
        return self._committed

    @property
    def size(self) -> int:
        return self._size

    async def close(self) -> int:
        try:
            return await self.sync()
        except OSError:
            await self._drop_unsynced()
            raise
        finally:
            self._close_handle()

    async def _drop_unsynced(self) -> None:
        """After a failed write or sync (a full disk): drop the bytes past the committed size,
        so the staging file holds exactly what the client may resume from."""
        self._close_handle()
        with contextlib.suppress(OSError):
            await asyncio.to_thread(os.truncate, self._path, self._committed)
        self._size = self._committed
        self.unsynced = 0

    def _close_handle(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            # Closing flushes what is buffered: after a failed write it fails again.
            with contextlib.suppress(OSError):
                handle.close()


def _flush_and_sync(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())
