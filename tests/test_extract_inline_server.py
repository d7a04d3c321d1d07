"""fill_metadata in a real server process, where the built-in extractors run on the event loop's
thread (the in-process test servers run their loop off the main thread, so they never do)."""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from metalake import metadata as md
from metalake.extractors.testing import sample_exif
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests.serverprocess import ServerProcess

CHUNK = 64 * 1024


def hostile_tiff(entries: int) -> bytes:
    """A TIFF whose first directory holds `entries` short text tags: every reader walks them
    all, so reading it takes the built-ins far longer than any camera file (but under 1 MiB,
    a small file, kept in memory)."""
    tags = b"".join(struct.pack("<HHI4s", 1000 + i, 2, 4, b"AAA\0") for i in range(entries))
    return b"II*\x00" + struct.pack("<IH", 8, entries) + tags + b"\0\0\0\0"


def camera_jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 12)).save(buffer, "JPEG", exif=sample_exif())
    return buffer.getvalue()


def upload(stub: pb_grpc.DatalakeServiceStub, content: bytes, name: str, **meta: str) -> pb.Data:
    def requests() -> Iterator[pb.UploadDataRequest]:
        header = pb.UploadDataHeader(
            filename=name, fill_metadata=True, metadata=md.to_proto(dict(meta))
        )
        yield pb.UploadDataRequest(header=header)
        for start in range(0, len(content), CHUNK):
            yield pb.UploadDataRequest(chunk=content[start : start + CHUNK])

    answer: pb.UploadDataResponse = stub.UploadData(requests(), timeout=60)
    return answer.data


@pytest.fixture(params=["1", "2"], ids=["one process", "two workers"])
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    # Each worker process runs its event loop on its own main thread, as a lone server does.
    with ServerProcess(
        tmp_path / "data", tmp_path / "server.log", METALAKE_WORKERS=request.param
    ) as running:
        yield running


def test_a_hostile_small_file_is_interrupted_on_the_loop_and_stored_with_its_values(
    server: ServerProcess,
) -> None:
    hostile = hostile_tiff(60_000)
    assert len(hostile) < 1024 * 1024
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        # Camera files keep flowing beside it.
        with ThreadPoolExecutor(4) as pool:
            slow = pool.submit(upload, stub, hostile, "hostile.tif", weather="rain")
            others = [pool.submit(upload, stub, camera_jpeg(), f"{i}.jpg") for i in range(8)]
            stored = slow.result()
            for other in others:
                assert other.result().metadata_sources["software"] == "pillow"
        assert stored.size == len(hostile)
        values, problems = md.from_proto(stored.metadata)
        assert problems == []
        assert values["weather"] == "rain"
        assert stored.metadata_sources["weather"] == "client"
        # Its tags hold no valid value of any field (a text where a date is due, at best):
        # nothing else is filled.
        assert set(stored.metadata_sources) == {"weather"}
        # The loop's budget was spent on it, and it went to a worker thread.
        spent = r"the event loop's 0\.05 s for hostile\.tif were spent with extractor '\w+'"
        assert re.search(spent, server.log.read_text())
        # The server is well afterwards: still serving, and still filling from the loop.
        after = upload(stub, camera_jpeg(), "after.jpg")
        assert after.metadata_sources["software"] == "pillow"
        assert after.metadata_sources["latitude"] == "gps"
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    assert server.process is not None
    assert server.process.poll() is None
