"""Receiving a file's bytes: gathered in memory when small, else streamed into a sink (a blob
store's writer, which hashes them on the way, or a spool file to extract from) in batches.

Nothing here holds more than one batch being written and the next being gathered (and the first
few hundred bytes, for content sniffing) in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import filetype

from metalake.server.blobstore import create_spool_file, spool_name
from metalake.server.errors import LimitReached

# Bytes written to the blob store per thread hop (see receive).
WRITE_BATCH = 1024 * 1024
# Files up to this size are gathered whole in memory and stored in one step (see gather_head):
# no more than a larger upload holds in its write batches.
SMALL_FILE = WRITE_BATCH
_SNIFF_BYTES = 512  # filetype needs the first 261 bytes; a little more costs nothing.


class Sink(Protocol):
    """Where `receive` streams a file: a blob store's BlobWriter, or a SpoolFile."""

    @property
    def size(self) -> int:
        """Bytes written so far."""

    def sha256(self) -> str:
        """Lowercase hex SHA-256 of the bytes written so far."""

    async def write(self, chunk: bytes) -> None:
        """Append bytes."""


@dataclass(frozen=True)
class Spooled:
    """A file fully received by a writer, not yet committed."""

    size: int
    sha256: str
    content_type: str


@dataclass(frozen=True)
class Head:
    """The first chunks of an upload, gathered in memory: the whole file when `complete`."""

    chunks: list[bytes]
    complete: bool

    def data(self) -> bytes:
        return b"".join(self.chunks)  # a single chunk is returned as is, not copied


async def gather_head(
    chunks: AsyncIterator[bytes], *, limit: int = SMALL_FILE, max_size: int | None = None
) -> Head:
    """Gather chunks until the file ends or passes `limit` bytes.

    A small file then needs no spool file and no write per batch: the pipeline stores it in one
    step, and the extractors read it from memory. A larger one goes on to `receive`, its head
    first (see `prepend`). Holds at most `limit` bytes and one chunk.
    """
    gathered: list[bytes] = []
    size = 0
    async for chunk in chunks:
        if not chunk:
            continue
        size += len(chunk)
        check_size(size, max_size)
        gathered.append(chunk)
        if size > limit:
            return Head(gathered, complete=False)
    return Head(gathered, complete=True)


async def prepend(head: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The chunks already gathered, then the rest of the stream."""
    for chunk in head:
        yield chunk
    async for chunk in rest:
        yield chunk


def sniff_content_type(data: bytes, filename: str) -> str:
    """detect_content_type on the first bytes of a file held in memory."""
    return detect_content_type(data[:_SNIFF_BYTES], filename)


async def receive(
    chunks: AsyncIterator[bytes],
    writer: Sink,
    *,
    filename: str,
    content_type: str = "",
    max_size: int | None = None,
) -> Spooled:
    """Stream every chunk into `writer` (a blob writer hashes them); sniff the content type from
    the first bytes.

    Chunks are gathered into batches of WRITE_BATCH bytes, and one batch is written (and hashed,
    off the event loop) while the next arrives: a thread hop costs about as much as receiving a
    small chunk, so a hop per chunk would halve throughput, and overlapping keeps the network
    and the disk busy at once. At most two batches are held per upload.
    """
    head = b""
    batch = bytearray()
    received = 0
    in_flight: asyncio.Future[None] | None = None
    try:
        async for chunk in chunks:
            if not chunk:
                continue
            received += len(chunk)
            check_size(received, max_size)
            if len(head) < _SNIFF_BYTES:
                head += chunk[: _SNIFF_BYTES - len(head)]
            if batch or len(chunk) < WRITE_BATCH:
                batch += chunk
                if len(batch) < WRITE_BATCH:
                    continue
                write, batch = bytes(batch), bytearray()
            else:
                write = chunk  # a whole batch already (the SDK's 1 MiB chunks): no copy
            if in_flight is not None:
                await in_flight
            in_flight = asyncio.ensure_future(writer.write(write))
            del write  # the writer holds it until written; nothing else should
        if in_flight is not None:
            await in_flight
            in_flight = None
        if batch:
            await writer.write(bytes(batch))
    finally:
        if in_flight is not None and not in_flight.done():
            # The upload failed with a write still running: its outcome no longer matters, but
            # must not be reported as an exception nobody retrieved.
            in_flight.add_done_callback(_ignore_outcome)
    return Spooled(
        writer.size, writer.sha256(), content_type or detect_content_type(head, filename)
    )


def _ignore_outcome(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def check_size(size: int, max_size: int | None) -> None:
    if max_size is not None and size > max_size:
        raise LimitReached(f"the file exceeds this server's maximum file size of {max_size} bytes")


def detect_content_type(head: bytes, filename: str) -> str:
    """The content's own signature first (names lie), then the extension."""
    kind = filetype.guess(head) if head else None
    if kind is not None:
        return str(kind.mime)
    guessed, _ = mimetypes.guess_type(filename, strict=False)
    return guessed or "application/octet-stream"


class SpoolFile:
    """A file received only to be read by the extractors (ExtractMetadata), on local disk.

    Named after this process (spool_name) in the spool directory, as upload spool files are:
    whatever a crash leaves of it is discarded at the next start, like theirs. Never stored, so
    never hashed: its `sha256` is empty.
    """

    def __init__(self, path: Path, handle: BinaryIO) -> None:
        self.path = path
        self._handle = handle
        self._size = 0

    @classmethod
    async def create(cls, directory: Path) -> SpoolFile:
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        path = directory / spool_name(".extract")
        return cls(path, await create_spool_file(path))

    @property
    def size(self) -> int:
        return self._size

    def sha256(self) -> str:
        return ""

    async def write(self, chunk: bytes) -> None:
        await asyncio.to_thread(self._handle.write, chunk)
        self._size += len(chunk)

    async def flush(self) -> None:
        """Make every byte written so far readable at `path`."""
        await asyncio.to_thread(self._handle.flush)

    def discard(self) -> None:
        """Close and remove the file. Synchronous, as a blob writer's abort is: it runs while the
        call is being cancelled, and an await could be cancelled in turn."""
        with contextlib.suppress(OSError):  # a failed write fails the flush of close again
            self._handle.close()
        self.path.unlink(missing_ok=True)
