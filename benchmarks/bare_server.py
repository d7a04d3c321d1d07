"""The framework's ceiling: a bare grpc.aio DatalakeService that only discards what it receives.

python -m benchmarks.bare_server        # prints "bare serving on 127.0.0.1:PORT"
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc

from metalake.server.app import tune_malloc
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


async def serve() -> None:
    server = grpc.aio.server()
    # Only the upload RPCs: the rest answer UNIMPLEMENTED, as the base class does.
    servicer = DiscardingServicer()  # type: ignore[abstract]
    pb_grpc.add_DatalakeServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"bare serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    tune_malloc()  # the same process settings as metalake's server: a like-for-like ceiling
    asyncio.run(serve())
