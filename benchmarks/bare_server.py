"""The framework's ceilings: bare grpc.aio DatalakeServices with none of metalake's features.

    python -m benchmarks.bare_server            # discards what it receives
    python -m benchmarks.bare_server durable    # stores it: the least a durable store must do

Both print "bare serving on 127.0.0.1:PORT". The discarding server is gRPC's ceiling; the
durable one adds what any store that acknowledges only durable bytes pays: a SHA-256 of every
byte, a write off the event loop (one in flight while the next chunk arrives), an fsync, a
rename into place and an fsync of the directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

import grpc

from metalake.server.app import TRANSPORT_OPTIONS, tune_malloc
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc


class DiscardingServicer(pb_grpc.DatalakeServiceServicer):
    async def UploadData(
        self, request_iterator: AsyncIterator[pb.UploadDataRequest], context: Any
    ) -> pb.UploadDataResponse:
        size = 0
        async for message in request_iterator:
            size += len(message.chunk)
        return pb.UploadDataResponse(data=pb.Data(size=size))

    async def UploadDataStream(
        self, request_iterator: AsyncIterator[pb.UploadDataStreamRequest], context: Any
    ) -> AsyncIterator[pb.UploadDataStreamResponse]:
        index, size = 0, 0
        async for message in request_iterator:
            if message.HasField("finish"):
                yield pb.UploadDataStreamResponse(file_index=index, data=pb.Data(size=size))
                index, size = index + 1, 0
            else:
                size += len(message.chunk)


class DurableServicer(pb_grpc.DatalakeServiceServicer):
    """UploadData into a file: hashed, written off the loop, fsynced, renamed; then deleted
    (the benchmark measures the write, and the disk is not ours to fill)."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    async def UploadData(
        self, request_iterator: AsyncIterator[pb.UploadDataRequest], context: Any
    ) -> pb.UploadDataResponse:
        partial = self._directory / f"{uuid.uuid4().hex}.part"
        handle = await asyncio.to_thread(open, partial, "xb")
        digest, size = hashlib.sha256(), 0
        in_flight: asyncio.Future[None] | None = None
        try:
            async for message in request_iterator:
                chunk = message.chunk  # each read of a bytes field copies it: read it once
                if not chunk:
                    continue
                size += len(chunk)
                if in_flight is not None:
                    await in_flight
                in_flight = asyncio.ensure_future(
                    asyncio.to_thread(_hash_and_write, digest, handle, chunk)
                )
            if in_flight is not None:
                await in_flight
            final = self._directory / digest.hexdigest()
            await asyncio.to_thread(_sync_and_rename, handle, partial, final)
        finally:
            handle.close()
            partial.unlink(missing_ok=True)
        final.unlink()
        return pb.UploadDataResponse(data=pb.Data(size=size, sha256=final.name))


def _hash_and_write(digest: Any, handle: BinaryIO, chunk: bytes) -> None:
    digest.update(chunk)
    handle.write(chunk)


def _sync_and_rename(handle: BinaryIO, partial: Path, final: Path) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    os.replace(partial, final)
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


async def serve(directory: Path | None) -> None:
    # The same process and transport settings as metalake's server: a like-for-like ceiling.
    server = grpc.aio.server(options=TRANSPORT_OPTIONS)
    # Only the upload RPCs: the rest answer UNIMPLEMENTED, as the base class does.
    servicer: pb_grpc.DatalakeServiceServicer = (
        DurableServicer(directory) if directory else DiscardingServicer()  # type: ignore[abstract]
    )
    pb_grpc.add_DatalakeServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"bare serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


def main(durable: bool) -> None:
    if not durable:
        asyncio.run(serve(None))
        return
    # Where metalake would write (METALAKE_DATA_DIR, set by tests.serverprocess): same disk.
    parent = os.environ.get("METALAKE_DATA_DIR")
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="metalake-bare-", dir=parent) as directory:
        asyncio.run(serve(Path(directory)))


if __name__ == "__main__":
    tune_malloc()
    main(durable=sys.argv[1:] == ["durable"])
