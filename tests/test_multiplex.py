"""Many files over one stream (multiplex.upload_stream): each file reaches its upload intact and
in order, whatever its size and chunking; a slow or failed upload never makes the stream reader
hold more than a bounded amount of its bytes."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from metalake.server.catalog import DataRecord
from metalake.server.errors import InvalidRequest, Refusal
from metalake.server.ingest import SMALL_FILE, UploadHeader
from metalake.server.multiplex import FileChunk, FileEnd, FileStart, StreamEvent, upload_stream


def _events(files: list[tuple[str, bytes]], chunk_size: int) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    for name, content in files:
        events.append(FileStart(UploadHeader(filename=name)))
        events += [
            FileChunk(content[at : at + chunk_size]) for at in range(0, len(content), chunk_size)
        ]
        events.append(FileEnd())
    return events


class _Source:
    """A stream's events, counting those the reader has taken."""

    def __init__(self, events: list[StreamEvent]) -> None:
        self.events = events
        self.taken = 0

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        for event in self.events:
            self.taken += 1
            yield event
            await asyncio.sleep(0)  # a network read between messages


def _item(filename: str, data: bytes) -> DataRecord:
    """The item an upload of these bytes answers with (no catalog here)."""
    sha256 = hashlib.sha256(data).hexdigest()
    now = datetime.now(UTC)
    return DataRecord(
        id=filename,
        org="o",
        filename=filename,
        size=len(data),
        sha256=sha256,
        content_type="application/octet-stream",
        blob_key=sha256,
        created_at=now,
        updated_at=now,
    )


def _seen(outcome: DataRecord | Refusal) -> tuple[str, int, str]:
    assert isinstance(outcome, DataRecord), outcome
    return outcome.filename, outcome.size, outcome.sha256


def _sent(filename: str, data: bytes) -> tuple[str, int, str]:
    return filename, len(data), hashlib.sha256(data).hexdigest()


async def _received(header: UploadHeader, chunks: AsyncIterator[bytes]) -> DataRecord:
    """An upload that answers with what it received."""
    return _item(header.filename, b"".join([chunk async for chunk in chunks]))


@pytest.mark.parametrize("chunk_size", [1 << 20, 256 * 1024, 30_000])
async def test_files_of_every_size_arrive_intact_and_in_order(chunk_size: int) -> None:
    sizes = [0, 1, SMALL_FILE - 1, SMALL_FILE, SMALL_FILE + 1, 3 * SMALL_FILE + 7, 5]
    files = [(f"{i}.bin", bytes([i]) * size) for i, size in enumerate(sizes)]
    source = _Source(_events(files, chunk_size))
    outcomes = [o async for o in upload_stream(_received, aiter(source), window=4)]
    assert [_seen(o) for o in outcomes] == [_sent(*file) for file in files]


async def test_a_slow_upload_of_a_large_file_holds_the_reader_back() -> None:
    chunk_size = 64 * 1024
    content = b"x" * (10 * SMALL_FILE)
    source = _Source(_events([("big.bin", content)], chunk_size))
    go_on = asyncio.Event()
    first_chunk = asyncio.Event()

    async def slow(header: UploadHeader, chunks: AsyncIterator[bytes]) -> DataRecord:
        received = bytearray()
        async for chunk in chunks:
            received += chunk
            first_chunk.set()
            await go_on.wait()
        return _item(header.filename, bytes(received))

    outcomes = upload_stream(slow, aiter(source), window=4)
    answer = asyncio.ensure_future(anext(outcomes))
    await first_chunk.wait()
    for _ in range(100):  # let the reader run as far as it can
        await asyncio.sleep(0)
    # The header, the chunk being received, the queue's few and the one waiting to be queued:
    # a few chunks, not the file.
    assert source.taken <= 1 + 1 + 4 + 1
    go_on.set()
    assert _seen(await answer) == _sent("big.bin", content)
    assert [o async for o in outcomes] == []


async def test_a_large_file_refused_early_does_not_stall_the_files_after_it() -> None:
    files = [("refused.bin", b"r" * (6 * SMALL_FILE)), ("next.bin", b"n" * 1000)]
    source = _Source(_events(files, 64 * 1024))

    async def refuse_the_first(header: UploadHeader, chunks: AsyncIterator[bytes]) -> DataRecord:
        if header.filename == "refused.bin":
            await anext(aiter(chunks))
            raise InvalidRequest("refused")
        return await _received(header, chunks)

    outcomes = [o async for o in upload_stream(refuse_the_first, aiter(source), window=4)]
    assert isinstance(outcomes[0], Refusal)
    assert _seen(outcomes[1]) == _sent("next.bin", b"n" * 1000)
    assert source.taken == len(source.events)


@pytest.mark.parametrize("size", [1000, 3 * SMALL_FILE])
async def test_a_stream_ending_inside_a_file_uploads_none_of_it(size: int) -> None:
    events = _events([("whole.bin", b"w" * 10), ("cut.bin", b"c" * size)], 256 * 1024)[:-1]
    finished: list[str] = []

    async def upload(header: UploadHeader, chunks: AsyncIterator[bytes]) -> DataRecord:
        record = await _received(header, chunks)
        finished.append(header.filename)
        return record

    outcomes: list[DataRecord | Refusal] = []

    async def receive_all() -> None:
        async with asyncio.timeout(10):  # a cut file's upload left waiting would hang the stream
            async for outcome in upload_stream(upload, aiter(_Source(events)), window=4):
                outcomes.append(outcome)

    with pytest.raises(InvalidRequest, match="ended inside a file"):
        await receive_all()
    assert [_seen(o) for o in outcomes] == [_sent("whole.bin", b"w" * 10)]
    assert finished == ["whole.bin"]
