"""Many files over one stream: each file is an ordinary upload (Ingest.upload, which also checks
its header), several in flight at once.

The stream reader feeds each file's chunks to its own upload task through a small bounded queue,
so receiving file k+1 overlaps committing file k, and a fast client still cannot make the server
buffer more than a few chunks per file. Outcomes come back in file order, one per file.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from metalake.server.catalog import DataRecord
from metalake.server.errors import Refusal, invalid_field
from metalake.server.ingest import UploadHeader

# Chunks buffered per file between the stream reader and the file's upload.
_QUEUE_CHUNKS = 4


@dataclass(frozen=True)
class FileStart:
    header: UploadHeader


@dataclass(frozen=True)
class FileChunk:
    data: bytes


@dataclass(frozen=True)
class FileEnd:
    pass


StreamEvent = FileStart | FileChunk | FileEnd
Upload = Callable[[UploadHeader, AsyncIterator[bytes]], Awaitable[DataRecord]]


class _Feed:
    """One file's chunks, from the stream reader to the file's upload task."""

    _END = object()

    def __init__(self) -> None:
        self._queue: asyncio.Queue[object] = asyncio.Queue(_QUEUE_CHUNKS)
        self._closed = False

    async def put(self, chunk: bytes) -> None:
        if not self._closed:  # an upload that already failed takes no more bytes
            await self._queue.put(chunk)

    async def end(self) -> None:
        if not self._closed:
            await self._queue.put(self._END)

    def close(self) -> None:
        """The consumer is gone: unblock a waiting put and drop what is queued."""
        self._closed = True
        while not self._queue.empty():
            self._queue.get_nowait()

    async def chunks(self) -> AsyncIterator[bytes]:
        while (item := await self._queue.get()) is not self._END:
            assert isinstance(item, bytes)
            yield item


async def upload_stream(
    upload: Upload, events: AsyncIterator[StreamEvent], *, window: int
) -> AsyncIterator[DataRecord | Refusal]:
    """Each file's outcome, in order; a failed file does not end the stream.

    Errors of the stream itself (a chunk outside any file, a header inside one) end it.
    """
    pending: asyncio.Queue[asyncio.Task[DataRecord] | None] = asyncio.Queue(window)

    async def read() -> None:
        feed: _Feed | None = None
        task: asyncio.Task[DataRecord] | None = None
        try:
            async for event in events:
                if isinstance(event, FileStart):
                    if feed is not None:
                        raise invalid_field(
                            "finish", "a file must be finished before the next header"
                        )
                    feed = _Feed()
                    task = asyncio.create_task(_run(upload, event.header, feed))
                    await pending.put(task)  # waits while `window` files are in flight
                elif feed is None:
                    raise invalid_field("header", "a file must start with a header")
                elif isinstance(event, FileChunk):
                    await feed.put(event.data)
                else:
                    await feed.end()
                    feed = None
            if feed is not None:
                raise invalid_field("finish", "the stream ended inside a file")
        finally:
            if feed is not None and task is not None:
                task.cancel()  # the file never finished: store nothing of it
            await pending.put(None)

    reader = asyncio.create_task(read())
    try:
        while (task := await pending.get()) is not None:
            try:
                yield await task
            except Refusal as error:
                yield error
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not task.cancelled() or (current is not None and current.cancelling()):
                    raise
                break  # the reader cancelled an unfinished file: its error follows
        await reader  # re-raises a stream error
    finally:
        reader.cancel()
        while not pending.empty():
            if (task := pending.get_nowait()) is not None:
                task.cancel()


async def _run(upload: Upload, header: UploadHeader, feed: _Feed) -> DataRecord:
    try:
        return await upload(header, feed.chunks())
    finally:
        feed.close()
